//! Logits → per-example losses, predictions, correctness and the task's metrics.

use crate::data::glue::Target;
use crate::data::labels::LabelMap;
use crate::data::task::Task;
use crate::evaluate::{self, example_loss, predicted_label, LossAndMetrics};

/// Turns logits rows into per-example losses, predictions and metrics for a task.
#[derive(Clone)]
pub struct Scorer<'a> {
    task: Task,
    labels: &'a LabelMap,
    targets: &'a [Target],
}

impl<'a> Scorer<'a> {
    /// A scorer for `targets` (in analysis-data order).
    pub fn new(task: Task, labels: &'a LabelMap, targets: &'a [Target]) -> Self {
        Scorer {
            task,
            labels,
            targets,
        }
    }

    /// Model outputs → task labels.
    pub fn labels(&self) -> &'a LabelMap {
        self.labels
    }

    /// Loss of example `ex` given its logits.
    pub fn example_loss(&self, row: &[f32], ex: usize) -> f64 {
        example_loss(self.labels, row, &self.targets[ex])
    }

    /// Prediction from logits: task label index, or the score for regression.
    pub fn prediction(&self, row: &[f32]) -> f32 {
        if self.task.is_regression() {
            row[0]
        } else {
            predicted_label(row, self.labels) as f32
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// True for classification tasks (predictions are labels).
    pub fn is_classification(&self) -> bool {
        !self.task.is_regression()
    }

    /// True when the logits predict example `ex`'s gold label (always false for regression).
    pub fn is_correct(&self, row: &[f32], ex: usize) -> bool {
        match self.targets[ex] {
            Target::Class(c) => predicted_label(row, self.labels) == c,
            Target::Score(_) => false,
        }
    }

    /// Mean loss and metrics from a loss sum and per-example predictions.
    pub fn scores(&self, loss_sum: f64, predictions: &[f32]) -> LossAndMetrics {
        LossAndMetrics {
            metrics: evaluate::metrics(self.task, predictions, self.targets),
            loss: loss_sum / self.targets.len().max(1) as f64,
        }
    }
}
