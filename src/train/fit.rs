//! The training loop: seeded shuffled batches (sorted by length within windows, so padding stays
//! small), the objective on the differentiable path, AdamW under a linear schedule, periodic
//! evaluation on the selection split keeping the best parameters, and a checkpoint after each
//! evaluation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::augment::replace_tokens;
use super::checkpoint::{self, Best, Evaluation, TrainLog};
use super::loss::{BatchSize, Objective};
use super::optimizer::{AdamSettings, AdamW};
use super::params::{Param, Trainable};
use super::schedule::LinearSchedule;
use crate::data::batch::EncodedSet;
use crate::data::labels::LabelMap;
use crate::data::sample::{shuffle, SplitMix64};
use crate::memory;
use crate::model::Model;
use crate::progress;
use crate::scoring::batch::batch;
use crate::scoring::score::{Rule, Score};

crate::settings! {
    /// How to train: the `[[stages]]` keys of a `recover` stage, and of a bsp stage's
    /// `[stages.lasso]` and `[stages.retrain]`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct TrainSettings;
    {
        /// Training examples sampled (seeded) from the train split outside the selection (all of
        /// them when this is larger; `prune --recover N` sets it).
        train_limit: Option<usize> = Some(8000), "8000";
        /// Passes over the training examples.
        epochs: usize = 1, "1";
        /// Peak learning rate.
        learning_rate: f64 = 1e-4, "1e-4";
        /// Fraction of the steps spent warming up.
        warmup: f64 = 0.1, "0.1";
        /// Seed of the sample and the shuffling.
        seed: u64 = 0, "0";
        /// Evaluations on the selection split over the run (the best is kept; the untrained
        /// model counts as one more).
        evaluations: usize = 4, "4";
        /// Stop after this many evaluations in a row that do not beat the best so far (the
        /// untrained model's included); unset: train to the end.
        early_stop: Option<usize> = None, "train to the end";
        /// Decoupled weight decay of the matrices.
        weight_decay: f64 = 0.01, "0.01";
        /// Gradient clipping (global L2 norm).
        max_grad_norm: f64 = 1.0, "1";
        /// Weight of the task loss on the gold labels.
        task_weight: f64 = 0.0, "0";
        /// Weight of distillation from the original model's logits.
        distill_weight: f64 = 1.0, "1";
        /// Temperature of the distillation.
        temperature: f64 = 2.0, "2";
        /// Weight of the squared error of the final hidden states against the original's.
        hidden_weight: f64 = 0.0, "0";
        /// The model distilled (directory or hub id).
        teacher: Option<String> = None, "the run's input model";
        /// Probability that each ordinary token of a training sentence is replaced by one from
        /// another sentence of the batch; pure distillation only (`prune --augment P` sets it).
        augment: f64 = 0.0, "0";
    }
}

impl TrainSettings {
    /// Refuses settings no run can use; `stage` names them in the message (`recover`).
    pub fn check(&self, stage: &str) -> Result<()> {
        if self.epochs == 0 || self.train_limit == Some(0) || self.early_stop == Some(0) {
            bail!("{stage}: epochs, train_limit and early_stop must be at least 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            bail!("{stage}: learning_rate must be in (0, 1), e.g. 1e-4");
        }
        if !(0.0..1.0).contains(&self.warmup) || self.temperature <= 0.0 {
            bail!("{stage}: warmup must be in [0, 1) and temperature above 0");
        }
        if !(0.0..1.0).contains(&self.augment) || (self.augment > 0.0 && self.task_weight > 0.0) {
            bail!("{stage}: augment must be in [0, 1), and 0 when task_weight is above 0 (an altered sentence may not fit its gold label)");
        }
        let weights = [self.task_weight, self.distill_weight, self.hidden_weight];
        if weights.iter().any(|w| w.is_nan() || *w < 0.0) || weights.iter().all(|w| *w == 0.0) {
            bail!(
                "{stage}: task_weight, distill_weight and hidden_weight must be ≥ 0, one above 0"
            );
        }
        Ok(())
    }

    /// The objective these settings describe.
    pub fn objective(&self) -> Objective {
        Objective {
            task_weight: self.task_weight,
            distill_weight: self.distill_weight,
            temperature: self.temperature,
            hidden_weight: self.hidden_weight,
        }
    }
}

/// A regulariser added to the loss, given the parameters and the step.
pub type Penalty<'a> = dyn Fn(&Trainable, usize) -> Result<Tensor> + 'a;

/// Mixes an epoch or step number into a seed (the golden-ratio constant of SplitMix64).
const SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// Examples sorted by length within windows of this many batches, so that a batch pads little.
const SORT_WINDOW: usize = 50;

/// Everything a training run reads besides its settings.
pub struct TrainRun<'a> {
    /// The training examples.
    pub data: &'a EncodedSet,
    /// Model outputs → task labels.
    pub labels: &'a LabelMap,
    /// Sentences per step.
    pub batch_size: usize,
    /// The teacher of distillation.
    pub teacher: &'a Model,
    /// Scores a model on the selection split.
    pub judge: &'a dyn Fn(&Model) -> Result<Score>,
    /// Where the checkpoint is kept, and the key naming this run in it.
    pub checkpoint: Option<(PathBuf, String)>,
    /// A regulariser added to the loss, given the parameters and the step.
    pub penalty: Option<&'a Penalty<'a>>,
    /// Fixed masks (1 kept, 0 removed) by parameter name: those entries stay zero.
    pub masks: Option<&'a BTreeMap<String, Tensor>>,
    /// Keep the parameters that score best on the selection split; otherwise the last ones.
    pub keep_best: bool,
    /// No progress bar.
    pub quiet: bool,
}

