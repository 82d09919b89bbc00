//! The selection engine every pass shares. It holds the accepted model (and its gates) with the
//! hidden states entering every layer cached for each selection batch. A pass proposes a
//! [`Trial`] — the accepted model with gates changed, a layer replaced or a layer's mode changed,
//! differing from the accepted one only from layer `layer` on — and the engine re-evaluates the
//! selection data from that layer on, answers accept or reject by a [`Rule`], and on acceptance
//! makes the trial the accepted model (its caches are refreshed lazily, before the next
//! evaluation). Every decision goes through the [`Journal`], so an interrupted run replays its
//! decisions instead of recomputing them.
//!
//! The cache is bounded ([`crate::memory::cache_budget`]: from `--memory-limit`, or
//! `AXCOMPRESS_CACHE_MB`): batches past it are run from the embeddings at each evaluation instead, so a large selection set costs time, not
//! memory.
//!
//! Every floor is judged by the [`guard`](super::guard): under an accuracy metric the engine pairs
//! each example's outcome with the original model's and a trial must reach the floor with its
//! *guarded* metric, the one-sided lower confidence bound of its paired difference to the
//! original.
//!
//! Under an accuracy metric an evaluation stops as soon as the outcomes already seen rule out
//! acceptance: the verdict is the same as a full evaluation's, at a fraction of the cost.

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::journal::{Journal, TrialRecord};
use crate::data::batch::EncodedSet;
use crate::data::labels::LabelMap;
use crate::data::task::Task;
use crate::evaluate::finite_rows;
use crate::kernels::Ops;
use crate::memory;
use crate::model::encoder::{Gates, RunOptions};
use crate::model::Model;
use crate::scoring::batch::{batches, ScoringBatch};
use crate::scoring::guard::{decision_bound, z_one_sided};
use crate::scoring::score::{Rule, Score};
use crate::scoring::scorer::Scorer;

/// The guarded accuracy of a trial that lost `lost` and gained `gained` examples against an
/// original that got `original_correct` of `n` right: the original's accuracy less the bound a
/// decision keeps ([`decision_bound`]: under the guard, gains are not credited); the value a floor
/// is judged by.
fn guarded_accuracy(original_correct: usize, lost: usize, gained: usize, n: usize, z: f64) -> f64 {
    (original_correct as f64 - decision_bound(lost, gained, z)) / n.max(1) as f64
}

/// What an evaluation under way has seen of the paired outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Seen {
    /// Examples.
    n: usize,
    /// Examples the original got right.
    original_correct: usize,
    /// Right under the original, wrong under the trial, so far.
    lost: usize,
    /// Wrong under the original, right under the trial, so far.
    gained: usize,
    /// Examples the original got wrong that are not seen yet.
    original_wrong_left: usize,
}

impl Seen {
    /// True when no completion of the evaluation can reach `floor` with its guarded metric.
    /// The guarded metric falls as `lost` grows, so the best completion keeps `lost` as it is;
    /// every count of further gains is tried: the test is exact.
    fn rules_out(&self, floor: f64, z: f64) -> bool {
        let gains = self.gained..=self.gained + self.original_wrong_left;
        !gains
            .map(|g| guarded_accuracy(self.original_correct, self.lost, g, self.n, z))
            .any(|best| best >= floor - 1e-12)
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
    pub batches: Vec<ScoringBatch>,
    /// Logits → loss, predictions, metrics.
    pub scorer: Scorer<'a>,
    /// Name of the primary metric decisions use.
    pub metric: &'static str,
    /// The original model's score, paired with itself.
    pub baseline: Score,
    /// Under an accuracy metric: which examples the original model gets right (the guard pairs
    /// every trial's outcomes with these).
    reference: Option<Vec<bool>>,
    /// The guard's one-sided normal quantile.
    z: f64,
}

impl<'a> SelectionBatches<'a> {
    /// Batches `set` for the `original` model, scores it for `task` with the task's primary
    /// metric, and pairs later scores with its outcomes at `confidence` (see [`super::guard`]).
    pub fn new(
        original: &Model,
        set: &'a EncodedSet,
        task: Task,
        labels: &'a LabelMap,
        batch_size: usize,
        confidence: f64,
    ) -> Result<Self> {
        let mut data = SelectionBatches {
            batches: batches(original, set, labels, batch_size)?,
            scorer: Scorer::new(task, labels, &set.targets),
            metric: task.primary_metric(),
            baseline: Score::point(f64::NAN, f64::NAN),
            reference: None,
            z: z_one_sided(confidence),
        };
        let (score, correct) = {
            let tally = data.run(original)?;
            (tally.score(), tally.correct)
        };
        data.baseline = score;
        if data.metric == "accuracy" && data.scorer.is_classification() {
            let right = correct.iter().filter(|&&c| c).count();
            data.baseline = Score {
                discordant: Some(0),
                guarded: Some(guarded_accuracy(right, 0, 0, data.len(), data.z)),
                ..score
            };
            data.reference = Some(correct);
        }
        Ok(data)
    }

