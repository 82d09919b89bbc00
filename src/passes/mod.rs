//! Compression passes. Each is a stage of a pipeline: `Model → Model` plus a report of what it
//! did. The stages, in the order a pipeline usually runs them:
//!
//! 1. [`prune`]: accuracy-driven removal of attention / FFN blocks, heads and FFN neuron groups,
//!    sliced out of the weights after each level.
//! 2. [`attention`]: sign-matching or hard top-k attention in the layers where the selection
//!    data allows it;
//! 3. [`quantize`]: int8 / int4 / float per weight matrix, uniform or chosen by significance;
//!    only `recover` (quantization-aware) and `vocab` may follow it (a quantized matrix cannot be
//!    sliced).
//! 4. [`bsp`]: block-structured pruning — reweighted group lasso, hard prune of the smallest
//!    weight groups, masked retraining;
//! 5. [`recover`]: fine-tuning after any other stage (distillation from the original model on
//!    the train split), keeping the best parameters on the selection split; after `quantize`
//!    it trains through the quantizer;
//! 6. [`shape`]: cut the model to a smaller uniform one of its family (layers, heads, FFN
//!    width, hidden size), a stock checkpoint; a `recover` stage follows it;
//! 7. [`vocab`]: keep the word embeddings of the tokens a corpus produces; exact on the corpus,
//!    so it takes no decisions; it changes the tokenizer, so it is the last stage.
//!
//! A pass only says which changes it proposes (candidates, in significance order) and how an
//! accepted change is applied. Whether a change is kept is decided by the selection engine
//! ([`select`]): it re-evaluates the selection split from the changed layer on, with the hidden
//! states before that layer cached, and accepts or rejects against the run's single tolerance.
//! Every decision is recorded in the run's [`journal`], so an interrupted run resumes without
//! redoing accepted work.

pub mod attention;
pub mod bsp;
pub mod compensate;
pub mod journal;
pub mod prune;
pub mod quantize;
pub mod reconstruct;
pub mod recover;
pub mod ridge;
pub mod select;
pub mod shape;
pub mod vocab;

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

use crate::analyze::elements::Level;
use crate::analyze::report::{ElementSignificance, Method, Settings};
use crate::analyze::{analyze, exact_passes, AnalysedModel};
use crate::data::glue::Dataset;
use crate::data::labels::LabelMap;
use crate::data::source::TaskData;
use crate::data::splits::{train_sample, DataInfo, Part};
use crate::data::task::Task;
use crate::model::Model;
use crate::text::tokenizer::TextEncoder;
use journal::Journal;
use select::SelectionBatches;

/// One compression pass, with its typed settings and report.
pub trait Pass {
    /// The settings it runs with (a `[[stages]]` table of a config).
    type Settings: Serialize;
    /// What it reports of a run (per level, per element…), under `stages[].details` in
    /// report.json.
    type Report: Serialize;
    /// Name recorded in reports and the model's history (`prune`).
    fn name(&self) -> &'static str;
    /// The settings, as recorded in reports and the model's history.
    fn settings(&self) -> &Self::Settings;
    /// Refuses an input model the pass cannot work on (e.g. a significance report of another
    /// model), before any work is done.
    fn check_input(&self, _model: &Model) -> Result<()> {
        Ok(())
    }
    /// Checks the settings against the run's input model before any stage starts (a group size
    /// that does not divide the FFN width…), so that a bad setting fails before any work.
    fn check_settings(&self, _model: &Model) -> Result<()> {
        Ok(())
    }
    /// Runs the pass on `model`, recording its decisions in `journal`; returns the new model and
    /// the pass's report.
    fn run(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<PassOutput<Self::Report>>;
    /// True for a stage that trains the model back towards the original (`recover`): the
    /// stages before it may spend more of the tolerance.
    fn recovers(&self) -> bool {
        false
    }
    /// True for a stage that changes the tokenizer (`vocab`): the run's data is encoded anew
    /// after it, so it is the last stage.
    fn retokenizes(&self) -> bool {
        false
    }
    /// One line of the run's summary for `report`, for a pass whose report has one.
    fn summary(&self, _report: &Self::Report) -> Option<String> {
        None
    }
}

/// A pass as the pipeline holds it, whatever its types: its settings and report serialised for
/// report.json and the model's history. Every [`Pass`] is one.
pub trait Stage {
    /// [`Pass::name`].
    fn name(&self) -> &'static str;
    /// [`Pass::settings`], serialised.
    fn settings_value(&self) -> Result<Value>;
    /// [`Pass::check_input`].
    fn check_input(&self, model: &Model) -> Result<()>;
    /// [`Pass::check_settings`].
    fn check_settings(&self, model: &Model) -> Result<()>;
    /// [`Pass::run`], with the report serialised, and its [`Pass::summary`].
    fn run_stage(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<(PassOutput<Value>, Option<String>)>;
    /// [`Pass::recovers`].
    fn recovers(&self) -> bool;
    /// [`Pass::retokenizes`].
    fn retokenizes(&self) -> bool;
}

impl<P: Pass> Stage for P {
    fn name(&self) -> &'static str {
        Pass::name(self)
    }

    fn settings_value(&self) -> Result<Value> {
        Ok(serde_json::to_value(Pass::settings(self))?)
    }

    fn check_input(&self, model: &Model) -> Result<()> {
        Pass::check_input(self, model)
    }

    fn check_settings(&self, model: &Model) -> Result<()> {
        Pass::check_settings(self, model)
    }