/// Trains `student`; returns the best model on the selection split and the run's log.
pub fn fine_tune(
    student: &Model,
    settings: &TrainSettings,
    run: &TrainRun,
) -> Result<(Model, TrainLog)> {
    if run.data.sequences.is_empty() {
        bail!("no training examples");
    }
    let mut t = Trainer::new(student, settings, run)?;
    let (mut best, mut log) = t.resume_or_start(student)?;
    let total = t.schedule.total;
    let pb = progress::bar(total as u64, "training", run.quiet);
    pb.set_position(log.losses.len() as u64);
    let mut order: Option<(usize, Vec<Vec<usize>>)> = None;
    for step in log.losses.len()..total {
        // Also on resuming a run that had stopped early.
        if settings
            .early_stop
            .is_some_and(|n| log.evaluations_since_best() >= n)
        {
            break;
        }
        let epoch = step / t.per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let batches = epoch_batches(&t.lengths, run.batch_size, settings.seed, epoch);
            order = Some((epoch, batches));
        }
        let examples = order.as_ref().expect("set above").1[step % t.per_epoch].clone();
        let (value, lr) = t.step(step, examples)?;
        if t.tight {
            memory::release_freed();
        }
        log.losses.push(value);
        pb.set_message(format!("training: loss {value:.4} lr {lr:.1e}"));
        pb.inc(1);
        if (step + 1) % t.every == 0 || step + 1 == total {
            t.evaluate(step + 1, &mut best, &mut log)?;
        }
    }
    pb.finish_and_clear();
    Ok((best_model(t.into_trainable(), best)?, log))
}

/// A training run in progress: the parameters, the optimizer and the schedule.
struct Trainer<'r, 'a> {
    run: &'r TrainRun<'a>,
    /// The run's teacher, or under a tight limit a copy of it that holds no packed weights.
    teacher: Cow<'a, Model>,
    objective: Objective,
    trainable: Trainable,
    optimizer: AdamW,
    schedule: LinearSchedule,
    /// Token count of every training example.
    lengths: Vec<usize>,
    per_epoch: usize,
    /// Steps between evaluations.
    every: usize,
    /// Token replacement probability and seed.
    augment: (f64, u64),
    /// Bytes of activations a step may hold ([`memory::training_room`]).
    room: memory::TrainingRoom,
    /// Whether the limit is tight for this model ([`memory::training_is_tight`]): the freed
    /// memory goes back to the system after every step.
    tight: bool,
}

impl<'r, 'a> Trainer<'r, 'a> {
    fn new(student: &Model, settings: &TrainSettings, run: &'r TrainRun<'a>) -> Result<Self> {
        let tight = memory::training_is_tight(student);
        let teacher = match tight {
            true => {
                memory::return_large_blocks();
                // The packed inference copies (BERT-base shape: 0.34 GB) are let go for the run;
                // later inference packs them again.
                student.drop_packed();
                run.teacher.drop_packed();
                Cow::Owned(run.teacher.never_packed())
            }
            false => Cow::Borrowed(run.teacher),
        };
        let mut trainable = Trainable::new(student)?;
        if let Some(masks) = run.masks {
            trainable.set_masks(masks)?;
        }
        let adam = AdamSettings {
            weight_decay: settings.weight_decay,
            max_grad_norm: Some(settings.max_grad_norm),
            ..AdamSettings::default()
        };
        let optimizer = AdamW::new(&trainable.params, adam)?;
        let lengths: Vec<usize> = run.data.sequences.iter().map(|s| s.ids.len()).collect();
        let per_epoch = lengths.len().div_ceil(run.batch_size);
        let total = per_epoch * settings.epochs;
        Ok(Trainer {
            run,
            teacher,
            objective: settings.objective(),
            trainable,
            optimizer,
            schedule: LinearSchedule {
                peak: settings.learning_rate,
                warmup: (settings.warmup * total as f64).round() as usize,
                total,
            },
            lengths,
            per_epoch,
            every: total.div_ceil(settings.evaluations.max(1)),
            augment: (settings.augment, settings.seed),
            room: memory::training_room(student),
            tight,
        })
    }

