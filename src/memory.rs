//! The memory limit (`--memory-limit`): how much the parts of a run that grow with its data may
//! take. The selection engine's and the reconstruction's hidden-state caches are sized from it
//! (batches past the cache are recomputed from the embeddings: the same bits, more time), and so
//! are the analysis's stacking of ablation variants and a training step's batch (run in parts
//! past its room).
//!
//! Without `--memory-limit` the limit is derived from the model: 4 GiB, or 8 times the model's
//! f32 weights when that is more (BERT-large: 10.7 GB).

use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::model::Model;

/// `--memory-limit` in bytes, when given.
static LIMIT: OnceLock<Option<u64>> = OnceLock::new();

/// The default limit's floor.
const DEFAULT_FLOOR: u64 = 4 << 30;

/// The default limit in f32 weight bytes of the model.
const DEFAULT_WEIGHT_MULTIPLE: u64 = 8;

/// What the limit keeps for everything but the caches, in f32 weight bytes of the model: the
/// model, its copies (the accepted model and a candidate, a teacher, a training snapshot) and the
/// working set of a forward pass.
const RESERVED_WEIGHT_MULTIPLE: u64 = 6;

/// The hidden-state cache never takes more than this (the engine's fixed budget before the limit
/// existed), so small models run as before.
const CACHE_CEILING: u64 = 4 << 30;

/// Records `--memory-limit` for this process (before any pass runs).
pub fn configure(limit: Option<u64>) {
    let _ = LIMIT.set(limit);
}

/// `--memory-limit`, else the default for `model`.
pub fn limit_for(model: &Model) -> u64 {
    LIMIT
        .get()
        .copied()
        .flatten()
        .unwrap_or_else(|| DEFAULT_FLOOR.max(DEFAULT_WEIGHT_MULTIPLE * weight_bytes(model)))
}

/// Bytes of `model`'s weights at f32.
fn weight_bytes(model: &Model) -> u64 {
    model.parameter_count() as u64 * 4
}

/// Bytes of hidden states the selection engine may cache for `model`: `AXCOMPRESS_CACHE_MB` MiB
/// when set, else what the limit leaves beside the model's copies and working set, at most 4 GiB.
pub fn cache_budget(model: &Model) -> Result<usize> {
    if let Ok(value) = std::env::var("AXCOMPRESS_CACHE_MB") {
        let mb: usize = value.trim().parse().with_context(|| {
            format!(
                "AXCOMPRESS_CACHE_MB={value:?} is not a number of MiB; unset it or use e.g. 4096"
            )
        })?;
        return Ok(mb.saturating_mul(1 << 20));
    }
    let reserved = RESERVED_WEIGHT_MULTIPLE * weight_bytes(model);
    let left = limit_for(model).saturating_sub(reserved);
    Ok(left.min(CACHE_CEILING) as usize)
}

/// What training holds besides a step's gradients and activations, in f32 bytes of the trained
/// parameters (the encoder and head): the parameters, AdamW's two moments, the kept best copy and
/// the input model's packed inference copy. Under a tight limit ([`training_is_tight`]) a run
/// with a checkpoint holds neither of the last two: the best copy stays in the checkpoint and the
/// packed copies are let go. Their room is kept as a margin for what a step holds beyond
/// [`training_bytes_per_sequence`] (BERT-base shape at the default limit, one epoch with the best
/// copy on disk but the packed copy still held: peak RSS 4,447 MiB).
const TRAINING_STATE_MULTIPLE: u64 = 5;

/// The process's own working set beside the models and the training state (data, tokenizer,
/// code, allocator slack), and what a step's backward pass holds beyond
/// [`training_bytes_per_sequence`]. BERT-base shape at the default limit, with 512 MiB here:
/// resident memory sampled every 2 s over the first 620 s of an epoch reached 3,816 MiB, a step
/// 2.3 GiB over the 1.5 GiB held between steps, where the estimate allowed 1.6 GB for the
/// gradients and activations. Most of the excess was the constants' gradients piling up over a
/// batch's parts, since dropped after each part; this margin was not measured again without them.
const RUNTIME_RESERVE: u64 = 1 << 30;

/// Bytes of activations a training step of a model may hold under the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingRoom {
    /// For a batch run at once (beside one gradient store).
    pub whole: u64,
    /// For each part of a batch run in parts (beside two: the sum so far and the part's).
    pub part: u64,
}

