//! What every task-level command loads first: the model, its label mapping, a tokenizer and
//! where the task's data is.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::labels::LabelMap;
use crate::data::source::TaskData;
use crate::data::task::Task;
use crate::model::runtime::Runtime;
use crate::model::source::HubAccess;
use crate::model::Model;
use crate::text::tokenizer::TextEncoder;

/// A model ready to run on a task's data.
pub struct TaskSetup {
    /// The loaded model.
    pub model: Model,
    /// Model outputs → task labels.
    pub labels: LabelMap,
    /// Tokenizer truncating at `max_length`.
    pub encoder: TextEncoder,
    /// Maximum tokens per input.
    pub max_length: usize,
    /// The task's data.
    pub data: TaskData,
}

impl TaskSetup {
    /// Loads the model `spec` (directory or hub id), maps its labels onto `task`, loads its
    /// tokenizer and resolves the task's data (`data`, else `$GLUE_DIR`, else the hub dataset).
    pub fn load(
        spec: &str,
        hub: &HubAccess,
        task: Task,
        data: Option<&Path>,
        max_length: Option<usize>,
        batch_size: usize,
        runtime: Runtime,
    ) -> Result<Self> {
        let model = Model::load(spec, hub, runtime)?;
        let labels = LabelMap::new(&model.config, task).with_context(|| format!("model {spec}"))?;
        let max_length = checked_max_length(max_length, model.config.max_input_length())?;
        check_batch_size(batch_size, max_length)?;
        let encoder = model.text_encoder(max_length)?;
        let data = TaskData::resolve(task, data, hub.offline)?;
        Ok(TaskSetup {
            model,
            labels,
            encoder,
            max_length,
            data,
        })
    }
}

/// Most tokens one batch may hold (batch size × max length): 2048 sentences of 128 tokens. The
/// attention scores of such a batch take 1.6 GB in a 12-head model.
pub const MAX_BATCH_TOKENS: usize = 1 << 18;

/// Refuses a batch size of 0, or one whose batches could hold more than [`MAX_BATCH_TOKENS`].
pub fn check_batch_size(batch_size: usize, max_length: usize) -> Result<()> {
    let most = MAX_BATCH_TOKENS / max_length;
    if batch_size == 0 || batch_size > most {
        bail!("--batch-size {batch_size} is out of range: use 1..={most} at max length {max_length} (a batch holds at most {MAX_BATCH_TOKENS} tokens)");
    }
    Ok(())
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
