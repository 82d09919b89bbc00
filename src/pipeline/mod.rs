//! A compression run: a chain of passes under one tolerance, from a model on disk to a model
//! directory with its report. `axcompress prune` runs it with one prune stage; `axcompress
//! compress --config` with the stages a config declares. It reads as numbered steps:
//!
//! 1. load the model, its labels and tokenizer; check the destination; open the progress journal;
//! 2. find the data and split it: the selection split decides, the report split and dev judge;
//! 3. score the original model: the run's tolerance is measured from it;
//! 4. run each stage on the selection engine, journaling every decision (for `--resume`); after
//!    a stage that changes the tokenizer (`vocab`, the last), encode the data anew;
//! 5. compare the original and the compressed model on every split;
//! 6. export atomically, with `report.json` and `timing.json`.

pub mod evaluation;
pub mod report;
pub mod retokenize;
pub mod tolerance;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::batch::{encode, EncodedSet};
use crate::data::glue;
use crate::data::splits::{SelectOn, SelectionSpec, Splits};
use crate::data::task::Task;
use crate::evaluate::model_targets;
use crate::export::{check_destination, create_parent, prepare, Prepared};
use crate::fsutil::pretty_json;
use crate::hash::Fnv1a;
use crate::measure::{median, time_single, weights_bytes};
use crate::model::runtime::Runtime;
use crate::model::source::HubAccess;
use crate::model::storage::StorageDtype;
use crate::model::Model;
use crate::passes::attention::{AttentionPass, AttentionSettings};
use crate::passes::bsp::{Bsp, BspSettings};
use crate::passes::journal::Journal;
use crate::passes::prune::{Prune, PruneSettings};
use crate::passes::quantize::{Quantize, QuantizeSettings};
use crate::passes::recover::Recover;
use crate::passes::select::SelectionBatches;
use crate::passes::shape::{ShapePass, ShapeSettings};
use crate::passes::vocab::{Vocab, VocabSettings};
use crate::passes::{Alternative, Stage, StageContext};
use crate::scoring::guard::check_confidence;
use crate::scoring::score::Score;
use crate::setup::TaskSetup;
use crate::text::tokenizer::TextEncoder;
use crate::train::fit::TrainSettings;
use evaluation::{Comparison, Judge, ModelOnData};
use report::{
    points, promise_warnings, AlternativeReport, BeforeAfter, DataReport, RunReport, StageReport,
    Timing, ToleranceReport,
};
use retokenize::{encode_anew, Reencoded};
use tolerance::MaxDrop;

/// Dev sentences timed for the latency figures.
const LATENCY_SAMPLES: usize = 64;

/// One stage of a pipeline, as declared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "pass", rename_all = "kebab-case")]
pub enum StageSpec {
    /// Accuracy-driven pruning of blocks, heads and FFN groups.
    Prune(PruneSettings),
    /// int8 / int4 / float per weight matrix (only recover and vocab may follow it).
    Quantize(QuantizeSettings),
    /// Sign-matching or hard top-k attention in the layers that allow it.
    Attention(AttentionSettings),
    /// Fine-tuning (distillation from the input model) to recover accuracy.
    Recover(TrainSettings),
    /// Block-structured pruning: group lasso, hard prune, masked retraining.
    Bsp(Box<BspSettings>),
    /// A smaller uniform model of the same family (layers, heads, FFN width, hidden size).
    Shape(ShapeSettings),
    /// Keep the word embeddings of the tokens a corpus produces (the last stage).
    Vocab(VocabSettings),
}

impl StageSpec {
    /// The same stage with its relative paths (a significance report) taken from `base`.
    pub fn with_paths_from(self, base: &Path) -> Self {
        match self {
            StageSpec::Prune(mut s) => {
                s.significance = s.significance.map(|p| base.join(p));
                StageSpec::Prune(s)
            }
            StageSpec::Quantize(mut s) => {
                s.significance = s.significance.map(|p| base.join(p));
                StageSpec::Quantize(s)
            }
            StageSpec::Vocab(mut s) => {
                s.corpus = s.corpus.map(|p| base.join(p));
                StageSpec::Vocab(s)
            }
            other => other,
        }
    }

    /// The significance report the stage reads, when it names one.
    pub fn significance(&self) -> Option<&Path> {
        match self {
            StageSpec::Prune(s) => s.significance.as_deref(),
            StageSpec::Quantize(s) => s.significance.as_deref(),
            _ => None,
        }
    }

