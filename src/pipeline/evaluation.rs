//! How a run's decisions held: the original and the compressed model on the selection split, the
//! report split, the whole dev split and an optional test file, with the predictions that
//! flipped. Parts of dev reuse the dev predictions instead of running the models again.

use std::collections::BTreeMap;

use anyhow::Result;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::data::batch::EncodedSet;
use crate::data::labels::LabelMap;
use crate::data::splits::{Part, Splits};
use crate::data::task::Task;
use crate::evaluate::{predict, predicted_labels, score};
use crate::model::encoder::RunOptions;
use crate::model::Model;

/// Metrics and loss of one model on one split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetScores {
    /// Named metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Mean loss.
    pub loss: f64,
}

/// One split, before and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// `selection`, `report`, `dev` or `test`.
    pub split: &'static str,
    /// Examples in the split.
    pub examples: usize,
    /// The original model.
    pub before: SetScores,
    /// The compressed model.
    pub after: SetScores,
    /// Examples whose predicted label changed (classification only).
    pub flipped: Option<usize>,
}

/// A model and the run's data as its tokenizer encodes it.
pub struct Subject<'a> {
    /// The model.
    pub model: &'a Model,
    /// Selection, report and dev.
    pub splits: &'a Splits,
    /// `--test` data.
    pub test: Option<&'a EncodedSet>,
}

/// The models and the task they are compared on.
pub struct Judge<'a> {
    /// The task.
    pub task: Task,
    /// Model outputs → task labels.
    pub labels: &'a LabelMap,
    /// Sentences per batch.
    pub batch_size: usize,
}

impl Judge<'_> {
    /// Compares `before` and `after` on every split and on the test data.
    pub fn compare(&self, before: &Subject, after: &Subject) -> Result<Vec<Comparison>> {
        let dev = [
            self.logits(before.model, &before.splits.dev)?,
            self.logits(after.model, &after.splits.dev)?,
        ];
        let (b, a) = (before.splits, after.splits);
        let mut out = vec![self.part(
            "selection",
            [&b.selection, &a.selection],
            &dev,
            before,
            after,
        )?];
        if let (Some(rb), Some(ra)) = (&b.report, &a.report) {
            out.push(self.part("report", [rb, ra], &dev, before, after)?);
        }
        out.push(self.comparison("dev", &b.dev, &dev));
        if let (Some(tb), Some(ta)) = (before.test, after.test) {
            let logits = [
                self.logits(before.model, tb)?,
                self.logits(after.model, ta)?,
            ];
            out.push(self.comparison("test", tb, &logits));
        }
        Ok(out)
    }

    /// A part of dev takes its rows of the dev logits; other data is run.
    fn part(
        &self,
        name: &'static str,
        parts: [&Part; 2],
        dev: &[Vec<Vec<f32>>; 2],
        before: &Subject,
        after: &Subject,
    ) -> Result<Comparison> {
        let logits = match &parts[0].dev_indices {
            Some(idx) => [&dev[0], &dev[1]].map(|l| idx.iter().map(|&i| l[i].clone()).collect()),
            None => [
                self.logits(before.model, &parts[0].set)?,
                self.logits(after.model, &parts[1].set)?,
            ],
        };
        Ok(self.comparison(name, &parts[0].set, &logits))
    }

    fn logits(&self, model: &Model, set: &EncodedSet) -> Result<Vec<Vec<f32>>> {
        predict(
            model,
            &set.sequences,
            self.batch_size,
            RunOptions::default(),
            &ProgressBar::hidden(),
        )
    }

    fn comparison(
        &self,
        split: &'static str,
        set: &EncodedSet,
        logits: &[Vec<Vec<f32>>; 2],
    ) -> Comparison {
        let scores = |l: &[Vec<f32>]| {
            let s = score(self.task, self.labels, l, &set.targets);
            SetScores {
                metrics: s.metrics.into_iter().collect(),
                loss: s.loss,
            }
        };
        let flipped = (!self.task.is_regression()).then(|| {
            let [a, b] = [&logits[0], &logits[1]].map(|l| predicted_labels(l, self.labels));
            a.iter().zip(&b).filter(|(x, y)| x != y).count()
        });
        Comparison {
            split,
            examples: set.sequences.len(),
            before: scores(&logits[0]),
            after: scores(&logits[1]),
            flipped,
        }
    }
}
