//! How a run's decisions held: the original and the compressed model on the selection split, the
//! report split, the whole dev split and an optional test file, with the predictions that
//! flipped. Parts of dev reuse the dev predictions instead of running the models again.

use std::collections::BTreeMap;

use anyhow::Result;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::data::batch::EncodedSet;
use crate::data::glue::Target;
use crate::data::labels::LabelMap;
use crate::data::splits::{Part, Splits};
use crate::data::task::Task;
use crate::evaluate::{predict, predicted_labels, score};
use crate::model::encoder::RunOptions;
use crate::model::Model;
use crate::scoring::guard::{drop_bound, z_one_sided, Paired};

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
    /// `selection`, `report`, `dev`, `check` or `test`.
    pub split: &'static str,
    /// Examples in the split.
    pub examples: usize,
    /// The original model.
    pub before: SetScores,
    /// The compressed model.
    pub after: SetScores,
    /// Examples whose predicted label changed (classification only).
    pub flipped: Option<usize>,
    /// Classification: the accuracy drop from the original to the compressed model with its
    /// paired standard error and interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired: Option<PairedDrop>,
    /// A split that may vouch for `max_drop` ([`Judge::compare`]: the check split, and the report
    /// split under an accuracy metric): the one-sided upper bound of the paired drop at
    /// `bound_confidence`, in points. On the check split, labelled by the original, it bounds the
    /// share of predictions that changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_points: Option<f64>,
    /// The confidence of `bound_points`: the run's, shared among the splits that may vouch
    /// (Bonferroni), so that the run vouches falsely at most `1 − confidence` of the time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_confidence: Option<f64>,
}

/// The accuracy drop on one split from paired outcomes ([`Paired`]), in points (positive: lost).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedDrop {
    /// Examples the original got right and the compressed model gets wrong.
    pub lost: usize,
    /// Examples the original got wrong and the compressed model gets right.
    pub gained: usize,
    /// The drop, in points.
    pub drop_points: f64,
    /// Its paired standard error (McNemar's), in points.
    pub standard_error_points: f64,
    /// Its two-sided interval at `confidence`, in points.
    pub interval_points: [f64; 2],
    /// The interval's confidence.
    pub confidence: f64,
}

impl PairedDrop {
    /// The drop of `paired`, with its interval at `confidence`.
    pub fn new(paired: Paired, confidence: f64) -> Self {
        PairedDrop {
            lost: paired.lost,
            gained: paired.gained,
            drop_points: paired.drop() * 100.0,
            standard_error_points: paired.standard_error() * 100.0,
            interval_points: paired.interval(confidence).map(|x| x * 100.0),
            confidence,
        }
    }

    /// True when the interval reaches beyond a drop of `max_drop_points`.
    pub fn may_exceed(&self, max_drop_points: f64) -> bool {
        self.interval_points[1] > max_drop_points
    }
}

/// A model and the run's data as its tokenizer encodes it.
pub struct ModelOnData<'a> {
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
    /// Confidence of the paired intervals.
    pub confidence: f64,
}

impl Judge<'_> {
    /// Compares `before` and `after` on every split and on the test data.
    pub fn compare(&self, before: &ModelOnData, after: &ModelOnData) -> Result<Vec<Comparison>> {
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
        if let (Some(cb), Some(ca)) = (&b.check, &a.check) {
            let logits = [
                self.logits(before.model, &cb.set)?,
                self.logits(after.model, &ca.set)?,
            ];
            out.push(self.comparison("check", &cb.set, &logits));
        }
        if let (Some(tb), Some(ta)) = (before.test, after.test) {
            let logits = [
                self.logits(before.model, tb)?,
                self.logits(after.model, ta)?,
            ];
            out.push(self.comparison("test", tb, &logits));
        }
        self.bound_witnesses(&mut out);
        Ok(out)
    }

    /// True when `split` may vouch for `max_drop`: data no decision saw, paired against the
    /// original under the metric the allowance is in. The check split is labelled by the
    /// original, so its paired drop is the share of predictions that changed, which bounds an
    /// accuracy drop from above; the report split is gold-labelled, and vouches under an
    /// accuracy metric. (`test` is the user's own, and only reported.)
    fn may_vouch(&self, c: &Comparison) -> bool {
        c.paired.is_some()
            && match c.split {
                "check" => true,
                "report" => self.task.primary_metric() == "accuracy",
                _ => false,
            }
    }

    /// Bounds the drop on every split that may vouch, each at the run's confidence shared among
    /// them, so that a run vouched for by any one of them is wrong at most `1 − confidence` of
    /// the time. Gains count: no decision chose these examples (see [`crate::scoring::guard`]).
    fn bound_witnesses(&self, out: &mut [Comparison]) {
        let vouches: Vec<bool> = out.iter().map(|c| self.may_vouch(c)).collect();
        let witnesses = vouches.iter().filter(|&&v| v).count();
        let confidence = 1.0 - (1.0 - self.confidence) / witnesses.max(1) as f64;
        let z = z_one_sided(confidence);
        for (c, _) in out.iter_mut().zip(vouches).filter(|(_, v)| *v) {
            let Some(p) = &c.paired else { continue };
            let bound = drop_bound(p.lost, p.gained, z) / c.examples.max(1) as f64 * 100.0;
            c.bound_points = Some(bound);
            c.bound_confidence = Some(confidence);
        }
    }

    /// A part of dev takes its rows of the dev logits; other data is run.
    fn part(
        &self,
        name: &'static str,
        parts: [&Part; 2],
        dev: &[Vec<Vec<f32>>; 2],
        before: &ModelOnData,
        after: &ModelOnData,
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
        let predicted = (!self.task.is_regression())
            .then(|| [&logits[0], &logits[1]].map(|l| predicted_labels(l, self.labels)));
        let flipped = predicted
            .as_ref()
            .map(|[a, b]| a.iter().zip(b).filter(|(x, y)| x != y).count());
        let paired = predicted.map(|[a, b]| {
            let right = |p: &[usize]| -> Vec<bool> {
                p.iter()
                    .zip(&set.targets)
                    .map(|(&p, t)| matches!(t, Target::Class(c) if *c == p))
                    .collect()
            };
            PairedDrop::new(Paired::of(&right(&a), &right(&b)), self.confidence)
        });
        Comparison {
            split,
            examples: set.sequences.len(),
            before: scores(&logits[0]),
            after: scores(&logits[1]),
            flipped,
            paired,
            bound_points: None,
            bound_confidence: None,
        }
    }
}