    /// The teacher directory a recovery stage distils, when it names a local one.
    pub fn teacher_dir(&self) -> Option<&Path> {
        match self {
            StageSpec::Recover(s) => s.teacher.as_deref().map(Path::new).filter(|p| p.is_dir()),
            _ => None,
        }
    }

    /// The corpus file a vocabulary stage reads, when it names one.
    pub fn corpus_file(&self) -> Option<&Path> {
        match self {
            StageSpec::Vocab(s) => s.corpus.as_deref(),
            _ => None,
        }
    }

    /// The stage's `pass` name in a config.
    fn pass_name(&self) -> &'static str {
        match self {
            StageSpec::Prune(_) => "prune",
            StageSpec::Quantize(_) => "quantize",
            StageSpec::Attention(_) => "attention",
            StageSpec::Recover(_) => "recover",
            StageSpec::Bsp(_) => "bsp",
            StageSpec::Shape(_) => "shape",
            StageSpec::Vocab(_) => "vocab",
        }
    }

    /// True for a prune stage, in any mode.
    fn prunes(&self) -> bool {
        matches!(self, StageSpec::Prune(_))
    }

    fn build(&self, hub: &HubAccess) -> Result<Box<dyn Stage>> {
        match self {
            StageSpec::Prune(settings) => Ok(Box::new(Prune::new(settings.clone())?)),
            StageSpec::Quantize(settings) => Ok(Box::new(Quantize::new(settings.clone())?)),
            StageSpec::Attention(settings) => Ok(Box::new(AttentionPass::new(settings.clone())?)),
            StageSpec::Recover(settings) => Ok(Box::new(Recover::new(settings.clone(), hub)?)),
            StageSpec::Bsp(settings) => Ok(Box::new(Bsp::new(settings.as_ref().clone())?)),
            StageSpec::Shape(settings) => Ok(Box::new(ShapePass::new(settings.clone())?)),
            StageSpec::Vocab(settings) => Ok(Box::new(Vocab::new(settings.clone()))),
        }
    }
}

/// `stages` with the vocabulary stage `--vocab` (or a config's `vocab` key) asks for: it
/// replaces the settings of a vocab stage the stages already end with, or is appended.
pub fn with_vocab(mut stages: Vec<StageSpec>, vocab: Option<VocabSettings>) -> Vec<StageSpec> {
    let Some(vocab) = vocab else {
        return stages;
    };
    if matches!(stages.last(), Some(StageSpec::Vocab(_))) {
        stages.pop();
    }
    stages.push(StageSpec::Vocab(vocab));
    stages
}

/// The selection data a run of `stages` decides on unless told otherwise: 2,000 perturbed train
/// sentences labelled by the input model when a stage prunes, half of dev otherwise. It is the
/// source that measured best on data no decision saw, in every prune mode (docs/promise.md): on
/// SST-2 the size config kept its promise and removed more than on half of dev, with all of dev
/// left to report on; in accuracy mode the gains found on half of dev or on gold-labelled train
/// sentences were selection (+2.29 and +1.03 points lost on unseen dev), while the perturbed
/// sentences kept every prediction.
pub fn default_selection(stages: &[StageSpec]) -> SelectionSpec {
    let defaults = SelectionSpec::default();
    match stages.iter().any(StageSpec::prunes) {
        true => SelectionSpec {
            on: SelectOn::TrainPerturbed,
            ..defaults
        },
        false => defaults,
    }
}

/// Everything that shapes a run's decisions; built from command-line flags or a config file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSettings {
    /// Model directory or hub id.
    pub model: String,
    /// How a hub id is fetched: offline, and the model's revision.
    #[serde(flatten)]
    pub hub: HubAccess,
    /// The task.
    pub task: Task,
    /// Task data (else `$GLUE_DIR`, else the hub dataset).
    pub data: Option<PathBuf>,
    /// Sentences per batch.
    pub batch_size: usize,
    /// Maximum tokens per input.
    pub max_length: Option<usize>,
    /// How the selection split is drawn.
    pub selection: SelectionSpec,
    /// A labelled file of the task to report on as well.
    pub test: Option<PathBuf>,
    /// The run's tolerance, from the original model.
    pub max_drop: Option<MaxDrop>,
    /// Confidence of the guard on every decision and of the report's intervals.
    pub confidence: f64,
    /// The stages, in order.
    pub stages: Vec<StageSpec>,
    /// Write the weights in this float precision (the model is judged as written); default:
    /// the input's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<StorageDtype>,
    /// Also write `model.onnx` (as `axcompress export --format onnx` does) beside the weights.
    #[serde(skip)]
    pub onnx: bool,
    /// How the models run (`--execution`, `--allow-nonfinite`); not part of the report.
    #[serde(skip)]
    pub runtime: Runtime,
}

