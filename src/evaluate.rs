//! Batched inference in input order, and task metrics and loss from logits.

use anyhow::{bail, Result};
use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::data::batch::{length_buckets, EncodedSet};
use crate::data::glue::Target;
use crate::data::labels::LabelMap;
use crate::data::metric;
use crate::data::task::Task;
use crate::model::encoder::RunOptions;
use crate::model::inputs::Inputs;
use crate::model::Model;
use crate::text::tokenizer::Sequence;

/// Logits for every sequence, returned in input order. Batches are length-bucketed; the matrix
/// products use every core.
pub fn predict(
    model: &Model,
    sequences: &[Sequence],
    batch_size: usize,
    opts: RunOptions,
    progress: &ProgressBar,
) -> Result<Vec<Vec<f32>>> {
    let batches = length_buckets(sequences, batch_size);
    predict_batches(model, sequences, batches, opts, progress)
}

/// The model's own answers for `set` as targets: predicted labels, or scores under regression.
pub fn model_targets(
    model: &Model,
    task: Task,
    map: &LabelMap,
    set: &EncodedSet,
    batch_size: usize,
) -> Result<Vec<Target>> {
    let logits = predict(
        model,
        &set.sequences,
        batch_size,
        RunOptions::default(),
        &ProgressBar::hidden(),
    )?;
    Ok(if task.is_regression() {
        logits.iter().map(|row| Target::Score(row[0])).collect()
    } else {
        (predicted_labels(&logits, map).into_iter())
            .map(Target::Class)
            .collect()
    })
}

/// Logits of every sequence, run in the given `batches` of indices.
pub fn predict_batches(
    model: &Model,
    sequences: &[Sequence],
    batches: Vec<Vec<usize>>,
    opts: RunOptions,
    progress: &ProgressBar,
) -> Result<Vec<Vec<f32>>> {
    let mut logits = vec![Vec::new(); sequences.len()];
    for (number, batch) in batches.into_iter().enumerate() {
        let seqs: Vec<&Sequence> = batch.iter().map(|&i| &sequences[i]).collect();
        let inputs = Inputs::from_sequences(&model.config, &seqs)?;
        let out = finite_rows(&model.forward(&inputs, opts)?, "evaluation", number)?;
        for (i, row) in batch.into_iter().zip(out) {
            logits[i] = row;
        }
        progress.inc(seqs.len() as u64);
    }
    Ok(logits)
}

/// The rows of one batch's logits, or an error naming `stage` and the batch when any is NaN or
/// infinite: no metric, loss or decision is taken on such numbers.
pub fn finite_rows(logits: &Tensor, stage: &str, batch: usize) -> Result<Vec<Vec<f32>>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let bad = rows.iter().flatten().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!(
            "{stage}: batch {batch} gave {bad} NaN or infinite logits, so no result is written; the weights or activations are not finite (loaded without --allow-nonfinite, the checkpoint's non-finite tensors are named)"
        );
    }
    Ok(rows)
}

/// Metrics and mean loss of a set of predictions.
#[derive(Debug, Clone, PartialEq)]
pub struct LossAndMetrics {
    /// Named metrics (e.g. `accuracy`, `f1`, `mcc`, `pearson`, `spearman`).
    pub metrics: Vec<(String, f64)>,
    /// Mean cross-entropy (classification) or mean squared error (regression).
    pub loss: f64,
}

impl LossAndMetrics {
    /// The value of metric `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

/// Predicted task label for each logit row (argmax through the label map); first max wins.
pub fn predicted_labels(logits: &[Vec<f32>], map: &LabelMap) -> Vec<usize> {
    logits.iter().map(|row| predicted_label(row, map)).collect()
}

/// Predicted task label of one logit row (argmax through the label map; first max wins).
pub fn predicted_label(row: &[f32], map: &LabelMap) -> usize {
    let best = row
        .iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
    map.model_to_task[best]
}

/// Scores logits against gold targets for `task`.
pub fn score(
    task: Task,
    map: &LabelMap,
    logits: &[Vec<f32>],
    targets: &[Target],
) -> LossAndMetrics {
    let loss = logits
        .iter()
        .zip(targets)
        .map(|(row, t)| example_loss(map, row, t))
        .sum::<f64>()
        / targets.len().max(1) as f64;
    let predictions: Vec<f32> = if task.is_regression() {
        logits.iter().map(|r| r[0]).collect()
    } else {
        predicted_labels(logits, map)
            .into_iter()
            .map(|p| p as f32)
            .collect()
    };
    LossAndMetrics {
        metrics: metrics(task, &predictions, targets),
        loss,
    }
}

/// Loss of one example: cross-entropy of the gold label's model output, or squared error.
pub fn example_loss(map: &LabelMap, row: &[f32], target: &Target) -> f64 {
    match target {
        Target::Class(c) => cross_entropy(row, map.model_index(*c)),
        Target::Score(s) => (f64::from(row[0]) - f64::from(*s)).powi(2),
    }
}

/// Task metrics from predictions: task label indices (as f32) for classification, scores for
/// regression.
pub fn metrics(task: Task, predictions: &[f32], targets: &[Target]) -> Vec<(String, f64)> {
    let gold = |t: &Target| match t {
        Target::Class(c) => *c as f64,
        Target::Score(s) => f64::from(*s),
    };
    if task.is_regression() {
        let pred: Vec<f64> = predictions.iter().map(|&p| f64::from(p)).collect();
        let gold: Vec<f64> = targets.iter().map(gold).collect();
        return vec![
            ("pearson".into(), metric::pearson(&pred, &gold)),
            ("spearman".into(), metric::spearman(&pred, &gold)),
        ];
    }
    let pred: Vec<usize> = predictions.iter().map(|&p| p as usize).collect();
    let gold: Vec<usize> = targets.iter().map(|t| gold(t) as usize).collect();
    let accuracy = ("accuracy".to_string(), metric::accuracy(&pred, &gold));
    match task {
        Task::Cola => vec![("mcc".into(), metric::mcc(&pred, &gold)), accuracy],
        Task::Mrpc | Task::Qqp => vec![("f1".into(), metric::f1(&pred, &gold)), accuracy],
        _ => vec![accuracy],
    }
}

/// `-log softmax(row)[target]`, computed stably in f64.
pub fn cross_entropy(row: &[f32], target: usize) -> f64 {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let lse = row
        .iter()
        .map(|&v| (f64::from(v) - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - f64::from(row[target])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_of_uniform_is_log_n() {
        assert!((cross_entropy(&[0.0, 0.0, 0.0], 1) - 3f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn scores_through_a_label_map() {
        let map = LabelMap {
            model_to_task: vec![1, 0],
        };
        let logits = vec![vec![2.0, 0.0], vec![0.0, 2.0]];
        let targets = [Target::Class(1), Target::Class(1)];
        let s = score(Task::Sst2, &map, &logits, &targets);
        assert_eq!(s.get("accuracy"), Some(0.5));
        assert_eq!(predicted_labels(&logits, &map), vec![1, 0]);
    }
}
