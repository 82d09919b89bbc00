//! The selection engine every pass shares. It holds the accepted model (and its gates) with the
//! hidden states entering every layer cached for each selection batch. A pass proposes a
//! [`Trial`] — the accepted model with gates changed, a layer replaced or a layer's mode changed,
//! differing from the accepted one only from layer `layer` on — and the engine re-evaluates the
//! selection data from that layer on, answers accept or reject by a [`Rule`], and on acceptance
//! makes the trial the accepted model (its caches are refreshed lazily, before the next
//! evaluation). Every decision goes through the [`Journal`], so an interrupted run replays its
//! decisions instead of recomputing them.
//!
//! The cache is bounded: batches past `AXCOMPRESS_CACHE_MB` (default 4096) of cached states are
//! run from the embeddings at each evaluation instead, so a large selection set costs time, not
//! memory.
//!
//! Under an accuracy metric an evaluation stops as soon as the errors already made rule out
//! acceptance: the verdict is the same as a full evaluation's, at a fraction of the cost.

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::journal::{Journal, TrialRecord};
use crate::analyze::{batches, AnalysisBatch, Scorer};
use crate::data::batch::EncodedSet;
use crate::data::labels::LabelMap;
use crate::data::task::Task;
use crate::evaluate::finite_rows;
use crate::model::encoder::{Gates, RunOptions};
use crate::model::Model;

/// Loss and primary metric on the selection data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Mean loss.
    pub loss: f64,
    /// Primary metric.
    pub metric: f64,
}

/// When a trial is accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The selection metric must not drop below the accepted model's (on a tie, the loss must
    /// not rise).
    NotWorse,
    /// The selection metric must stay at or above this floor.
    AtLeast(f64),
}

impl Rule {
    /// Whether `trial` is acceptable when the accepted model scores `current`.
    pub fn admits(self, trial: Score, current: Score) -> bool {
        match self {
            Rule::NotWorse => {
                trial.metric > current.metric
                    || (trial.metric == current.metric && trial.loss <= current.loss)
            }
            Rule::AtLeast(floor) => trial.metric >= floor,
        }
    }

    /// The fewest correct predictions out of `n` that can still be accepted under an accuracy
    /// metric (`n + 1` when none can).
    fn min_correct(self, n: usize, current: Score) -> usize {
        let floor = match self {
            Rule::NotWorse => current.metric,
            Rule::AtLeast(floor) => floor,
        };
        (0..=n)
            .find(|&c| c as f64 / n as f64 >= floor)
            .unwrap_or(n + 1)
    }
}

/// A tentative change: the accepted model with something changed from layer `layer` on.
pub struct Trial {
    /// First layer whose computation differs from the accepted model's; `None` when the
    /// embeddings differ.
    pub layer: Option<usize>,
    /// The changed model, or `None` when only the gates change.
    pub model: Option<Model>,
    /// The gates to run with.
    pub gates: Option<Gates>,
    /// A short name for the change (journal and reports), e.g. `L3.H5`.
    pub label: String,
}

/// What the engine decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// True when the change was kept.
    pub accepted: bool,
    /// The selection score with the change, when the evaluation ran to the end.
    pub score: Option<Score>,
    /// True when the verdict came from the journal of an interrupted run.
    pub replayed: bool,
}

/// The selection data, batched, and how to score it.
pub struct SelectionBatches<'a> {
    /// Length-bucketed batches.
    pub batches: Vec<AnalysisBatch>,
    /// Logits → loss, predictions, metrics.
    pub scorer: Scorer<'a>,
    /// Name of the primary metric decisions use.
    pub metric: &'static str,
}

impl<'a> SelectionBatches<'a> {
    /// Batches `set` for `model` and scores it for `task` with the task's primary metric.
    pub fn new(
        model: &Model,
        set: &'a EncodedSet,
        task: Task,
        labels: &'a LabelMap,
        batch_size: usize,
    ) -> Result<Self> {
        Ok(SelectionBatches {
            batches: batches(model, set, labels, batch_size)?,
            scorer: Scorer::new(task, labels, &set.targets),
            metric: task.primary_metric(),
        })
    }

    /// The score of `model` from a plain forward pass (no caches).
    pub fn score(&self, model: &Model) -> Result<Score> {
        let mut tally = Tally::new(self);
        for (number, batch) in self.batches.iter().enumerate() {
            let logits = model.forward(&batch.inputs, RunOptions::default())?;
            tally.add(&finite_rows(&logits, "selection", number)?, &batch.examples);
        }
        Ok(tally.score())
    }
}

/// Per-example results accumulated over batches.
struct Tally<'s> {
    data: &'s SelectionBatches<'s>,
    predictions: Vec<f32>,
    loss_sum: f64,
    errors: usize,
}

impl<'s> Tally<'s> {
    fn new(data: &'s SelectionBatches<'s>) -> Self {
        Tally {
            data,
            predictions: vec![0f32; data.scorer.len()],
            loss_sum: 0.0,
            errors: 0,
        }
    }