/// Where and how a run writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Output model directory.
    pub dir: PathBuf,
    /// Files the run reads that its settings do not name (the config file): the output may not
    /// be, hold or sit inside them, as for the model, the data and significance reports.
    pub reads: Vec<PathBuf>,
    /// Replace an existing output (and discard an interrupted run's progress).
    pub force: bool,
    /// Continue an interrupted run from its progress file.
    pub resume: bool,
}

/// A finished run.
pub struct Finished {
    /// What was decided and measured (`report.json`).
    pub report: RunReport,
    /// Wall-clock figures (`timing.json`).
    pub timing: Timing,
}

/// Exit status of a run that wrote its output but cannot vouch for `max_drop` ([`FloorMissed`]).
pub const EXIT_FLOOR_MISSED: i32 = 3;

/// The error of a run that wrote its output but cannot vouch for `max_drop`: its selection
/// metric, guarded, ended below the floor, or the check split no decision saw bounds the drop
/// beyond `max_drop`. A pipeline that gates on the exit status stops; the output and its report
/// stay for inspection, and the process exits with [`EXIT_FLOOR_MISSED`].
#[derive(Debug, Clone, PartialEq)]
pub struct FloorMissed {
    /// What was missed and what to change.
    pub reason: String,
    /// The output directory.
    pub out: PathBuf,
}

impl std::fmt::Display for FloorMissed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, so max_drop is not kept; the output is written to {} for inspection (exit status {EXIT_FLOOR_MISSED})",
            self.reason,
            self.out.display()
        )
    }
}

impl std::error::Error for FloorMissed {}

impl Finished {
    /// `Err(FloorMissed)` when the run cannot vouch for its `max_drop`, else `Ok`.
    pub fn check_floor(&self, out: &Path) -> Result<()> {
        match &self.report.tolerance.advice {
            None => Ok(()),
            Some(reason) => Err(FloorMissed {
                reason: reason.clone(),
                out: out.to_path_buf(),
            }
            .into()),
        }
    }
}

/// What to change when the decisions held on the selection data but not on the check split.
const CHECK_ADVICE: &str = "the search fitted chance on its selection sentences, or the unseen data is too small to tell; decide on more sentences (--holdout) or allow a larger drop";

/// What to change when a run's stages end below the floor.
fn floor_advice(passes: &[Box<dyn Stage>]) -> &'static str {
    match passes.iter().any(|p| p.recovers()) {
        true => "the recovery did not win back what the stages before it spent; recover on more examples or lower recover_slack",
        false => "a stage that takes no decisions (uniform quantization) spent more than the allowance; use --bits mixed or a larger --max-drop",
    }
}

/// The progress file of a run writing `out`: `<out>.progress.json` beside it.
pub fn progress_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{name}.progress.json"))
}

/// The inputs the run's settings name besides the model and the data: a selection file, a
/// vocabulary corpus file, significance reports and a recovery's local teacher directory.
fn named_inputs(spec: &RunSettings) -> Vec<&Path> {
    let selection = match &spec.selection.on {
        SelectOn::File(path) => Some(path.as_path()),
        _ => None,
    };
    let stages = spec.stages.iter();
    let per_stage = stages.flat_map(|s| [s.significance(), s.teacher_dir(), s.corpus_file()]);
    std::iter::once(selection)
        .chain(per_stage)
        .flatten()
        .collect()
}

/// Every path the run reads: the model directory, the data, `--test`, the named inputs
/// ([`named_inputs`]) and the config file.
fn inputs_of<'a>(spec: &'a RunSettings, setup: &'a TaskSetup, out: &'a Output) -> Vec<&'a Path> {
    let given = [spec.data.as_deref(), spec.test.as_deref()];
    std::iter::once(setup.model.dir.as_path())
        .chain(given.into_iter().flatten())
        .chain(named_inputs(spec))
        .chain(out.reads.iter().map(PathBuf::as_path))
        .collect()
}

