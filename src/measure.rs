//! Measurements: batch-1 latency percentiles, batched throughput, peak resident memory and size
//! on disk.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;

use crate::data::batch::BatchOrder;
use crate::evaluate::predict_batches;
use crate::model::encoder::RunOptions;
use crate::model::inputs::Inputs;
use crate::model::source::WEIGHT_FILES;
use crate::model::Model;
use crate::text::tokenizer::Sequence;
use crate::text::tokenizer::TextEncoder;

/// Seconds for one forward pass of a single sequence.
pub fn time_single(model: &Model, seq: &Sequence) -> Result<f64> {
    let started = Instant::now();
    let inputs = Inputs::from_sequences(&model.config, &[seq])?;
    let logits = model.forward(&inputs, RunOptions::default())?;
    let _ = logits.to_vec2::<f32>()?;
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds to tokenize each text on its own (what batch-1 serving adds before the model runs).
pub fn tokenize_times(
    encoder: &TextEncoder,
    texts: &[(String, Option<String>)],
) -> Result<Vec<f64>> {
    texts
        .iter()
        .map(|text| {
            let started = Instant::now();
            encoder.encode(std::slice::from_ref(text))?;
            Ok(started.elapsed().as_secs_f64())
        })
        .collect()
}

/// Sentences per second for one pass over `seqs` at `batch_size`, batched in `order`.
pub fn throughput(
    model: &Model,
    seqs: &[Sequence],
    batch_size: usize,
    order: BatchOrder,
) -> Result<f64> {
    let started = Instant::now();
    predict_batches(
        model,
        seqs,
        order.batches(seqs, batch_size),
        RunOptions::default(),
        &ProgressBar::hidden(),
    )?;
    Ok(seqs.len() as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// The `q`-quantile (0..=1) of `values` by nearest rank.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Median of `values`.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of the weight files of the model in `dir` (shards included).
pub fn weights_bytes(dir: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let Some(file) = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
    else {
        return 0;
    };
    if file.ends_with("model.safetensors.index.json") {
        return crate::model::weights::shard_files(&file)
            .map(|shards| shards.iter().map(|s| size(&dir.join(s))).sum())
            .unwrap_or(0);
    }
    size(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.9), 5.0);
        assert_eq!(median(&[2.0, 1.0]), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn reads_own_peak_memory() {
        assert!(peak_rss_bytes().unwrap() > 0);
    }
}