    /// Adds the logits of a batch whose rows are `examples`.
    fn add(&mut self, logits: &[Vec<f32>], examples: &[usize]) {
        let scorer = &self.data.scorer;
        for (row, &ex) in logits.iter().zip(examples) {
            self.loss_sum += scorer.example_loss(row, ex);
            self.predictions[ex] = scorer.prediction(row);
            self.errors += usize::from(!scorer.is_correct(row, ex));
        }
    }

    fn score(&self) -> Score {
        let s = self.data.scorer.scores(self.loss_sum, &self.predictions);
        Score {
            loss: s.loss,
            metric: s.get(self.data.metric).unwrap_or(f64::NAN),
        }
    }
}

/// The accepted model with its cached hidden states.
pub struct Engine<'a> {
    data: &'a SelectionBatches<'a>,
    model: Model,
    gates: Option<Gates>,
    /// `cache[b][l]`: hidden states of batch `b` entering layer `l`; empty for the batches past
    /// the cache budget.
    cache: Vec<Vec<Tensor>>,
    /// Where the cache stops matching the accepted model: `Some(None)` from the embeddings on,
    /// `Some(Some(l))` from layer `l` on, `None` nowhere.
    stale_from: Option<Option<usize>>,
    score: Score,
    evaluations: usize,
}

impl<'a> Engine<'a> {
    /// Caches `model`'s hidden states on the selection data and scores it.
    pub fn new(model: Model, data: &'a SelectionBatches<'a>) -> Result<Self> {
        let cached = cached_batches(&data.batches, &model, cache_budget()?);
        let cache = data
            .batches
            .iter()
            .take(cached)
            .map(|b| Ok(vec![model.embed(&b.inputs, false)?]))
            .chain((cached..data.batches.len()).map(|_| Ok(Vec::new())))
            .collect::<Result<_>>()?;
        let mut engine = Engine {
            data,
            model,
            gates: None,
            cache,
            stale_from: Some(Some(0)),
            score: Score {
                loss: f64::NAN,
                metric: f64::NAN,
            },
            evaluations: 0,
        };
        engine.refresh()?;
        engine.score = engine
            .evaluate(Some(0), None, None, None)?
            .expect("no early stop");
        Ok(engine)
    }

    /// The accepted model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The accepted model's selection score.
    pub fn score(&self) -> Score {
        self.score
    }

    /// Trials evaluated so far (replayed ones excluded).
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// The accepted model and gates.
    pub fn into_parts(self) -> (Model, Option<Gates>) {
        (self.model, self.gates)
    }

    /// Decides `trial` by `rule`: replayed from the journal when it holds this decision,
    /// otherwise evaluated (and recorded).
    pub fn decide(&mut self, trial: Trial, rule: Rule, journal: &mut Journal) -> Result<Verdict> {
        if let Some(record) = journal.replay(&trial.label)? {
            if record.accepted {
                let score = record
                    .score
                    .context("the saved progress holds an accepted trial without a score")?;
                self.accept(trial, score);
            }
            return Ok(Verdict {
                accepted: record.accepted,
                score: record.score,
                replayed: true,
            });
        }
        self.refresh()?;
        self.evaluations += 1;
        let score = self.evaluate(
            trial.layer,
            trial.model.as_ref(),
            trial.gates.as_ref(),
            Some(rule),
        )?;
        let accepted = score.is_some_and(|s| rule.admits(s, self.score));
        journal.record(TrialRecord {
            label: trial.label.clone(),
            accepted,
            score,
        })?;
        if accepted {
            self.accept(trial, score.expect("accepted"));
        }
        Ok(Verdict {
            accepted,
            score,
            replayed: false,
        })
    }

    /// The selection score of `trial`, evaluated in full but neither decided nor journaled (for
    /// ranking candidates).
    pub fn measure(&mut self, trial: &Trial) -> Result<Score> {
        self.refresh()?;
        let model = trial.model.as_ref();
        let score = self.evaluate(trial.layer, model, trial.gates.as_ref(), None)?;
        Ok(score.expect("no rule, so no early stop"))
    }

    fn accept(&mut self, trial: Trial, score: Score) {
        if let Some(model) = trial.model {
            self.model = model;
        }
        self.gates = trial.gates;
        self.score = score;
        // `None` (the embeddings) orders before every layer.
        self.stale_from = Some(self.stale_from.map_or(trial.layer, |s| s.min(trial.layer)));
    }

    /// The accepted model's hidden states entering `layer`, per batch.
    pub fn states_entering(&mut self, layer: usize) -> Result<Vec<Tensor>> {
        self.refresh()?;
        (0..self.cache.len())
            .map(|b| self.entering(b, layer))
            .collect()
    }

    /// The accepted model's hidden states of batch `b` entering `layer`: from the cache (which
    /// must be fresh), or computed from the embeddings for a batch past the cache budget.
    fn entering(&self, b: usize, layer: usize) -> Result<Tensor> {
        if let Some(states) = self.cache[b].get(layer) {
            return Ok(states.clone());
        }
        let opts = RunOptions {
            gates: self.gates.as_ref(),
            differentiable: false,
        };
        let inputs = &self.data.batches[b].inputs;
        let embedded = self.model.embed(inputs, false)?;
        self.model.run_layers(&embedded, inputs, 0..layer, opts)
    }

