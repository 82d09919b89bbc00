//! The labelled batches every judge of a model runs: significance analysis, the selection engine
//! and training.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::data::batch::{length_buckets, EncodedSet};
use crate::data::glue::Target;
use crate::data::labels::LabelMap;
use crate::model::inputs::Inputs;
use crate::model::Model;
use crate::text::tokenizer::Sequence;

/// One padded batch of labelled examples.
pub struct ScoringBatch {
    /// Model inputs.
    pub inputs: Inputs,
    /// Indices of the batch's examples in the analysis data.
    pub examples: Vec<usize>,
    /// Loss targets: model output index (u32) per example, or the score (f32) for regression.
    pub loss_targets: Tensor,
    /// True for regression.
    pub regression: bool,
}

/// Builds length-bucketed batches of `set`.
pub fn batches(
    model: &Model,
    set: &EncodedSet,
    labels: &LabelMap,
    batch_size: usize,
) -> Result<Vec<ScoringBatch>> {
    length_buckets(&set.sequences, batch_size)
        .into_iter()
        .map(|examples| batch(model, set, labels, examples))
        .collect()
}

/// One batch of the examples of `set` at `examples`, in that order, with their loss targets.
pub fn batch(
    model: &Model,
    set: &EncodedSet,
    labels: &LabelMap,
    examples: Vec<usize>,
) -> Result<ScoringBatch> {
    let regression = model.config.regression;
    let seqs: Vec<&Sequence> = examples.iter().map(|&i| &set.sequences[i]).collect();
    let dev = &Device::Cpu;
    let loss_targets = if regression {
        let v: Vec<f32> = examples
            .iter()
            .map(|&i| match set.targets[i] {
                Target::Score(s) => s,
                Target::Class(c) => c as f32,
            })
            .collect();
        Tensor::new(v, dev)?
    } else {
        let v: Vec<u32> = examples
            .iter()
            .map(|&i| match set.targets[i] {
                Target::Class(c) => labels.model_index(c) as u32,
                Target::Score(s) => s as u32,
            })
            .collect();
        Tensor::new(v, dev)?
    };
    Ok(ScoringBatch {
        inputs: Inputs::from_sequences(&model.config, &seqs)?,
        examples,
        loss_targets,
        regression,
    })
}