/// The room for a training step of `model`: the limit less the input model, the training state
/// ([`TRAINING_STATE_MULTIPLE`]), [`RUNTIME_RESERVE`] and the gradient stores.
pub fn training_room(model: &Model) -> TrainingRoom {
    let trained = trained_bytes(model);
    let held = weight_bytes(model) + TRAINING_STATE_MULTIPLE * trained + RUNTIME_RESERVE;
    let left = limit_for(model).saturating_sub(held);
    TrainingRoom {
        whole: left.saturating_sub(trained),
        part: left.saturating_sub(2 * trained),
    }
}

/// Bytes a training step of `model` holds for the backward pass per sequence of `len` tokens: in
/// every layer about 12 hidden-wide and 6 FFN-wide f32 vectors per token and 3 attention scores
/// per head and pair of tokens, doubled for the gradients flowing back through them (BERT-base
/// shape, the second half of a batch of long train sentences cut in two: 0.8 GB more resident
/// after its forward pass, 0.9 GB more after its backward pass).
pub fn training_bytes_per_sequence(model: &Model, len: usize) -> u64 {
    let hidden = model.config.hidden_size as u64;
    let per_token: u64 = model
        .layers
        .iter()
        .map(|layer| {
            let heads = layer.attention.as_ref().map_or(0, |a| a.heads.len()) as u64;
            let width = layer
                .ffn
                .as_ref()
                .map_or(0, |f| f.intermediate.weight.dims().0) as u64;
            12 * hidden + 6 * width + 3 * heads * len as u64
        })
        .sum();
    per_token * len as u64 * 4 * 2
}

/// Whether training `model` is tight under the limit: its training state takes more than a
/// quarter of it (BERT-base at the default 4 GiB: 1.7 GB; MiniLM: 0.22 GB). A tight run returns
/// freed memory after every step and lets go of the packed inference copies.
pub fn training_is_tight(model: &Model) -> bool {
    TRAINING_STATE_MULTIPLE * trained_bytes(model) > limit_for(model) / 4
}

/// Bytes of the weights training changes (all but the embeddings) at f32.
fn trained_bytes(model: &Model) -> u64 {
    weight_bytes(model).saturating_sub(embedding_bytes(model))
}

/// Bytes of `model`'s embedding tables at f32 (not trained).
fn embedding_bytes(model: &Model) -> u64 {
    model.embeddings.parameter_count() as u64 * 4
}

/// Has the C library give every block of 256 KiB or more its own mapping, returned to the system
/// when freed, and returns what is free now. glibc otherwise keeps freed blocks below a threshold
/// that rises to 32 MiB as large blocks are freed (so a model's matrices, gradients and
/// activations end up below it) in its arenas: a backward pass frees a zero and a computed
/// gradient per weight as it sums them, and the process keeps that memory (BERT-base shape, one
/// recover step: 1.0 GB more resident after the backward pass than before it, 0.66 GB with a
/// 1 MiB threshold). For the rest of the process; a no-op on other C libraries.
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: glibc's mallopt sets an allocator parameter; blocks already allocated keep
        // their kind, and free() handles both.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 10);
        }
    }
    release_freed();
}

/// Returns the memory freed so far to the system (glibc's `malloc_trim`; a no-op on other C
/// libraries).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim takes a padding in bytes and only returns free memory.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Parses a size: a number of bytes, or with a unit `K`, `M`, `G` or `T` (powers of 1024; an
/// optional `B` or `iB` after it), e.g. `4G`, `3500M`, `12GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let usage = || format!("expected a size such as 4G, 3500M or 12GiB, got `{text}`");
    let t = text.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let value: f64 = number.parse().map_err(|_| usage())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.trim_end_matches("IB").trim_end_matches('B');
    let scale: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(usage()),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < (64 << 20) as f64 {
        return Err(format!(
            "--memory-limit {text} is below 64M, less than any model needs; give e.g. 4G"
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("3500M"), Ok(3500 << 20));
        assert_eq!(parse_size("12GiB"), Ok(12 << 30));
        assert_eq!(parse_size("1.5gb"), Ok(3 << 29));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        for bad in ["", "G", "4X", "four", "-1G", "1M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