    fn run_stage(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<(PassOutput<Value>, Option<String>)> {
        let out = Pass::run(self, model, ctx, journal)?;
        let summary = Pass::summary(self, &out.details);
        let out = PassOutput {
            model: out.model,
            details: serde_json::to_value(&out.details)?,
            alternatives: out.alternatives,
            files: out.files,
        };
        Ok((out, summary))
    }

    fn recovers(&self) -> bool {
        Pass::recovers(self)
    }

    fn retokenizes(&self) -> bool {
        Pass::retokenizes(self)
    }
}

/// What a pass returns.
pub struct PassOutput<R> {
    /// The new model.
    pub model: Model,
    /// What the pass did (its [`Pass::Report`]).
    pub details: R,
    /// Models the result should be compared with (e.g. uniform quantization), which the
    /// pipeline evaluates beside it.
    pub alternatives: Vec<Alternative>,
    /// Files written beside `report.json` (name, bytes), e.g. plots.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A model a pass's result is compared with.
pub struct Alternative {
    /// What it is, e.g. `uniform int8`.
    pub name: &'static str,
    /// The model.
    pub model: Model,
}

impl Alternative {
    /// An alternative named `name`.
    pub fn new(name: &'static str, model: Model) -> Self {
        Alternative { name, model }
    }
}

/// What a pass may use: the selection data, the run's tolerance, the journal and the run's
/// settings that analysis needs.
pub struct StageContext<'a> {
    /// The model's path or hub id as given (recorded in analysis reports).
    pub source: &'a str,
    /// The task.
    pub task: Task,
    /// Model outputs → task labels.
    pub labels: &'a LabelMap,
    /// The selection split.
    pub selection: &'a Part,
    /// Train positions training must leave out: the selection's and the check split's originals.
    pub held_out_train: &'a [usize],
    /// The selection split, batched for the engine.
    pub batches: &'a SelectionBatches<'a>,
    /// The lowest selection metric the whole run may end with (`None` without a `max_drop`).
    pub floor: Option<f64>,
    /// A later stage trains the model back towards the original ([`Pass::recovers`]).
    pub recovery_follows: bool,
    /// Position of this stage in the pipeline (0-based), for journal step names.
    pub stage: usize,
    /// Sentences per batch.
    pub batch_size: usize,
    /// Maximum tokens per input.
    pub max_length: usize,
    /// No progress bars or logs.
    pub quiet: bool,
    /// The run's input model (the teacher of recovery training).
    pub original: &'a Model,
    /// The task's data (recovery trains on its train split).
    pub data: &'a TaskData,
    /// The tokenizer, truncating at `max_length`.
    pub encoder: &'a TextEncoder,
}

impl StageContext<'_> {
    /// `k` train examples drawn with `seed` (all when `None`), leaving out the selection's and
    /// the check split's own when they came from train, so training never sees the data that
    /// judges it; and how many
    /// there were to draw from.
    pub fn train_sample(&self, k: Option<usize>, seed: u64) -> Result<(Dataset, usize)> {
        let held_out = self.held_out_train;
        let (sample, available) = train_sample(self.data, k, seed, held_out)?;
        if sample.examples.is_empty() {
            bail!(
                "{}: no train examples outside the selection ({} of them are the sentences it and the final check were drawn from); lower --holdout",
                sample.path.display(),
                held_out.len()
            );
        }
        Ok((sample, available))
    }

    /// Prints a human log line on stderr unless quiet.
    pub fn log(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }
}

/// Selection examples the significance that orders a pass's candidates is measured on, at most:
/// the order needs fewer than the decisions, which use every selection example.
pub const SIGNIFICANCE_EXAMPLES: usize = 1000;

/// The significance of every element of `level` in `model`, on the first
/// [`SIGNIFICANCE_EXAMPLES`] of the selection split (a seeded sample, so any prefix is one too):
/// exact ablation, with FFN groups of `group_size` neurons pre-ranked by a Taylor estimate (the 8
/// most promising per layer are ablated exactly). Under a `budget` of forward-pass equivalents
/// that the exact analysis would exceed, the level is pre-ranked by the Taylor estimate and
/// ablated least significant first within it.
pub fn significance(
    model: &Model,
    level: Level,
    group_size: usize,
    budget: Option<f64>,
    ctx: &StageContext,
) -> Result<Vec<ElementSignificance>> {
    let subject = AnalysedModel {
        model,
        source: ctx.source,
        task: ctx.task,
        labels: ctx.labels,
    };
    let ranked = budget.filter(|&b| level == Level::Groups || exact_passes(model, &[level]) > b);
    let settings = Settings {
        method: Method::Ablation,
        levels: vec![level],
        group_size,
        exact_groups: Some(8),
        taylor_examples: if level == Level::Groups || ranked.is_some() {
            512.min(ctx.selection.set.sequences.len())
        } else {
            0
        },
        batch_size: ctx.batch_size,
        max_length: ctx.max_length,
        forward_pass_budget: ranked,
    };
    let all = &ctx.selection.set;
    let examples = all.sequences.len().min(SIGNIFICANCE_EXAMPLES);
    let set = match examples < all.sequences.len() {
        true => all.subset(&(0..examples).collect::<Vec<_>>()),
        false => all.clone(),
    };
    let info = DataInfo {
        examples,
        ..ctx.selection.info.clone()
    };
    let analysis = analyze(&subject, &set, info, settings, ctx.quiet)?;
    Ok(analysis.report.elements)
}