    /// The parameters, the rest of the run (the optimizer's moments) dropped here.
    fn into_trainable(self) -> Trainable {
        self.trainable
    }

    /// The best parameters and the log: from the checkpoint when there is one, else the
    /// untrained model (`student`'s own values) scored as step 0.
    fn resume_or_start(&mut self, student: &Model) -> Result<(Best, TrainLog)> {
        if let Some((path, key)) = self.run.checkpoint.as_ref().filter(|(p, _)| p.exists()) {
            let log = checkpoint::load(path, key, &self.trainable, &mut self.optimizer)?;
            return Ok((Best::Saved(path.clone()), log));
        }
        let before = Evaluation {
            step: 0,
            selection: (self.run.judge)(&self.trainable.current()?)?,
        };
        let log = TrainLog {
            losses: Vec::new(),
            evaluations: vec![before],
            best: before,
        };
        let start = match self.run.masks {
            // Masked entries are zero in the variables, not in `student`.
            Some(_) => self.trainable.snapshot()?,
            None => Trainable::values_of(student)?,
        };
        Ok((Best::Values(start), log))
    }

    /// One optimizer step on `examples`; returns the loss and the learning rate.
    fn step(&mut self, step: usize, examples: Vec<usize>) -> Result<(f32, f64)> {
        let (value, grads) = self.gradients(step, examples)?;
        let lr = self.schedule.at(step);
        self.optimizer.step(&self.trainable.params, &grads, lr)?;
        Ok((value, lr))
    }

    /// The loss of step `step` on `examples` and its gradients. A batch whose activations would
    /// pass the memory limit runs as consecutive parts whose losses and gradients add up to the
    /// whole batch's (the same step, in more time).
    fn gradients(&self, step: usize, examples: Vec<usize>) -> Result<(f32, GradStore)> {
        let run = self.run;
        let model = &*self.trainable.training_model()?;
        let (data, examples) = self.step_examples(step, examples);
        let parts = parts_within(model, &data, &examples, self.room);
        let batches = parts
            .into_iter()
            .map(|part| batch(model, &data, run.labels, part))
            .collect::<Result<Vec<_>>>()?;
        let sizes = batches
            .iter()
            .map(BatchSize::of)
            .collect::<Result<Vec<_>>>()?;
        let whole = BatchSize::sum(&sizes);
        let (mut value, mut grads) = (None::<f32>, None::<GradStore>);
        for (i, part) in batches.iter().enumerate() {
            let mut loss = self
                .objective
                .loss_of_part(model, &self.teacher, part, whole)?;
            if let Some(penalty) = run.penalty.filter(|_| i == 0) {
                loss = (loss + penalty(&self.trainable, step)?)?;
            }
            let v = loss.to_scalar::<f32>()?;
            value = Some(value.map_or(v, |sum| sum + v));
            if !v.is_finite() {
                bail!(
                    "training: step {step} gave a non-finite loss ({v}); lower the learning rate"
                );
            }
            let g = parameter_gradients(&self.trainable.params, loss.backward()?);
            drop(loss); // the part's graph, before its gradients are added to the sum
            match grads.as_mut() {
                None => grads = Some(g),
                Some(sum) => sum.extend(g)?,
            }
        }
        Ok((
            value.context("an empty batch")?,
            grads.context("an empty batch")?,
        ))
    }

    /// The data step `step` trains on, and its examples there: the training data itself, or a
    /// copy of the examples with tokens replaced when the run augments.
    fn step_examples(
        &self,
        step: usize,
        examples: Vec<usize>,
    ) -> (Cow<'a, EncodedSet>, Vec<usize>) {
        match self.augment {
            (p, seed) if p > 0.0 => {
                let mut altered = self.run.data.subset(&examples);
                replace_tokens(&mut altered, p, seed ^ (step as u64).wrapping_mul(SEED_MIX));
                (Cow::Owned(altered), (0..examples.len()).collect())
            }
            _ => (Cow::Borrowed(self.run.data), examples),
        }
    }

