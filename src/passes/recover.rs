//! Recovery fine-tuning: after pruning (or any other stage), train the remaining weights on a
//! seeded sample of the train split — by default distilling the run's input model, which
//! already knows the task, so no second model is downloaded — and keep the parameters that score
//! best on the selection split (the model before training included, so it never ends worse
//! there). The train split is fine for this: the student learns to copy the teacher; decisions
//! are still taken on the selection split and judged on the report split.

use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::journal::Journal;
use super::{Pass, PassOutput, StageContext};
use crate::data::batch::encode;
use crate::model::runtime::Runtime;
use crate::model::source::HubAccess;
use crate::model::Model;
use crate::train::checkpoint::{Evaluation, TrainLog};
use crate::train::fit::{fine_tune, TrainRun, TrainSettings};

/// The recover pass.
pub struct Recover {
    settings: TrainSettings,
    /// How a hub-id teacher is fetched: the run's `--offline`, at the teacher's default revision
    /// (`--revision` names the input model's).
    teacher_hub: HubAccess,
    /// The named teacher, loaded once (when the settings are checked, before any stage).
    teacher: OnceLock<Model>,
}

impl Recover {
    /// Checks the settings; `hub` is how the run fetches its input model.
    pub fn new(settings: TrainSettings, hub: &HubAccess) -> Result<Self> {
        settings.check("recover")?;
        let teacher_hub = HubAccess {
            revision: None,
            ..hub.clone()
        };
        Ok(Recover {
            settings,
            teacher_hub,
            teacher: OnceLock::new(),
        })
    }

    /// The teacher the settings name, if any, loaded on first use.
    fn named_teacher(&self, runtime: Runtime) -> Result<Option<&Model>> {
        let Some(spec) = self.settings.teacher.as_deref() else {
            return Ok(None);
        };
        if let Some(teacher) = self.teacher.get() {
            return Ok(Some(teacher));
        }
        let teacher = Model::load(spec, &self.teacher_hub, runtime)
            .with_context(|| format!("recover: teacher {spec}"))?;
        Ok(Some(self.teacher.get_or_init(|| teacher)))
    }
}

impl Pass for Recover {
    type Settings = TrainSettings;
    type Report = RecoverReport;

    fn name(&self) -> &'static str {
        "recover"
    }

    fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    fn check_input(&self, model: &Model) -> Result<()> {
        crate::train::params::Trainable::check(model)
    }

    /// Loads a named teacher once before any stage runs, so that a missing teacher or one of
    /// another task fails at the start, not after the stages before the recovery.
    fn check_settings(&self, model: &Model) -> Result<()> {
        match self.named_teacher(model.runtime)? {
            Some(teacher) => check_teacher(teacher, model),
            None => Ok(()),
        }
    }

    fn recovers(&self) -> bool {
        true
    }

    fn run(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<PassOutput<RecoverReport>> {
        let s = &self.settings;
        let started = Instant::now();
        let (train, available) = ctx.train_sample(s.train_limit, s.seed)?;
        let data = encode(&train, "", ctx.encoder)?;
        ctx.log(&format!(
            "recover: {} epoch(s) on {} of the {available} train examples outside the selection ({}), distilling {}",
            s.epochs,
            data.sequences.len(),
            train.path.display(),
            s.teacher.as_deref().unwrap_or("the input model")
        ));
        let teacher = self
            .named_teacher(ctx.original.runtime)?
            .unwrap_or(ctx.original);
        check_teacher(teacher, &model)?;
        journal.begin_step(&format!("stage{}-recover", ctx.stage), || Ok(()))?;
        let judge = |m: &Model| ctx.batches.score(m);
        let run = TrainRun {
            data: &data,
            labels: ctx.labels,
            batch_size: ctx.batch_size,
            teacher,
            judge: &judge,
            checkpoint: journal.checkpoint(&format!("stage{}-recover", ctx.stage))?,
            penalty: None,
            masks: None,
            keep_best: true,
            quiet: ctx.quiet,
        };
        let (model, log) = fine_tune(&model, s, &run)?;
        let seconds = started.elapsed().as_secs_f64();
        ctx.log(&format!(
            "recover: kept step {} of {} (selection {:.4}); {seconds:.0} s, {:.3} s per step",
            log.best.step,
            log.losses.len(),
            log.best.selection.metric,
            seconds / log.losses.len().max(1) as f64
        ));
        let details = details(log, data.sequences.len());
        Ok(PassOutput {
            model,
            details,
            alternatives: Vec::new(),
            files: Vec::new(),
        })
    }
}

/// What a recovery reports (wall times stay out of it: same inputs, same bytes).
#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    /// Training sentences.
    pub train_examples: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Mean training loss over the first tenth of the steps.
    pub loss_first_tenth: f64,
    /// Mean training loss over the last tenth of the steps.
    pub loss_last_tenth: f64,
    /// Every evaluation on the selection data.
    pub evaluations: Vec<Evaluation>,
    /// The evaluation whose parameters were kept.
    pub kept: Evaluation,
}

/// The report of a training run of `log` over `examples` sentences.
fn details(log: TrainLog, examples: usize) -> RecoverReport {
    let steps = log.losses.len();
    let window = (steps / 10).max(1);
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    RecoverReport {
        train_examples: examples,
        steps,
        loss_first_tenth: mean(&log.losses[..window.min(steps)]),
        loss_last_tenth: mean(&log.losses[steps.saturating_sub(window)..]),
        evaluations: log.evaluations,
        kept: log.best,
    }
}

/// Refuses a teacher whose outputs differ from the model's.
fn check_teacher(teacher: &Model, model: &Model) -> Result<()> {
    if teacher.config.num_labels() != model.config.num_labels() {
        bail!(
            "recover: the teacher has {} outputs and the model {}; distil a model of the same task",
            teacher.config.num_labels(),
            model.config.num_labels()
        );
    }
    Ok(())
}
