//! One module per subcommand, each with a `run` entry point.

pub mod analyze;
pub mod bench;
pub mod eval;
pub mod inspect;
pub mod prune;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::analyze::report::DataInfo;
use crate::cli::{Cli, ModelArgs, SelectionArgs, TaskArgs};
use crate::data::batch::{encode, EncodedSet};
use crate::data::glue::{self, Dataset};
use crate::data::labels::LabelMap;
use crate::data::sample::sample_indices;
use crate::data::task::Task;
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

/// Loads, samples and tokenises the analysis / selection data chosen by `--on`.
pub fn selection_data(
    args: &SelectionArgs,
    task: Task,
    data: &Path,
    encoder: &TextEncoder,
) -> Result<(EncodedSet, DataInfo)> {
    let (source, path) = match args.on.as_str() {
        "holdout" => (
            "train-holdout",
            glue::split_paths(task, data, "train")?.remove(0).1,
        ),
        "dev" => ("dev", glue::split_paths(task, data, "dev")?.remove(0).1),
        file => ("file", PathBuf::from(file)),
    };
    if source == "file" && !path.is_file() {
        bail!(
            "--on {}: no such file; use holdout, dev or a TSV file",
            path.display()
        );
    }
    let full = glue::read(task, &path)?;
    let available = full.examples.len();
    let mut picked: Vec<usize> = if source == "train-holdout" {
        sample_indices(available, args.holdout, args.seed)
    } else {
        (0..available).collect()
    };
    if let Some(limit) = args.limit {
        picked.truncate(limit);
    }
    if picked.is_empty() {
        bail!(
            "{}: the analysis data is empty (check --holdout / --limit)",
            path.display()
        );
    }
    let subset = Dataset {
        path: path.clone(),
        examples: picked.iter().map(|&i| full.examples[i].clone()).collect(),
    };
    let info = DataInfo {
        source: source.to_string(),
        path: path.display().to_string(),
        examples: picked.len(),
        available,
        seed: (source == "train-holdout").then_some(args.seed),
    };
    Ok((encode(&subset, "", encoder)?, info))
}
