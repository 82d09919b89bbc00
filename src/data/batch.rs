//! Encoding task data and grouping it into length-bucketed batches.

use std::path::PathBuf;

use anyhow::Result;

use super::glue::{Dataset, Target};
use super::source::TaskData;
use crate::text::tokenizer::Sequence;
use crate::text::tokenizer::TextEncoder;

/// One file of task data, tokenised.
#[derive(Debug, Clone)]
pub struct EncodedSet {
    /// Metric-name suffix (`matched` / `mismatched` for MNLI dev), empty otherwise.
    pub suffix: &'static str,
    /// The TSV file.
    pub path: PathBuf,
    /// Token sequences in file order.
    pub sequences: Vec<Sequence>,
    /// Gold labels in file order.
    pub targets: Vec<Target>,
}

/// Reads and tokenises the files of `split` of the task's data.
pub fn load_split(data: &TaskData, split: &str, encoder: &TextEncoder) -> Result<Vec<EncodedSet>> {
    data.split(split)?
        .iter()
        .map(|(suffix, set)| encode(set, suffix, encoder))
        .collect()
}

/// Tokenises a dataset read from a TSV file.
pub fn encode(set: &Dataset, suffix: &'static str, encoder: &TextEncoder) -> Result<EncodedSet> {
    let texts: Vec<(String, Option<String>)> = set
        .examples
        .iter()
        .map(|e| (e.text_a.clone(), e.text_b.clone()))
        .collect();
    Ok(EncodedSet {
        suffix,
        sequences: encoder.encode(&texts)?,
        targets: set.examples.iter().map(|e| e.target).collect(),
        path: set.path.clone(),
    })
}

impl EncodedSet {
    /// The examples at `indices` (in that order).
    pub fn subset(&self, indices: &[usize]) -> EncodedSet {
        EncodedSet {
            suffix: self.suffix,
            path: self.path.clone(),
            sequences: indices.iter().map(|&i| self.sequences[i].clone()).collect(),
            targets: indices.iter().map(|&i| self.targets[i]).collect(),
        }
    }
}

/// How examples are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchOrder {
    /// By length, so little padding is computed ([`length_buckets`]).
    Sorted,
    /// Consecutive examples in file order, each batch padded to its longest.
    File,
}

impl BatchOrder {
    /// The batches of example indices for `n` examples.
    pub fn batches(self, sequences: &[Sequence], batch_size: usize) -> Vec<Vec<usize>> {
        match self {
            BatchOrder::Sorted => length_buckets(sequences, batch_size),
            BatchOrder::File => (0..sequences.len())
                .collect::<Vec<_>>()
                .chunks(batch_size.max(1))
                .map(<[usize]>::to_vec)
                .collect(),
        }
    }

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            BatchOrder::Sorted => "sorted",
            BatchOrder::File => "file",
        }
    }
}

/// Groups example indices into batches of similar length (ascending; ties in input order), so
/// little padding is computed. Deterministic.
pub fn length_buckets(sequences: &[Sequence], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| (sequences[i].ids.len(), i));
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_sort_by_length_and_cover_everything() {
        let seq = |n: usize| Sequence {
            ids: vec![1; n],
            type_ids: vec![0; n],
        };
        let seqs = vec![seq(5), seq(2), seq(9), seq(2), seq(4)];
        let b = length_buckets(&seqs, 2);
        assert_eq!(b, vec![vec![1, 3], vec![4, 0], vec![2]]);
    }
}
