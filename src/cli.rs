//! Command-line definitions (clap derive) for every subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::analyze::elements::Level;
use crate::analyze::report::Method;
use crate::analyze::shard::Shard;
use crate::data::batch::BatchOrder;
use crate::data::splits::SelectOn;
use crate::data::task::Task;
use crate::formats::quant::Execution;
use crate::model::runtime::{Nonfinite, Runtime};
use crate::model::source::HubAccess;
use crate::model::storage::StorageDtype;
use crate::passes::attention::AttentionFlags;
use crate::passes::prune::PruneFlags;
use crate::passes::quantize::{BitsChoice, QuantizeFlags};
use crate::passes::vocab::VocabChoice;
use crate::pipeline::tolerance::MaxDrop;

/// Make fine-tuned BERT-family models faster, smaller and sometimes more accurate for one task.
#[derive(Debug, Parser)]
#[command(name = "axcompress", version, about)]
pub struct Cli {
    /// Print machine-readable JSON on stdout (human logs stay on stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars or log lines on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// How quantized matrices run: auto (int8 and int4 in axcompress's own kernels, the fastest
    /// measured), kernel, candle or dequantized [default: auto].
    #[arg(long, global = true, value_enum)]
    pub execution: Option<Execution>,
    /// Worker threads for every kernel (candle's, gemm's and axcompress's own)
    /// [default: $RAYON_NUM_THREADS, else every core].
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Peak memory to size the caches by: the selection engine's and the reconstruction's
    /// hidden-state caches (batches past them are recomputed: same results, more time), the
    /// analysis's stacked ablations and a training step's batch (run in parts past it), e.g.
    /// `4G`, `3500M` [default: 4G, or 8 × the model's f32 weights when more].
    #[arg(long, global = true, value_name = "SIZE", value_parser = crate::memory::parse_size)]
    pub memory_limit: Option<u64>,
    /// Load checkpoints whose float tensors hold NaN or ±Inf (refused by default). A run still
    /// stops if such values reach a loss or a metric.
    #[arg(long, global = true)]
    pub allow_nonfinite: bool,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// How every model this command loads runs: `--execution` and `--allow-nonfinite`.
    pub fn runtime(&self) -> Runtime {
        Runtime {
            execution: self.execution.unwrap_or_default(),
            nonfinite: match self.allow_nonfinite {
                true => Nonfinite::Allow,
                false => Nonfinite::Refuse,
            },
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate a model on a GLUE task's data: metrics, loss, wall time, sentences/s.
    Eval(EvalArgs),
    /// Describe a model: family, per-layer heads and FFN widths, parameters and bytes by dtype.
    Inspect(InspectArgs),
    /// Accuracy-driven pruning of blocks, heads and FFN groups; writes a smaller model directory.
    Prune(PruneArgs),
    /// int8 / int4 quantization, uniform or mixed by significance; writes a compressed-tensors model.
    Quantize(QuantizeArgs),
    /// Sign-matching or hard top-k attention in the layers where the task allows it.
    Attention(AttentionArgs),
    /// Run a whole compression pipeline declared in a TOML config (what CI jobs run).
    Compress(CompressArgs),
    /// Latency, throughput, memory, size and metric of a model, against a baseline.
    Bench(BenchArgs),
    /// Significance analysis: how much each block, head and FFN neuron group matters to the task.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Analyze(AnalyzeCommand),
    /// Write a model for another runtime: one ONNX file (ONNX Runtime), or a stock transformers
    /// directory when the model fits one.
    Export(ExportArgs),
}

/// Where the model comes from.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory (Hugging Face format) or hub id `org/name` (local cache first).
    #[arg(long, short)]
    pub model: String,
    /// Never use the network for hub ids (also `HF_HUB_OFFLINE=1`).
    #[arg(long)]
    pub offline: bool,
    /// Branch, tag or commit of a hub id [default: main].
    #[arg(long)]
    pub revision: Option<String>,
}

impl ModelArgs {
    /// How the model's hub id is fetched.
    pub fn hub(&self) -> HubAccess {
        HubAccess {
            offline: self.offline,
            revision: self.revision.clone(),
        }
    }
}

/// The task, its data and how to batch it.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// GLUE task.
    #[arg(long, short, value_enum)]
    pub task: Task,
    /// GLUE task directory (holding e.g. dev.tsv, or SST-2/dev.tsv) or a single TSV file
    /// [default: $GLUE_DIR/<TaskDir>, else the hub dataset nyu-mll/glue, local cache first].
    #[arg(long, short)]
    pub data: Option<PathBuf>,
    /// Sentences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Maximum tokens per input, special tokens included (longest-first truncation) [default:
    /// 128, capped at the model's position table].
    #[arg(long)]
    pub max_length: Option<usize>,
}