    /// Scores the parameters after `steps` steps on the selection split, keeps them when they are
    /// the best (or always, without `keep_best`), and saves the checkpoint, which then holds the
    /// best parameters in place of memory.
    fn evaluate(&self, steps: usize, best: &mut Best, log: &mut TrainLog) -> Result<()> {
        let score = (self.run.judge)(&self.trainable.current()?)?;
        let now = Evaluation {
            step: steps,
            selection: score,
        };
        log.evaluations.push(now);
        let better =
            Rule::NotWorse.admits(score, log.best.selection) && score != log.best.selection;
        let keep = better || !self.run.keep_best;
        if keep {
            log.best = now;
        }
        match &self.run.checkpoint {
            Some((path, key)) => {
                let kept = (!keep).then_some(&*best);
                checkpoint::save(path, key, &self.trainable, &self.optimizer, kept, log)?;
                *best = Best::Saved(path.clone());
            }
            None if keep => {
                *best = Best::Values(Vec::new()); // before the new copy, so that two never coexist
                *best = Best::Values(self.trainable.snapshot()?);
            }
            None => {}
        }
        Ok(())
    }
}

/// Only the parameters' entries of `grads`. Candle's backward pass also leaves gradients for
/// the constants the loss reads (the embeddings' output, the attention masks, the teacher's
/// logits), which would otherwise pile up over a batch's parts (BERT-base shape, parts of two
/// long sentences: about 95 MB a part) and stay through the optimizer step.
fn parameter_gradients(params: &[Param], mut grads: GradStore) -> GradStore {
    let mut kept = GradStore::default();
    for p in params {
        if let Some(g) = grads.remove(p.var.as_tensor()) {
            kept.insert(p.var.as_tensor(), g);
        }
    }
    kept
}

/// `examples` as one part when its training activations fit `room.whole` bytes, else cut into
/// the fewest consecutive parts that each fit `room.part` (at least one example each).
fn parts_within(
    model: &Model,
    data: &EncodedSet,
    examples: &[usize],
    room: memory::TrainingRoom,
) -> Vec<Vec<usize>> {
    let cost = |part: &[usize]| {
        let len = part.iter().map(|&i| data.sequences[i].ids.len()).max();
        part.len() as u64 * memory::training_bytes_per_sequence(model, len.unwrap_or(0))
    };
    if cost(examples) <= room.whole {
        return vec![examples.to_vec()];
    }
    let mut count = 2;
    loop {
        let size = examples.len().div_ceil(count).max(1);
        let parts: Vec<Vec<usize>> = examples.chunks(size).map(<[usize]>::to_vec).collect();
        if size == 1 || parts.iter().all(|p| cost(p) <= room.part) {
            return parts;
        }
        count += 1;
    }
}

/// The trained model with the parameters `best` (the variables are given up to it, not copied).
fn best_model(trainable: Trainable, best: Best) -> Result<Model> {
    let values = best.into_values(&trainable)?;
    trainable.restore(&values)?;
    trainable.current()
}

