//! Perturbed sentences for honest selection data: a fine-tuned model has memorised its train
//! sentences, so they hide what a change costs on new text, and dev is small. Replacing some of
//! the words of train sentences by words of other sentences makes text the model has not seen;
//! labelled by the input model itself, it measures agreement with the input on new text.

use super::glue::{Dataset, Example};
use super::sample::SplitMix64;

/// Share of the words replaced in each perturbed sentence.
pub const REPLACED_SHARE: f64 = 0.2;

/// `set` with each whitespace-separated word replaced, with probability `p`, by a word drawn
/// uniformly from all the words of `set` (both sentences of a pair); seeded by `seed`. Labels are
/// kept as they are: the caller relabels.
pub fn replace_words(set: &Dataset, p: f64, seed: u64) -> Dataset {
    let pool: Vec<&str> = (set.examples.iter())
        .flat_map(|e| std::iter::once(&e.text_a).chain(&e.text_b))
        .flat_map(|text| text.split_whitespace())
        .collect();
    let mut rng = SplitMix64::new(seed);
    let mut perturb = |text: &str| -> String {
        let words: Vec<&str> = (text.split_whitespace())
            .map(|w| {
                if rng.chance(p) {
                    pool[rng.below(pool.len() as u64) as usize]
                } else {
                    w
                }
            })
            .collect();
        words.join(" ")
    };
    let examples = (set.examples.iter())
        .map(|e| Example {
            text_a: perturb(&e.text_a),
            text_b: e.text_b.as_deref().map(&mut perturb),
            target: e.target,
        })
        .collect();
    Dataset {
        path: set.path.clone(),
        examples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::glue::Target;

    fn set(texts: &[(&str, Option<&str>)]) -> Dataset {
        Dataset {
            path: "train.tsv".into(),
            examples: (texts.iter())
                .map(|(a, b)| Example {
                    text_a: a.to_string(),
                    text_b: b.map(str::to_string),
                    target: Target::Class(1),
                })
                .collect(),
        }
    }

    #[test]
    fn about_p_of_the_words_change_to_words_of_the_set() {
        let a: Vec<String> = (0..200).map(|i| format!("a{i}")).collect();
        let b: Vec<String> = (0..200).map(|i| format!("b{i}")).collect();
        let (a, b) = (a.join(" "), b.join(" "));
        let original = set(&[(&a, Some(&b)), ("short one", None)]);
        let out = replace_words(&original, 0.25, 5);
        let words: Vec<&str> = out.examples[0].text_a.split_whitespace().collect();
        assert_eq!(words.len(), 200);
        let changed = (words.iter().enumerate())
            .filter(|(i, w)| **w != format!("a{i}"))
            .count();
        // Replaced with p = 0.25, by one of 402 words (the same word about 1 time in 400).
        assert!((25..75).contains(&changed), "{changed} of 200");
        let known =
            |w: &&str| w.starts_with('a') || w.starts_with('b') || ["short", "one"].contains(w);
        assert!(words.iter().all(known));
        assert!(out.examples[0].text_b.as_deref().unwrap() != b);
        assert_eq!(out.examples[1].text_b, None);
        assert_eq!(out.examples[1].target, Target::Class(1));
        // Seeded; p = 0 changes nothing.
        assert_eq!(replace_words(&original, 0.25, 5).examples, out.examples);
        assert_ne!(replace_words(&original, 0.25, 6).examples, out.examples);
        assert_eq!(replace_words(&original, 0.0, 5).examples, original.examples);
    }
}