    /// Recomputes the cached states from the first stale layer on.
    fn refresh(&mut self) -> Result<()> {
        let Some(from) = self.stale_from.take() else {
            return Ok(());
        };
        let opts = RunOptions {
            gates: self.gates.as_ref(),
            differentiable: false,
        };
        let last = self.model.num_layers().saturating_sub(1);
        let cached = self.cache.iter_mut().filter(|c| !c.is_empty());
        for (batch, cache) in self.data.batches.iter().zip(cached) {
            if from.is_none() {
                cache[0] = self.model.embed(&batch.inputs, false)?;
            }
            let from = from.unwrap_or(0);
            cache.truncate(from + 1);
            for l in from..last {
                let next = self
                    .model
                    .run_layers(&cache[l], &batch.inputs, l..l + 1, opts)?;
                cache.push(next);
            }
        }
        Ok(())
    }

    /// Scores `model` (default: the accepted one) run with `gates` from layer `from` on (from
    /// the embeddings when `None`); `None` when, under an accuracy metric, the errors made rule
    /// out acceptance by `rule`.
    fn evaluate(
        &self,
        from: Option<usize>,
        model: Option<&Model>,
        gates: Option<&Gates>,
        rule: Option<Rule>,
    ) -> Result<Option<Score>> {
        let model = model.unwrap_or(&self.model);
        let opts = RunOptions {
            gates,
            differentiable: false,
        };
        let total = self.data.scorer.len();
        let max_errors = match rule.filter(|_| self.early_stop_applies()) {
            None => total,
            Some(r) => match total.checked_sub(r.min_correct(total, self.score)) {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        let mut tally = Tally::new(self.data);
        for (number, batch) in self.data.batches.iter().enumerate() {
            let logits = match from {
                Some(l) => model.logits_from(
                    &self.entering(number, l)?,
                    &batch.inputs.mask_bias,
                    l,
                    opts,
                )?,
                None => model.forward(&batch.inputs, opts)?,
            };
            tally.add(&finite_rows(&logits, "selection", number)?, &batch.examples);
            if tally.errors > max_errors {
                return Ok(None);
            }
        }
        Ok(Some(tally.score()))
    }

    /// Early stopping needs a metric that only counts errors: accuracy of a classifier.
    fn early_stop_applies(&self) -> bool {
        self.data.metric == "accuracy" && self.data.scorer.is_classification()
    }
}

/// Bytes of hidden states the engine may cache: `AXCOMPRESS_CACHE_MB` MiB, 4096 by default.
pub(super) fn cache_budget() -> Result<usize> {
    let Ok(value) = std::env::var("AXCOMPRESS_CACHE_MB") else {
        return Ok(4096 << 20);
    };
    let mb: usize = value.trim().parse().with_context(|| {
        format!("AXCOMPRESS_CACHE_MB={value:?} is not a number of MiB; unset it or use e.g. 4096")
    })?;
    Ok(mb.saturating_mul(1 << 20))
}

/// How many leading `batches` have their states entering every layer of `model` within `budget`
/// bytes.
pub(super) fn cached_batches(batches: &[AnalysisBatch], model: &Model, budget: usize) -> usize {
    let bytes_per_token = model.config.hidden_size * 4 * model.num_layers().max(1);
    let mut used = 0usize;
    batches
        .iter()
        .take_while(|b| {
            used += b.inputs.input_ids.elem_count() * bytes_per_token;
            used <= budget
        })
        .count()
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::metric::accuracy;

    /// The accuracy the scorer reports for `correct` hits out of `n`.
    fn metric(correct: usize, n: usize) -> f64 {
        let gold = vec![1usize; n];
        let pred: Vec<usize> = (0..n).map(|i| usize::from(i < correct)).collect();
        accuracy(&pred, &gold)
    }

    #[test]
    fn early_rejection_never_rejects_what_full_evaluation_accepts() {
        for n in 1..=160 {
            for current_correct in 0..=n {
                let current = Score {
                    loss: 0.5,
                    metric: metric(current_correct, n),
                };
                let floors = [
                    current.metric,
                    current.metric - 0.01,
                    current.metric - 1e-12,
                ];
                let rules = floors
                    .map(Rule::AtLeast)
                    .into_iter()
                    .chain([Rule::NotWorse]);
                for rule in rules {
                    let min = rule.min_correct(n, current);
                    for correct in 0..=n {
                        // Full evaluation's verdict, at the lowest possible loss.
                        let trial = Score {
                            loss: 0.0,
                            metric: metric(correct, n),
                        };
                        // Early stopping rejects once errors exceed n - min.
                        let cut_short = n - correct > n.saturating_sub(min) || min > n;
                        assert!(
                            !(rule.admits(trial, current) && cut_short),
                            "n={n} correct={correct} rule={rule:?} min={min}"
                        );
                        // And it is exact: whatever it lets through to the end can pass.
                        if !cut_short {
                            assert!(rule.admits(trial, current), "n={n} {correct} {rule:?}");
                        }
                    }
                }
            }
        }
    }
}
