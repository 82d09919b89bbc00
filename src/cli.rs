//! Command-line definitions (clap derive) for every subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::analyze::elements::Level;
use crate::analyze::report::Method;
use crate::data::task::Task;
use crate::passes::prune::Mode;

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
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
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
    /// Latency, throughput, memory, size and metric of a model, against a baseline.
    Bench(BenchArgs),
    /// Significance analysis: how much each block, head and FFN neuron group matters to the task.
    Analyze(AnalyzeArgs),
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
}

/// The task, its data and how to batch it.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// GLUE task.
    #[arg(long, short, value_enum)]
    pub task: Task,
    /// GLUE task directory (holding e.g. dev.tsv, or SST-2/dev.tsv) or a single TSV file.
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
}

/// Arguments of `axcompress inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model to describe.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The data decisions are made on (analysis / selection data).
#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// `holdout` (a seeded slice of the train split), `dev`, or a TSV file.
    #[arg(long, default_value = "holdout")]
    pub on: String,
    /// Examples in the train hold-out.
    #[arg(long, default_value_t = 2000)]
    pub holdout: usize,
    /// Seed of the hold-out sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only the first N examples (quick looks).
    #[arg(long)]
    pub limit: Option<usize>,
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
    /// Write the JSON report here (wall-clock figures go to `<stem>.timing.json` beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write SVG heatmaps here [default: beside --out].
    #[arg(long)]
    pub plots: Option<PathBuf>,
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
    /// accuracy: keep removals that do not lower the selection metric; size / speed: remove
    /// within --max-drop, favouring parameters / latency saved.
    #[arg(long, value_enum, default_value = "accuracy")]
    pub mode: Mode,
    /// Allowed metric drop for size / speed: absolute points (1.0 = one accuracy point) or
    /// relative with a `%` suffix (e.g. `2%`).
    #[arg(long, value_parser = parse_max_drop)]
    pub max_drop: Option<MaxDrop>,
    /// Cap on tentative removals re-evaluated (all levels together).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Stop a level after this many consecutive rejected removals (0: never); candidates come in
    /// ascending significance, so long runs of rejections rarely end.
    #[arg(long, default_value_t = 20)]
    pub patience: usize,
    /// Levels to prune, in order blocks → heads → groups.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "blocks,heads,groups"
    )]
    pub levels: Vec<Level>,
    /// FFN neurons per group (pruned widths stay multiples of it).
    #[arg(long, default_value_t = 32)]
    pub group_size: usize,
    /// Read significance from this report (of the same model) instead of recomputing it per level.
    #[arg(long)]
    pub significance: Option<PathBuf>,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}

/// An allowed metric drop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxDrop {
    /// In metric points (1.0 = 0.01 of a metric in [0, 1]).
    Points(f64),
    /// A fraction of the baseline metric.
    Relative(f64),
}

fn parse_max_drop(s: &str) -> Result<MaxDrop, String> {
    let (number, relative) = match s.strip_suffix('%') {
        Some(n) => (n, true),
        None => (s, false),
    };
    let v: f64 = number.trim().parse().map_err(|_| {
        format!("`{s}` is not a number (use e.g. 1.0 for one point, or 2% for relative)")
    })?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` must be a non-negative number"));
    }
    Ok(if relative {
        MaxDrop::Relative(v / 100.0)
    } else {
        MaxDrop::Points(v)
    })
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
}