/// Runs the pipeline and writes `out.dir`.
pub fn run(spec: &RunSettings, out: &Output, quiet: bool) -> Result<Finished> {
    let started = Instant::now();
    // 1. Settings, model, destination, progress journal.
    check_confidence(spec.confidence)?;
    let passes = build_passes(spec)?;
    let setup = TaskSetup::load(
        &spec.model,
        &spec.hub,
        spec.task,
        spec.data.as_deref(),
        spec.max_length,
        spec.batch_size,
        spec.runtime,
    )?;
    check_destination(&inputs_of(spec, &setup, out), &out.dir, out.force)?;
    passes[0].check_input(&setup.model)?;
    for pass in &passes {
        pass.check_settings(&setup.model)?;
    }
    create_parent(&out.dir)?;
    let mut journal = open_journal(spec, out, &setup)?;
    // 2. Data: the selection split decides; the report split, dev and --test judge.
    let (splits, test) = load_data(spec, &setup)?;
    // 3. The original model's selection score: the run's tolerance is measured from it.
    let batches = SelectionBatches::new(
        &setup.model,
        &splits.selection.set,
        spec.task,
        &setup.labels,
        spec.batch_size,
        spec.confidence,
    )?;
    let baseline = batches.baseline;
    let run = Run {
        spec,
        setup: &setup,
        splits: &splits,
        batches: &batches,
        floor: spec.max_drop.map(|d| d.floor(baseline.metric)),
        advice: floor_advice(&passes),
        held_out_train: splits.held_out_train(),
        quiet,
    };
    run.log_start(baseline);
    // 4. Every stage, on the selection engine; a vocabulary stage re-encodes the data.
    let staged = run.stages(&passes, baseline, &mut journal)?;
    let model = match spec.dtype {
        Some(dtype) => staged.model.stored_as(dtype)?,
        None => staged.model,
    };
    let original = ModelOnData {
        model: &setup.model,
        splits: &splits,
        test: test.as_ref(),
    };
    let compressed = match &staged.reencoded {
        Some(data) => data.subject(&model),
        None => ModelOnData {
            model: &model,
            ..original
        },
    };
    // 5. The original and the compressed model on every split.
    let evaluation = run.judge().compare(&original, &compressed)?;
    // 6. Export with report.json and timing.json; the progress file has served its purpose.
    let history = history(spec, &setup.model, &passes, &splits)?;
    let prepared = prepare(&model, &history)?;
    let report = run.report(&model, &prepared, baseline, staged.reports, evaluation);
    let timing = timing(started, [&original, &compressed])?;
    let mut files = vec![
        ("report.json", pretty_json(&report)?),
        ("timing.json", pretty_json(&timing)?),
    ];
    for stage in &report.stages {
        files.extend(stage.files.iter().map(|(n, b)| (n.as_str(), b.clone())));
    }
    if spec.onnx {
        files.push(("model.onnx", onnx_file(&model)?));
    }
    prepared.write(&out.dir, &files, out.force)?;
    journal.finish()?;
    Ok(Finished { report, timing })
}

/// `model` as an ONNX file, checked by the reference interpreter (see [`crate::export::onnx`]).
fn onnx_file(model: &Model) -> Result<Vec<u8>> {
    let (onnx, _) = crate::export::onnx::checked_onnx(model, Default::default())?;
    for note in &onnx.notes {
        eprintln!("warning: model.onnx: {note}");
    }
    Ok(onnx.bytes)
}

/// The run's splits (with the check split when it has a floor: perturbed train sentences no
/// decision sees check it at the end) and `--test`, encoded by the input model's tokenizer.
fn load_data(spec: &RunSettings, setup: &TaskSetup) -> Result<(Splits, Option<EncodedSet>)> {
    let label = |set: &EncodedSet| {
        model_targets(&setup.model, spec.task, &setup.labels, set, spec.batch_size)
    };
    let splits = Splits::load(&spec.selection, &setup.data, &setup.encoder, &label)?;
    let splits = match spec.max_drop {
        Some(_) => splits.with_check(&spec.selection, &setup.data, &setup.encoder, &label)?,
        None => splits,
    };
    let test = spec
        .test
        .as_deref()
        .map(|p| read_test(spec.task, p, &setup.encoder))
        .transpose()?;
    Ok((splits, test))
}