/// The batches of one epoch: the examples shuffled with `(seed, epoch)`, sorted by length within
/// windows of [`SORT_WINDOW`] batches, cut into batches, and the batches shuffled.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(SEED_MIX));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut rng);
    for window in order.chunks_mut(batch_size * SORT_WINDOW) {
        window.sort_by_key(|&i| lengths[i]);
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    shuffle(&mut batches, &mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_is_in_one_batch_per_epoch_and_epochs_differ() {
        let lengths: Vec<usize> = (0..1000).map(|i| 3 + i % 40).collect();
        let a = epoch_batches(&lengths, 16, 7, 0);
        let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_batches(&lengths, 16, 7, 0));
        assert_ne!(a, epoch_batches(&lengths, 16, 7, 1));
        let spread: usize = a
            .iter()
            .map(|b| {
                b.iter().map(|&i| lengths[i]).max().unwrap()
                    - b.iter().map(|&i| lengths[i]).min().unwrap()
            })
            .sum();
        assert!(
            spread < a.len() * 10,
            "batches are sorted by length within windows"
        );
    }

    /// A 3-label dataset of `lengths.len()` sentences of those lengths.
    fn sentences(lengths: &[usize]) -> EncodedSet {
        let sequence = |(n, &len): (usize, &usize)| crate::text::tokenizer::Sequence {
            ids: (0..len)
                .map(|i| ((n * 7 + i * 3) % 48 + 2) as u32)
                .collect(),
            type_ids: vec![0; len],
        };
        EncodedSet {
            suffix: "",
            path: Default::default(),
            sequences: lengths.iter().enumerate().map(sequence).collect(),
            targets: (0..lengths.len())
                .map(|n| crate::data::glue::Target::Class(n % 3))
                .collect(),
        }
    }

    #[test]
    fn a_batch_run_in_parts_has_the_gradients_of_the_whole_batch() {
        let student = crate::testing::random_model("bert", 2, 2, 4, 16);
        let teacher = crate::testing::random_model("bert", 2, 2, 4, 8);
        let data = sentences(&[3, 9, 5, 12, 7, 4]);
        let labels = LabelMap {
            model_to_task: vec![0, 1, 2],
        };
        let judge = |_: &Model| -> Result<Score> { unreachable!("no evaluation here") };
        let run = TrainRun {
            data: &data,
            labels: &labels,
            batch_size: 6,
            teacher: &teacher,
            judge: &judge,
            checkpoint: None,
            penalty: None,
            masks: None,
            keep_best: true,
            quiet: true,
        };
        // Every term of the objective: the task loss and the distillation over examples, the
        // hidden-state error over tokens.
        let settings = TrainSettings {
            task_weight: 1.0,
            hidden_weight: 0.5,
            ..TrainSettings::default()
        };
        let mut trainer = Trainer::new(&student, &settings, &run).unwrap();
        let all: Vec<usize> = (0..6).collect();
        let (whole_loss, whole) = trainer.gradients(0, all.clone()).unwrap();
        trainer.room = memory::TrainingRoom { whole: 0, part: 1 };
        let parts = parts_within(&student, &data, &all, trainer.room);
        assert_eq!(
            parts.len(),
            6,
            "a budget of one byte runs one example a part"
        );
        let (parts_loss, summed) = trainer.gradients(0, all).unwrap();
        let params = trainer.trainable.params.len();
        assert_eq!(
            whole.get_ids().count(),
            params,
            "only the parameters' gradients"
        );
        assert_eq!(
            summed.get_ids().count(),
            params,
            "none piled up over the parts"
        );
        assert!((whole_loss - parts_loss).abs() <= 1e-5 * whole_loss.abs().max(1.0));
        for p in &trainer.trainable.params {
            let (a, b) = (whole.get(p.var.as_tensor()), summed.get(p.var.as_tensor()));
            let (a, b) = (a.expect("a gradient"), b.expect("a gradient"));
            let size = crate::testing::max_abs_diff(a, &a.zeros_like().unwrap()).max(1e-3);
            let diff = crate::testing::max_abs_diff(a, b);
            assert!(diff <= 1e-4 * size, "{}: off by {diff} of {size}", p.name);
        }
    }

    #[test]
    fn a_batch_is_cut_only_when_it_does_not_fit_and_then_into_parts_that_fit() {
        let model = crate::testing::random_model("bert", 2, 2, 4, 16);
        let data = sentences(&[3, 9, 5, 12, 7, 4]);
        let all: Vec<usize> = (0..6).collect();
        let per = |len| memory::training_bytes_per_sequence(&model, len);
        let whole = 6 * per(12);
        let room = |whole, part| memory::TrainingRoom { whole, part };
        assert_eq!(parts_within(&model, &data, &all, room(whole, 0)).len(), 1);
        // Halves: 3 × per(9) and 3 × per(12); the costlier one must fit.
        let parts = parts_within(&model, &data, &all, room(whole - 1, 3 * per(12)));
        assert_eq!(parts, vec![vec![0, 1, 2], vec![3, 4, 5]]);
        let parts = parts_within(&model, &data, &all, room(whole - 1, 3 * per(12) - 1));
        assert_eq!(parts.len(), 3, "{parts:?}");
    }

    #[test]
    fn augmentation_is_refused_beside_the_task_loss() {
        let with = |task_weight: f64, augment: f64| TrainSettings {
            task_weight,
            augment,
            ..TrainSettings::default()
        };
        assert!(with(0.0, 0.2).check("t").is_ok());
        assert!(with(1.0, 0.2).check("t").is_err());
        assert!(with(1.0, 0.0).check("t").is_ok());
        assert!(with(0.0, 1.0).check("t").is_err());
    }
}
