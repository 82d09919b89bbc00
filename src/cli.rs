//! Command-line definitions (clap derive) for every subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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

/// Arguments of `axcompress eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model to evaluate.
    #[command(flatten)]
    pub model: ModelArgs,
    /// GLUE task.
    #[arg(long, short, value_enum)]
    pub task: Task,
    /// GLUE task directory (holding e.g. dev.tsv, or SST-2/dev.tsv) or a single TSV file.
    #[arg(long, short)]
    pub data: Option<PathBuf>,
    /// Split to evaluate when --data is a directory (train, dev; MNLI also dev_matched, dev_mismatched).
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Sentences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Maximum tokens per input, special tokens included (longest-first truncation) [default:
    /// 128, capped at the model's position table].
    #[arg(long)]
    pub max_length: Option<usize>,
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