/// Arguments of `axcompress eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model to evaluate.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task and data.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Split to evaluate when --data is a directory (train, dev; MNLI also dev_matched, dev_mismatched).
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Also write every example's logits and predicted label to this JSON file.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Replace an existing --predictions file.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `axcompress inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model to describe.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Where `export` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// `model.onnx` (self-contained, opset 17, or 21 with int4) with the tokenizer and
    /// `config.json` beside it: ONNX Runtime, Optimum and other ONNX runtimes.
    Onnx,
    /// A directory stock transformers 5.x loads (refused for per-layer shapes, approximate
    /// attention and block-sparse matrices, which it cannot hold).
    Transformers,
}

/// Arguments of `axcompress export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The model to export (any model axcompress loads or wrote).
    #[command(flatten)]
    pub model: ModelArgs,
    /// The target runtime's format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output directory.
    #[arg(long, short)]
    pub out: PathBuf,
    /// How int8 matrices are written in ONNX: `dynamic` (activations quantized per call,
    /// MatMulInteger: ONNX Runtime's integer kernels) or `qdq` (DequantizeLinear weights).
    #[arg(long, value_enum, default_value_t)]
    pub int8: crate::export::onnx::Int8Form,
    /// How int4 matrices are written in ONNX: `int8` (requantized to int8 and written as --int8
    /// says: twice the bytes, ONNX Runtime's faster int8 kernels) or `blocks` (the INT4 codes in
    /// blocks of 32, opset 21: the smallest file, slower than f32 at batch 32 in ONNX Runtime
    /// 1.32).
    #[arg(long, value_enum, default_value_t)]
    pub int4: crate::export::onnx::Int4Form,
    /// Replace --out if axcompress wrote it.
    #[arg(long)]
    pub force: bool,
}

/// The data decisions are made on (analysis / selection data). Unset flags take their defaults,
/// or a config's values under `compress`.
#[derive(Debug, Args, Default)]
pub struct SelectionArgs {
    /// Decide on: `dev` (a seeded --select-fraction of the task's dev split; the rest of dev is
    /// the report split that shows how the decisions hold), `train-holdout` (a seeded sample of
    /// the train split; honest only for a model that never saw those examples, and a fine-tuned
    /// model has usually seen all of train), `train-perturbed` (such a sample with a fifth of its
    /// words replaced by words of other sampled sentences, labelled by the input model itself:
    /// the metric is agreement with the input on text it has not seen, and all of dev is the
    /// report split), or a labelled TSV file [default: train-perturbed when a prune runs, in any
    /// mode, else dev].
    #[arg(long, value_parser = SelectOn::parse)]
    pub on: Option<SelectOn>,
    /// Fraction of the dev split used for selection under `--on dev` [default: 0.5].
    #[arg(long)]
    pub select_fraction: Option<f64>,
    /// Examples sampled from train under `--on train-holdout` / `train-perturbed` [default: 2000].
    #[arg(long)]
    pub holdout: Option<usize>,
    /// Seed of the dev split or the train hold-out [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use only the first N selection examples (quick looks).
    #[arg(long)]
    pub limit: Option<usize>,
}

/// `axcompress analyze`: an analysis, or `analyze merge`.
#[derive(Debug)]
pub enum AnalyzeCommand {
    /// An analysis, or one shard of it.
    Run(Box<AnalyzeArgs>),
    /// `analyze merge`.
    Merge(MergeArgs),
}

