//! Command-line definitions (clap derive) for every subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::analyze::elements::Level;
use crate::analyze::report::Method;
use crate::data::task::Task;

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

/// Arguments of `axcompress analyze`.
#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The model to analyse.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task and data.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Analysis data: `holdout` (a seeded slice of the train split), `dev`, or a TSV file.
    #[arg(long, default_value = "holdout")]
    pub on: String,
    /// Examples in the train hold-out.
    #[arg(long, default_value_t = 2000)]
    pub holdout: usize,
    /// Seed of the hold-out sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only the first N analysis examples (quick looks).
    #[arg(long)]
    pub limit: Option<usize>,
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