fn build_passes(spec: &RunSettings) -> Result<Vec<Box<dyn Stage>>> {
    if spec.stages.is_empty() {
        bail!("the pipeline has no stages; add at least one [[stages]] entry");
    }
    let last = spec.stages.len() - 1;
    if let Some(i) = (0..last).find(|&i| matches!(spec.stages[i], StageSpec::Vocab(_))) {
        bail!(
            "stage {} is vocab but stage {} follows it; vocabulary pruning changes the tokenizer, so it must be the last stage",
            i + 1,
            i + 2
        );
    }
    // After quantize, only quantization-aware recovery and then vocab may follow: every other
    // pass slices or replaces float matrices.
    let quantize = |i: usize| matches!(spec.stages[i], StageSpec::Quantize(_));
    let may_follow_quantize =
        |s: &StageSpec| matches!(s, StageSpec::Recover(_) | StageSpec::Vocab(_));
    if let Some(i) = (0..last).find(|&i| quantize(i)) {
        if let Some(j) = (i + 1..=last).find(|&j| !may_follow_quantize(&spec.stages[j])) {
            bail!(
                "stage {} is {} but follows quantize (stage {}); after quantization only recover (quantization-aware) and vocab may run",
                j + 1,
                spec.stages[j].pass_name(),
                i + 1
            );
        }
    }
    spec.stages.iter().map(|s| s.build(&spec.hub)).collect()
}

/// What the steps of one run share.
struct Run<'a> {
    spec: &'a RunSettings,
    setup: &'a TaskSetup,
    splits: &'a Splits,
    batches: &'a SelectionBatches<'a>,
    floor: Option<f64>,
    /// What to change if the run ends below `floor`.
    advice: &'static str,
    /// Train positions training leaves out ([`Splits::held_out_train`]).
    held_out_train: Vec<usize>,
    quiet: bool,
}

impl Run<'_> {
    fn log_start(&self, baseline: Score) {
        if !self.quiet {
            let selection = &self.splits.selection.info;
            let labels = match self.spec.selection.on {
                SelectOn::TrainPerturbed => {
                    "; labelled by the input model, so the metric is agreement with it"
                }
                _ => "",
            };
            eprintln!(
                "compressing {} for {} on {} selection examples ({}, {}{labels}); selection {} {:.4}",
                self.spec.model,
                self.spec.task,
                selection.examples,
                selection.source,
                selection.path,
                self.batches.metric,
                baseline.metric
            );
        }
    }

    /// Runs every pass in order on the original model.
    fn stages(
        &self,
        passes: &[Box<dyn Stage>],
        baseline: Score,
        journal: &mut Journal,
    ) -> Result<Staged> {
        let mut model = self.setup.model.clone();
        let mut before = baseline;
        let mut reports = Vec::new();
        let mut reencoded = None;
        for (stage, pass) in passes.iter().enumerate() {
            let ctx = self.context(passes, stage);
            ctx.log(&format!(
                "stage {}: {} {}",
                stage + 1,
                pass.name(),
                pass.settings_value()?
            ));
            let (out, summary) = pass.run_stage(model, &ctx, journal)?;
            model = out.model;
            let after = match pass.retokenizes() {
                false => self.batches.score(&model)?,
                true => {
                    let data = encode_anew(&model, self.spec, self.setup, self.splits)?;
                    let set = &data.splits.selection.set;
                    let score = self
                        .batches
                        .encoded_anew(&model, set, self.spec.batch_size)?
                        .score(&model)?;
                    reencoded = Some(data);
                    score
                }
            };
            reports.push(StageReport {
                pass: pass.name(),
                settings: pass.settings_value()?,
                selection_before: before,
                selection_after: after,
                spent_points: points(before.metric, after.metric),
                details: out.details,
                alternatives: self.alternatives(&out.alternatives)?,
                files: out.files,
                summary,
            });
            before = after;
        }
        Ok(Staged {
            model,
            reports,
            reencoded,
        })
    }

    /// What stage number `stage` of `passes` may use.
    fn context<'s>(&'s self, passes: &[Box<dyn Stage>], stage: usize) -> StageContext<'s> {
        StageContext {
            source: &self.spec.model,
            task: self.spec.task,
            labels: &self.setup.labels,
            selection: &self.splits.selection,
            held_out_train: &self.held_out_train,
            batches: self.batches,
            floor: self.floor,
            recovery_follows: passes[stage + 1..].iter().any(|p| p.recovers()),
            stage,
            batch_size: self.spec.batch_size,
            max_length: self.setup.max_length,
            quiet: self.quiet,
            original: &self.setup.model,
            data: &self.setup.data,
            encoder: &self.setup.encoder,
        }
    }
}