// By hand: clap's derive would read the analysis's required flags even under `merge`.
impl clap::FromArgMatches for AnalyzeCommand {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        match matches.subcommand() {
            Some(("merge", sub)) => Ok(AnalyzeCommand::Merge(MergeArgs::from_arg_matches(sub)?)),
            _ => Ok(AnalyzeCommand::Run(Box::new(
                AnalyzeArgs::from_arg_matches(matches)?,
            ))),
        }
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for AnalyzeCommand {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        AnalyzeAction::augment_subcommands(AnalyzeArgs::augment_args(cmd))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Arguments of `axcompress analyze`.
#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The model to analyse.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task and data.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Analysis data.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Exact ablation, first-order Taylor estimates, or both (with their rank correlation).
    #[arg(long, value_enum, default_value = "ablation")]
    pub method: Method,
    /// Levels to analyse, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "blocks,heads,groups"
    )]
    pub levels: Vec<Level>,
    /// FFN neurons per group (must divide every FFN width).
    #[arg(long, default_value_t = 32)]
    pub group_size: usize,
    /// Under `--method ablation`: groups per layer ablated exactly (the ones Taylor ranks least
    /// significant), or `all`; the rest keep their Taylor estimate.
    #[arg(long, default_value = "8", value_parser = parse_count_or_all)]
    pub exact_groups: CountOrAll,
    /// Examples (the first of the analysis data) for the Taylor pass, or `all` [default: 512
    /// under `--method ablation`, where it only groups neurons and picks groups to ablate;
    /// `all` otherwise].
    #[arg(long, value_parser = parse_count_or_all)]
    pub taylor_examples: Option<CountOrAll>,
    /// Cap the analysis at N forward-pass equivalents (the report's cost bound): the
    /// candidates the Taylor pass ranks least significant are ablated first, level by level in
    /// turn, the rest keep their Taylor estimate [default: no cap, every candidate ablated].
    #[arg(long, value_name = "N")]
    pub budget_passes: Option<f64>,
    /// Cap the analysis at about M minutes: converted into --budget-passes from the timed
    /// baseline pass (so the report depends on this machine's speed; shards need
    /// --budget-passes).
    #[arg(long, value_name = "M", conflicts_with = "budget_passes")]
    pub budget_minutes: Option<f64>,
    /// Measure only share I of N of the ablations (0-based; e.g. 0/4 … 3/4), one process or
    /// machine each; `analyze merge` joins the N files into the report one run writes.
    #[arg(long, value_name = "I/N", requires = "out")]
    pub shard: Option<Shard>,
    /// Write the JSON report here (wall-clock figures go to `<stem>.timing.json` beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write SVG heatmaps here [default: beside --out].
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Replace an existing --out report (and its timing file).
    #[arg(long)]
    pub force: bool,
}

/// Subcommands of `axcompress analyze`.
#[derive(Debug, Subcommand)]
pub enum AnalyzeAction {
    /// Join the files of `analyze --shard I/N` (all N, any order) into the report of one run.
    Merge(MergeArgs),
}

/// Arguments of `axcompress analyze merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shard files.
    #[arg(required = true, value_name = "SHARD")]
    pub shards: Vec<PathBuf>,
    /// Write the merged report here.
    #[arg(long)]
    pub out: PathBuf,
    /// Write SVG heatmaps here [default: beside --out].
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Replace an existing --out report.
    #[arg(long)]
    pub force: bool,
}

/// A count, or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountOrAll {
    /// At most this many.
    Count(usize),
    /// No limit.
    All,
}

fn parse_count_or_all(s: &str) -> Result<CountOrAll, String> {
    match s {
        "all" => Ok(CountOrAll::All),
        n => n
            .parse()
            .map(CountOrAll::Count)
            .map_err(|_| format!("expected a number or `all`, got `{n}`")),
    }
}

