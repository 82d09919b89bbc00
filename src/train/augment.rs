//! Token replacement for distillation, after Tang et al. 2019's masking and TinyBERT's word
//! replacement: each ordinary token of a training sentence is replaced, with probability `p`, by
//! a token drawn from the batch's other sentences. The teacher scores the altered sentence, so
//! the student learns the teacher's function around the train sentences as well as at them (a
//! fine-tuned teacher is near-certain on its own train sentences, which leaves little to learn
//! there). The gold label may not fit an altered sentence: augmentation is for pure distillation.

use crate::data::batch::EncodedSet;
use crate::data::sample::SplitMix64;

/// Replaces each ordinary token of `batch` with probability `p`, by one drawn (uniformly over
/// positions) from the batch's ordinary tokens; seeded by `seed`. Ordinary: not the first token
/// and not equal to the last (the classifier and separator tokens).
pub fn replace_tokens(batch: &mut EncodedSet, p: f64, seed: u64) {
    let pool: Vec<u32> = (batch.sequences.iter())
        .flat_map(|s| ordinary(&s.ids).map(|i| s.ids[i]).collect::<Vec<_>>())
        .collect();
    if pool.is_empty() || p <= 0.0 {
        return;
    }
    let mut rng = SplitMix64::new(seed);
    for s in &mut batch.sequences {
        let positions: Vec<usize> = ordinary(&s.ids).collect();
        for i in positions {
            if rng.chance(p) {
                s.ids[i] = pool[rng.below(pool.len() as u64) as usize];
            }
        }
    }
}

/// The positions of `ids` that are neither the first token nor a separator (equal to the last).
fn ordinary(ids: &[u32]) -> impl Iterator<Item = usize> + '_ {
    let last = ids.last().copied();
    (1..ids.len()).filter(move |&i| Some(ids[i]) != last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenizer::Sequence;

    fn set(sentences: &[&[u32]]) -> EncodedSet {
        EncodedSet {
            suffix: "",
            path: Default::default(),
            sequences: (sentences.iter())
                .map(|ids| Sequence {
                    ids: ids.to_vec(),
                    type_ids: vec![0; ids.len()],
                })
                .collect(),
            targets: Vec::new(),
        }
    }

    #[test]
    fn specials_stay_and_the_share_replaced_follows_p() {
        let sentence: Vec<u32> = [101].into_iter().chain(1000..1100).chain([102]).collect();
        let other: Vec<u32> = [101].into_iter().chain(5000..5100).chain([102]).collect();
        let mut batch = set(&[&sentence, &other]);
        replace_tokens(&mut batch, 0.25, 3);
        let a = &batch.sequences[0].ids;
        assert_eq!((a[0], a[101]), (101, 102));
        assert!(a.iter().all(|&t| t != 102 || t == a[101]));
        // Each replaced token comes from the batch's ordinary tokens; drawn from the other
        // sentence half the time, so about an eighth of the first sentence changes.
        let moved = a[1..101].iter().filter(|&&t| t >= 5000).count();
        assert!((5..25).contains(&moved), "{moved} of 100");
        assert!(a.iter().all(|&t| t == 101
            || t == 102
            || (1000..1100).contains(&t)
            || (5000..5100).contains(&t)));
        // Same seed, same batch; p = 0 changes nothing.
        let mut again = set(&[&sentence, &other]);
        replace_tokens(&mut again, 0.25, 3);
        assert_eq!(again.sequences, batch.sequences);
        let mut none = set(&[&sentence, &other]);
        replace_tokens(&mut none, 0.0, 3);
        assert_eq!(none.sequences[0].ids, sentence);
    }
}