    /// The same examples encoded anew by a changed tokenizer (`set`, in the same order, e.g.
    /// after vocabulary pruning), batched for `model` and paired with the original's outcomes.
    pub fn encoded_anew(
        &self,
        model: &Model,
        set: &EncodedSet,
        batch_size: usize,
    ) -> Result<SelectionBatches<'a>> {
        Ok(SelectionBatches {
            batches: batches(model, set, self.scorer.labels(), batch_size)?,
            scorer: self.scorer.clone(),
            metric: self.metric,
            baseline: self.baseline,
            reference: self.reference.clone(),
            z: self.z,
        })
    }

    /// Examples.
    pub fn len(&self) -> usize {
        self.scorer.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.scorer.is_empty()
    }

    /// The score of `model` from a plain forward pass (no caches), paired with the original's.
    pub fn score(&self, model: &Model) -> Result<Score> {
        Ok(self.run(model)?.score())
    }

    /// The tally of `model` from a plain forward pass.
    fn run(&self, model: &Model) -> Result<Tally<'_>> {
        let mut tally = Tally::new(self);
        for (number, batch) in self.batches.iter().enumerate() {
            let logits = model.forward(&batch.inputs, RunOptions::default())?;
            tally.add(&finite_rows(&logits, "selection", number)?, &batch.examples);
        }
        Ok(tally)
    }
}

/// Per-example results accumulated over batches.
struct Tally<'s> {
    data: &'s SelectionBatches<'s>,
    predictions: Vec<f32>,
    correct: Vec<bool>,
    loss_sum: f64,
    errors: usize,
    seen: Seen,
}

impl<'s> Tally<'s> {
    fn new(data: &'s SelectionBatches<'s>) -> Self {
        let n = data.scorer.len();
        let reference = data.reference.as_deref().unwrap_or_default();
        let original_correct = reference.iter().filter(|&&c| c).count();
        Tally {
            data,
            predictions: vec![0f32; n],
            correct: vec![false; n],
            loss_sum: 0.0,
            errors: 0,
            seen: Seen {
                n,
                original_correct,
                original_wrong_left: reference.len() - original_correct,
                ..Seen::default()
            },
        }
    }

    /// Adds the logits of a batch whose rows are `examples`.
    fn add(&mut self, logits: &[Vec<f32>], examples: &[usize]) {
        let scorer = &self.data.scorer;
        for (row, &ex) in logits.iter().zip(examples) {
            self.loss_sum += scorer.example_loss(row, ex);
            self.predictions[ex] = scorer.prediction(row);
            let correct = scorer.is_correct(row, ex);
            self.correct[ex] = correct;
            self.errors += usize::from(!correct);
            if let Some(reference) = &self.data.reference {
                let seen = &mut self.seen;
                match (reference[ex], correct) {
                    (true, false) => seen.lost += 1,
                    (false, true) => seen.gained += 1,
                    _ => {}
                }
                seen.original_wrong_left -= usize::from(!reference[ex]);
            }
        }
    }

    /// True when, under `rule` against `current`, no completion of this evaluation can be
    /// accepted (accuracy metrics only).
    fn rules_out(&self, rule: Rule, current: Score) -> bool {
        let n = self.data.scorer.len();
        let max_errors = n.checked_sub(rule.min_correct(n, current));
        let not_worse_lost = max_errors.is_none_or(|m| self.errors > m);
        let floor_lost = match (rule.floor(), &self.data.reference) {
            (Some(floor), Some(_)) => self.seen.rules_out(floor, self.data.z),
            _ => false,
        };
        not_worse_lost || floor_lost
    }