/// What the stages produced.
struct Staged {
    /// The compressed model.
    model: Model,
    /// One report per stage.
    reports: Vec<StageReport>,
    /// The run's data as the model's tokenizer encodes it, after a stage that changed it.
    reencoded: Option<Reencoded>,
}

impl Run<'_> {
    /// Evaluates a stage's alternatives against the original model, like the result.
    fn alternatives(&self, alternatives: &[Alternative]) -> Result<Vec<AlternativeReport>> {
        let judge = self.judge();
        alternatives
            .iter()
            .map(|a| {
                self.log(&format!("evaluating the alternative: {}", a.name));
                Ok(AlternativeReport {
                    name: a.name,
                    weights_bytes: prepare(&a.model, &[])?.weights.len() as u64,
                    evaluation: judge.compare(
                        &ModelOnData {
                            model: &self.setup.model,
                            splits: self.splits,
                            test: None,
                        },
                        &ModelOnData {
                            model: &a.model,
                            splits: self.splits,
                            test: None,
                        },
                    )?,
                })
            })
            .collect()
    }

    fn judge(&self) -> Judge<'_> {
        Judge {
            task: self.spec.task,
            labels: &self.setup.labels,
            batch_size: self.spec.batch_size,
            confidence: self.spec.confidence,
        }
    }

    fn log(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    /// Why the run cannot vouch for its `max_drop`, and what to change; `None` when it can. A
    /// split no decision saw that may vouch (one of `evaluation` with a bound, [`Judge::compare`]) and bounds the
    /// drop within `max_drop` is the promise kept, whatever the selection data says (a stage
    /// that takes no decisions, uniform quantization, may end below the selection floor and
    /// still be vouched for there). Without such a split, the selection metric the run ended at
    /// (`last`), guarded, must hold the floor.
    fn not_kept(&self, last: Score, evaluation: &[Comparison]) -> Option<String> {
        let (c, metric) = (self.spec.confidence, self.batches.metric);
        let max_drop = self.spec.max_drop?;
        let allowed = max_drop.points_at(1.0) + 1e-9;
        let bounds: Vec<_> = evaluation
            .iter()
            .filter_map(|w| Some((w, w.bound_points?)))
            .collect();
        if bounds.iter().any(|(_, b)| *b <= allowed) {
            return None;
        }
        if let Some(floor) = self.floor.filter(|&f| last.judged() < f) {
            return Some(format!(
                "the run ended at selection {metric} {:.4} (guarded {:.4} at confidence {c}), below its floor {floor:.4}: {}",
                last.metric,
                last.judged(),
                self.advice
            ));
        }
        if bounds.is_empty() {
            return None;
        }
        let each = bounds
            .iter()
            .map(|(w, b)| format!("{b:.2} points on {} {} sentences", w.examples, w.split))
            .collect::<Vec<_>>()
            .join(" and ");
        Some(format!(
            "on the data no decision saw, the drop's bound is {each} (confidence {c} together), beyond max_drop {max_drop}: {CHECK_ADVICE}"
        ))
    }

    /// The report of the run, from what every step produced.
    fn report(
        &self,
        model: &Model,
        prepared: &Prepared,
        baseline: Score,
        stages: Vec<StageReport>,
        evaluation: Vec<Comparison>,
    ) -> RunReport {
        let (spec, original) = (self.spec, &self.setup.model);
        let last = stages.last().map_or(baseline, |s| s.selection_after);
        let bound_of = |split: &str| {
            let c = evaluation.iter().find(|c| c.split == split);
            c.and_then(|c| c.bound_points)
        };
        let (check_bound_points, report_bound_points) = (bound_of("check"), bound_of("report"));
        let advice = self.not_kept(last, &evaluation);
        RunReport {
            schema: report::SCHEMA,
            model: spec.model.clone(),
            task: spec.task.name(),
            metric: self.batches.metric,
            data: DataReport {
                origin: self.setup.data.origin,
                location: self.setup.data.location(),
                selection: self.splits.selection.info.clone(),
                report: self.splits.report.as_ref().map(|r| r.info.clone()),
                check: self.splits.check.as_ref().map(|c| c.info.clone()),
                test: spec.test.as_ref().map(|p| p.display().to_string()),
            },
            tolerance: ToleranceReport {
                max_drop: spec.max_drop,
                baseline: baseline.metric,
                floor: self.floor,
                spent_points: points(baseline.metric, last.metric),
                confidence: spec.confidence,
                guarded_spent_points: points(baseline.metric, last.judged()),
                check_bound_points,
                report_bound_points,
                kept: advice.is_none(),
                advice,
                warnings: promise_warnings(&evaluation, spec.max_drop),
            },
            stages,
            evaluation,
            parameters: BeforeAfter::new(
                original.parameter_count() as u64,
                model.parameter_count() as u64,
            ),
            weights_bytes: BeforeAfter::new(
                weights_bytes(&original.dir),
                prepared.weights.len() as u64,
            ),
            hf_compatible: prepared.compat.hf_compatible,
            hf_incompatible_reason: prepared.compat.reason.clone(),
            loads_in: crate::export::loads_in(&prepared.compat, model.is_quantized(), spec.onnx),
            structure: model.config.structure.clone(),
        }
    }
}

