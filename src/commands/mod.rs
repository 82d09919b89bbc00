//! One module per subcommand, each with a `run` entry point.

pub mod analyze;
pub mod eval;
pub mod inspect;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::cli::{Cli, ModelArgs, TaskArgs};
use crate::data::labels::LabelMap;
use crate::model::tokenizer::TextEncoder;
use crate::model::Model;

/// What every task-level command needs: the model, its label mapping, a tokenizer and the data path.
pub struct TaskSetup {
    /// The loaded model.
    pub model: Model,
    /// Model outputs → task labels.
    pub labels: LabelMap,
    /// Tokenizer truncating at `max_length`.
    pub encoder: TextEncoder,
    /// Maximum tokens per input.
    pub max_length: usize,
    /// Task data path.
    pub data: PathBuf,
}

impl TaskSetup {
    /// Validates the arguments and loads model, labels and tokenizer; `split` names the file
    /// the error message suggests when `--data` is missing.
    pub fn load(model: &ModelArgs, task: &TaskArgs, split: &str) -> Result<Self> {
        let Some(data) = task.data.clone() else {
            bail!(
                "no --data given: pass a GLUE {} directory holding {split}.tsv (or the .tsv file itself), e.g. --data glue/{}",
                task.task.glue_dir(),
                task.task.glue_dir()
            );
        };
        if task.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let loaded = Model::load(&model.model, model.offline)?;
        let labels = LabelMap::new(&loaded.config, task.task)
            .with_context(|| format!("model {}", model.model))?;
        let max_length = checked_max_length(task.max_length, loaded.config.max_input_length())?;
        let encoder = TextEncoder::load(&loaded.dir, max_length)?;
        Ok(TaskSetup {
            model: loaded,
            labels,
            encoder,
            max_length,
            data,
        })
    }
}

/// The maximum input length to use: the requested one if the model allows it, else 128 capped at
/// the model's position table.
pub fn checked_max_length(requested: Option<usize>, allowed: usize) -> Result<usize> {
    match requested {
        None => Ok(128.min(allowed)),
        Some(n) if (2..=allowed).contains(&n) => Ok(n),
        Some(n) => bail!("--max-length {n} is out of range: use 2..={allowed} (max_position_embeddings in config.json)"),
    }
}

/// Prints a human log line on stderr unless `--quiet`.
pub fn log(cli: &Cli, line: &str) {
    if !cli.quiet {
        eprintln!("{line}");
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