    fn score(&self) -> Score {
        let s = self.data.scorer.scores(self.loss_sum, &self.predictions);
        let metric = s.get(self.data.metric).unwrap_or(f64::NAN);
        match &self.data.reference {
            Some(_) => {
                let seen = &self.seen;
                let (correct, z) = (seen.original_correct, self.data.z);
                Score {
                    loss: s.loss,
                    metric,
                    discordant: Some(seen.lost + seen.gained),
                    guarded: Some(guarded_accuracy(correct, seen.lost, seen.gained, seen.n, z)),
                }
            }
            None => Score::point(s.loss, metric),
        }
    }
}

/// Where an engine's cached hidden states stop matching its accepted model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stale {
    /// They match it everywhere.
    Fresh,
    /// From the embeddings on.
    FromEmbeddings,
    /// From the states entering this layer on.
    FromLayer(usize),
}

impl Stale {
    /// The earlier of `self` and where a trial's model first differs (`None`: its embeddings).
    fn and_from(self, layer: Option<usize>) -> Stale {
        match (self, layer) {
            (Stale::FromEmbeddings, _) | (_, None) => Stale::FromEmbeddings,
            (Stale::Fresh, Some(l)) => Stale::FromLayer(l),
            (Stale::FromLayer(s), Some(l)) => Stale::FromLayer(s.min(l)),
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
    /// Where the cache stops matching the accepted model.
    stale: Stale,
    score: Score,
    evaluations: usize,
}

impl<'a> Engine<'a> {
    /// Caches `model`'s hidden states on the selection data and scores it.
    pub fn new(model: Model, data: &'a SelectionBatches<'a>) -> Result<Self> {
        let cached = cached_batches(&data.batches, &model, memory::cache_budget(&model)?);
        let cache = data
            .batches
            .iter()
            .take(cached)
            .map(|b| Ok(vec![model.embed(&b.inputs, Ops::Inference)?]))
            .chain((cached..data.batches.len()).map(|_| Ok(Vec::new())))
            .collect::<Result<_>>()?;
        let mut engine = Engine {
            data,
            model,
            gates: None,
            cache,
            stale: Stale::FromLayer(0),
            score: Score::point(f64::NAN, f64::NAN),
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
        self.stale = self.stale.and_from(trial.layer);
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
            ops: Ops::Inference,
        };
        let inputs = &self.data.batches[b].inputs;
        let embedded = self.model.embed(inputs, Ops::Inference)?;
        self.model.run_layers(&embedded, inputs, 0..layer, opts)
    }

    /// Recomputes the cached states from the first stale layer on.
    fn refresh(&mut self) -> Result<()> {
        let from = match std::mem::replace(&mut self.stale, Stale::Fresh) {
            Stale::Fresh => return Ok(()),
            Stale::FromEmbeddings => None,
            Stale::FromLayer(l) => Some(l),
        };
        let opts = RunOptions {
            gates: self.gates.as_ref(),
            ops: Ops::Inference,
        };
        let last = self.model.num_layers().saturating_sub(1);
        let cached = self.cache.iter_mut().filter(|c| !c.is_empty());
        for (batch, cache) in self.data.batches.iter().zip(cached) {
            if from.is_none() {
                cache[0] = self.model.embed(&batch.inputs, Ops::Inference)?;
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
            ops: Ops::Inference,
        };
        if let Some(r) = rule.filter(|_| self.early_stop_applies()) {
            if Tally::new(self.data).rules_out(r, self.score) {
                return Ok(None);
            }
        }
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
            if rule.is_some_and(|r| self.early_stop_applies() && tally.rules_out(r, self.score)) {
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

/// How many leading `batches` have their states entering every layer of `model` within `budget`
/// bytes.
pub(super) fn cached_batches(batches: &[ScoringBatch], model: &Model, budget: usize) -> usize {
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

    #[test]
    fn the_cache_goes_stale_from_the_earliest_difference() {
        assert_eq!(Stale::Fresh.and_from(Some(3)), Stale::FromLayer(3));
        assert_eq!(Stale::FromLayer(3).and_from(Some(1)), Stale::FromLayer(1));
        assert_eq!(Stale::FromLayer(1).and_from(Some(4)), Stale::FromLayer(1));
        assert_eq!(Stale::FromLayer(1).and_from(None), Stale::FromEmbeddings);
        assert_eq!(
            Stale::FromEmbeddings.and_from(Some(0)),
            Stale::FromEmbeddings
        );
    }
    use crate::data::metric::accuracy;

    /// The accuracy the scorer reports for `correct` hits out of `n`.
    fn metric(correct: usize, n: usize) -> f64 {
        let gold = vec![1usize; n];
        let pred: Vec<usize> = (0..n).map(|i| usize::from(i < correct)).collect();
        accuracy(&pred, &gold)
    }

    #[test]
    fn early_rejection_under_not_worse_never_rejects_what_full_evaluation_accepts() {
        for n in 1..=160 {
            for current_correct in 0..=n {
                let current = Score::point(0.5, metric(current_correct, n));
                let min = Rule::NotWorse.min_correct(n, current);
                for correct in 0..=n {
                    // Full evaluation's verdict, at the lowest possible loss.
                    let trial = Score::point(0.0, metric(correct, n));
                    // Early stopping rejects once errors exceed n - min.
                    let cut_short = n - correct > n.saturating_sub(min) || min > n;
                    let admitted = Rule::NotWorse.admits(trial, current);
                    assert!(
                        !(admitted && cut_short),
                        "n={n} correct={correct} min={min}"
                    );
                    // And it is exact: whatever it lets through to the end can pass.
                    assert!(cut_short || admitted, "n={n} {correct}");
                }
            }
        }
    }

    /// Every way the unseen examples of an evaluation under way can turn out: the final
    /// (lost, gained) pairs reachable from `seen` with `original_right_left` unseen examples that
    /// the original got right.
    fn completions(seen: Seen, original_right_left: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for more_lost in 0..=original_right_left {
            for more_gained in 0..=seen.original_wrong_left {
                out.push((seen.lost + more_lost, seen.gained + more_gained));
            }
        }
        out
    }

    #[test]
    fn early_rejection_under_the_guard_is_exact() {
        let mut checked = 0usize;
        for n in 1..=12 {
            for original_correct in 0..=n {
                let wrong = n - original_correct;
                let floors =
                    [0.0, 0.3, 0.5, 0.75, 0.9, 1.0].map(|f| f * original_correct as f64 / n as f64);
                for z in [0.0, 1.2816, 1.6449, 2.3263] {
                    for right_seen in 0..=original_correct {
                        for wrong_seen in 0..=wrong {
                            for lost in 0..=right_seen {
                                for gained in 0..=wrong_seen {
                                    let seen = Seen {
                                        n,
                                        original_correct,
                                        lost,
                                        gained,
                                        original_wrong_left: wrong - wrong_seen,
                                    };
                                    let finals = completions(seen, original_correct - right_seen);
                                    for floor in floors {
                                        let best = finals
                                            .iter()
                                            .map(|&(l, g)| {
                                                guarded_accuracy(original_correct, l, g, n, z)
                                            })
                                            .fold(f64::NEG_INFINITY, f64::max);
                                        let ruled_out = seen.rules_out(floor, z);
                                        // Never rejects what a full evaluation could accept…
                                        assert!(
                                            !(ruled_out && best >= floor),
                                            "{seen:?} z={z} floor={floor} best={best}"
                                        );
                                        // …and rejects as soon as nothing can be accepted.
                                        assert!(
                                            ruled_out || best >= floor - 1e-12,
                                            "{seen:?} z={z} floor={floor} best={best}"
                                        );
                                        checked += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn floors_judge_the_guarded_metric_and_not_worse_the_point_estimate() {
        let current = Score::point(0.4, 0.9);
        let trial = Score {
            loss: 0.3,
            metric: 0.9,
            discordant: Some(16),
            guarded: Some(0.88),
        };
        assert!(Rule::AtLeast(0.88).admits(trial, current));
        assert!(!Rule::AtLeast(0.89).admits(trial, current));
        assert!(Rule::NotWorse.admits(trial, current));
        assert!(Rule::NotWorseAtLeast(0.88).admits(trial, current));
        assert!(!Rule::NotWorseAtLeast(0.89).admits(trial, current));
        let worse = Score {
            metric: 0.895,
            ..trial
        };
        assert!(!Rule::NotWorseAtLeast(0.8).admits(worse, current));
    }
}
