//! Training checkpoints: parameters, optimizer moments, the best parameters so far and the log,
//! in one safetensors file written atomically. A run interrupted at any point resumes from its
//! last checkpoint and ends exactly as an uninterrupted run would.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use super::params::Trainable;
use crate::fsutil::write_atomic;
use crate::scoring::score::Score;

/// The selection metric after some step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Steps taken (0: the model before training).
    pub step: usize,
    /// Loss and metric on the selection split.
    pub selection: Score,
}

/// What a run has seen so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    /// Loss of every step taken.
    pub losses: Vec<f32>,
    /// Every evaluation on the selection split.
    pub evaluations: Vec<Evaluation>,
    /// The best evaluation (the parameters kept).
    pub best: Evaluation,
}

impl TrainLog {
    /// Evaluations after the best one (0 when the last evaluation is the best).
    pub fn evaluations_since_best(&self) -> usize {
        let best = self
            .evaluations
            .iter()
            .rposition(|e| e.step == self.best.step);
        best.map_or(0, |i| self.evaluations.len() - 1 - i)
    }
}

const METADATA: &str = "axcompress.train";

#[derive(Serialize, Deserialize)]
struct Header {
    key: String,
    log: TrainLog,
}

/// Writes the state of a run identified by `key` to `path`.
pub fn save(
    path: &Path,
    key: &str,
    trainable: &Trainable,
    optimizer: &AdamW,
    best: &[Tensor],
    log: &TrainLog,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, p) in trainable.params.iter().enumerate() {
        let (m, v) = &optimizer.moments[i];
        tensors.push((format!("param/{}", p.name), p.var.as_tensor().detach()));
        tensors.push((format!("m/{}", p.name), m.clone()));
        tensors.push((format!("v/{}", p.name), v.clone()));
        tensors.push((format!("best/{}", p.name), best[i].clone()));
    }
    let header = Header {
        key: key.to_string(),
        log: log.clone(),
    };
    let metadata = HashMap::from([(METADATA.to_string(), serde_json::to_string(&header)?)]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .with_context(|| format!("cannot serialise the checkpoint {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Restores the state saved at `path` into `trainable` and `optimizer`; returns the best
/// parameters and the log. Refuses a checkpoint of another run.
pub fn load(
    path: &Path,
    key: &str,
    trainable: &Trainable,
    optimizer: &mut AdamW,
) -> Result<(Vec<Tensor>, TrainLog)> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {shown}"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| {
        format!("{shown}: not a safetensors checkpoint; pass --force to start over")
    })?;
    let header: Header = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA))
        .and_then(|h| serde_json::from_str(h).ok())
        .with_context(|| format!("{shown}: no training state; pass --force to start over"))?;
    if header.key != key {
        bail!("{shown} is the checkpoint of another run; pass --force to start over");
    }
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut take = |kind: &str, name: &str| {
        tensors
            .remove(&format!("{kind}/{name}"))
            .with_context(|| format!("{shown}: no {kind}/{name}; pass --force to start over"))
    };
    let mut params = Vec::new();
    let mut best = Vec::new();
    for (i, p) in trainable.params.iter().enumerate() {
        params.push(take("param", &p.name)?);
        optimizer.moments[i] = (take("m", &p.name)?, take("v", &p.name)?);
        best.push(take("best", &p.name)?);
    }
    trainable.restore(&params)?;
    optimizer.step = header.log.losses.len();
    Ok((best, header.log))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(step: usize, metric: f64) -> Evaluation {
        Evaluation {
            step,
            selection: Score::point(0.0, metric),
        }
    }

    #[test]
    fn evaluations_since_best_counts_those_after_the_kept_one() {
        let evaluations = vec![at(0, 0.9), at(10, 0.95), at(20, 0.93), at(30, 0.94)];
        let mut log = TrainLog {
            losses: Vec::new(),
            evaluations: evaluations.clone(),
            best: evaluations[1],
        };
        assert_eq!(log.evaluations_since_best(), 2);
        log.best = evaluations[3];
        assert_eq!(log.evaluations_since_best(), 0);
        log.best = evaluations[0];
        assert_eq!(log.evaluations_since_best(), 3);
    }
}