/// Arguments of `axcompress quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model to quantize (never modified); may be a pruned axcompress output.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task and data.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Selection data.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Quantization settings.
    #[command(flatten)]
    pub quantize: QuantizeFlags,
    /// Tolerance, test data, resume.
    #[command(flatten)]
    pub run: RunArgs,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// The run's tolerance, extra report data, and where the result goes.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Allowed drop of the selection metric from the original model, for the whole run:
    /// absolute points (1.0 = one accuracy point) or relative with a `%` suffix (e.g. `2%`).
    #[arg(long, value_parser = MaxDrop::parse)]
    pub max_drop: Option<MaxDrop>,
    /// Confidence of the promise: every decision keeps the one-sided bound of the drop against
    /// the original (paired outcomes on the selection data) within --max-drop at this level, and
    /// reports give the report split's drop with an interval at it; 0.5 decides by the point
    /// estimate [default: 0.9].
    #[arg(long)]
    pub confidence: Option<f64>,
    /// Also report before/after on this labelled TSV file of the task.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// After the stages, keep only the tokens the task's train + dev data produce (and the
    /// special tokens); the tokenizer is rewritten to match. Exact on that corpus.
    #[arg(long, value_enum)]
    pub vocab: Option<VocabChoice>,
    /// With --vocab: take the corpus from this text file instead (one text per line; tabs
    /// separate texts). Implies --vocab corpus.
    #[arg(long)]
    pub vocab_corpus: Option<PathBuf>,
    /// Write the weights in this float precision; the model is judged as written [default:
    /// the input's].
    #[arg(long, value_enum)]
    pub dtype: Option<StorageDtype>,
    /// Also write `model.onnx` beside the weights, as `axcompress export --format onnx` does
    /// (config: `onnx = true`).
    #[arg(long)]
    pub onnx: bool,
    /// Replace an existing output directory (and discard an interrupted run's progress).
    #[arg(long)]
    pub force: bool,
    /// Continue an interrupted run from `<out>.progress.json` without redoing accepted work.
    #[arg(long)]
    pub resume: bool,
}

/// Arguments of `axcompress prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The model to prune (never modified).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task and data.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Selection data.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Pruning settings.
    #[command(flatten)]
    pub prune: PruneFlags,
    /// After pruning, fine-tune by distilling the input model on this many train examples (a
    /// `recover` stage with its defaults; the best parameters on the selection split are kept).
    #[arg(long, value_name = "EXAMPLES")]
    pub recover: Option<usize>,
    /// With --recover: replace each ordinary token of a training sentence, with probability P,
    /// by a token of another sentence of the batch (augmented distillation) [default: 0].
    #[arg(long, value_name = "P", requires = "recover")]
    pub augment: Option<f64>,
    /// Tolerance, test data, resume.
    #[command(flatten)]
    pub run: RunArgs,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `axcompress attention`.
#[derive(Debug, Args)]
pub struct AttentionArgs {
    /// The model whose attention to approximate (never modified).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task and data.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Selection data.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Attention settings.
    #[command(flatten)]
    pub attention: AttentionFlags,
    /// Tolerance, test data, resume.
    #[command(flatten)]
    pub run: RunArgs,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `axcompress compress`: a config file, and flags that override its keys.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// The pipeline config (TOML; see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Model directory or hub id (overrides `model`).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Never use the network for hub ids and datasets (also `HF_HUB_OFFLINE=1`).
    #[arg(long)]
    pub offline: bool,
    /// Branch, tag or commit of the model's hub id (overrides `revision`) [default: main].
    #[arg(long)]
    pub revision: Option<String>,
    /// GLUE task (overrides `task`).
    #[arg(long, short, value_enum)]
    pub task: Option<Task>,
    /// Task data (overrides `data`).
    #[arg(long, short)]
    pub data: Option<PathBuf>,
    /// Sentences per batch (overrides `batch_size`).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Maximum tokens per input (overrides `max_length`).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Selection data (overrides `[selection]`).
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Prune settings (override the keys of every prune stage).
    #[command(flatten)]
    pub prune: PruneFlags,
    /// Precision of every quantize stage: 8, 4 or mixed (overrides `bits`).
    #[arg(long, value_enum)]
    pub bits: Option<BitsChoice>,
    /// Tolerance, test data, resume.
    #[command(flatten)]
    pub run: RunArgs,
    /// Output model directory (overrides `out`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Arguments of `axcompress bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model to measure.
    #[command(flatten)]
    pub model: ModelArgs,
    /// A baseline model to compare with (runs interleaved with --model).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Task and data (dev split).
    #[command(flatten)]
    pub task: TaskArgs,
    /// Dev sentences timed one by one for batch-1 latency.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Timed passes over the dev set at --batch-size for throughput.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// How throughput batches are formed: sorted by length (what eval does) or in file order
    /// (padding to each batch's longest, as a plain PyTorch loop does).
    #[arg(long, value_enum, default_value_t = BatchOrder::Sorted)]
    pub order: BatchOrder,
}