/// Opens the run's progress journal; `--force` without `--resume` discards old progress.
fn open_journal(spec: &RunSettings, out: &Output, setup: &TaskSetup) -> Result<Journal> {
    let path = progress_path(&out.dir);
    if out.force && !out.resume && path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Journal::open(&path, &run_key(spec, setup)?, out.resume)
}

/// Identifies a run by everything that shapes its decisions: the model's weights, the content
/// of the data files, of a selection file, of significance reports, of a vocabulary corpus file
/// and of a local teacher directory, and every setting (not how the model was named or the test
/// file, which decide nothing).
fn run_key(spec: &RunSettings, setup: &TaskSetup) -> Result<String> {
    let mut settings = serde_json::to_value(spec)?;
    let obj = settings
        .as_object_mut()
        .context("run settings are an object")?;
    for k in ["model", "offline", "revision", "test"] {
        obj.remove(k);
    }
    let mut h = Fnv1a::default();
    h.write_bytes(setup.model.fingerprint()?.as_bytes());
    h.write_bytes(setup.data.location().as_bytes());
    h.write_bytes(settings.to_string().as_bytes());
    // A directory (a teacher) counts by the files in it.
    let named = named_inputs(spec)
        .into_iter()
        .flat_map(|p| match p.is_dir() {
            true => files_in(p),
            false => vec![p.to_path_buf()],
        });
    for file in setup.data.files().into_iter().chain(named) {
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        h.write(bytes.len() as u64);
        h.write_bytes(&bytes);
    }
    Ok(h.hex())
}

/// The regular files directly in `dir`, sorted by name.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The input's pass history plus one entry per stage of this run.
fn history(
    spec: &RunSettings,
    original: &Model,
    passes: &[Box<dyn Stage>],
    splits: &Splits,
) -> Result<Vec<Value>> {
    let mut history: Vec<Value> = original
        .config
        .raw
        .get("axcompress")
        .and_then(|a| a.get("history"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for pass in passes {
        history.push(json!({
            "pass": pass.name(),
            "settings": pass.settings_value()?,
            "max_drop": spec.max_drop,
            "selection": splits.selection.info,
            "source_model": spec.model,
        }));
    }
    Ok(history)
}

fn read_test(task: Task, path: &Path, encoder: &TextEncoder) -> Result<EncodedSet> {
    if !path.is_file() {
        bail!(
            "--test {}: no such file; pass a labelled TSV file of the task",
            path.display()
        );
    }
    encode(&glue::read(task, path)?, "", encoder)
}

/// Wall time so far and batch-1 latency of both models, each on dev as its tokenizer encodes it.
fn timing(started: Instant, [original, compressed]: [&ModelOnData; 2]) -> Result<Timing> {
    let dev = &original.splits.dev;
    Ok(Timing {
        latency_b1_p50_ms_before: latency_ms(original.model, dev)?,
        latency_b1_p50_ms_after: latency_ms(compressed.model, &compressed.splits.dev)?,
        latency_samples: LATENCY_SAMPLES.min(dev.sequences.len()),
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Median batch-1 latency over the first dev sentences, in ms.
fn latency_ms(model: &Model, dev: &EncodedSet) -> Result<f64> {
    let times = dev
        .sequences
        .iter()
        .take(LATENCY_SAMPLES)
        .map(|s| time_single(model, s))
        .collect::<Result<Vec<_>>>()?;
    Ok(median(&times) * 1000.0)
}
