//! Layer-wise output reconstruction after pruning, with no retraining (in the spirit of Kwon et
//! al. 2022's layer-wise mask tuning, here a full least-squares re-fit). Layer by layer, on the
//! selection data, the weights after the pruned dimension — the attention output projection over
//! the kept heads, the FFN output projection over the kept neurons, and their biases — are re-fit
//! so that each block's pre-LayerNorm sum reproduces the original model's:
//!
//! `x̂ + W′·features(x̂) + b′ ≈ x + block(x)`,
//!
//! where `x` are the original model's states entering the block and `x̂` the pruned model's own
//! (already reconstructed) states, so each layer also corrects the error that reaches it from the
//! layers before. Ridge regression towards the pruned weights ([`super::ridge`]); real tokens
//! only.

use anyhow::{Context, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

use super::ridge::{Fit, NormalEquations};
use crate::analyze::AnalysisBatch;
use crate::model::encoder::{Attention, EncoderLayer, FeedForward};
use crate::model::linear::Linear;
use crate::model::Model;

/// Default ridge strength (relative to the mean diagonal of `AᵀA`).
pub const DEFAULT_RIDGE: f64 = 0.1;

/// The re-fit of one block: relative squared error of its pre-LayerNorm sum against the
/// original's, on the fitting tokens, before and after.
#[derive(Debug, Clone, Serialize)]
pub struct BlockFit {
    /// Encoder layer.
    pub layer: usize,
    /// `attention` or `ffn`.
    pub block: &'static str,
    /// Features fitted (kept heads × head size, or kept neurons).
    pub features: usize,
    /// Error with the pruned weights.
    pub error_before: f64,
    /// Error with the re-fit weights.
    pub error_after: f64,
}

/// The two blocks of a layer, in order.
#[derive(Debug, Clone, Copy)]
enum Block {
    Attention,
    Ffn,
}

impl Block {
    fn name(self) -> &'static str {
        match self {
            Block::Attention => "attention",
            Block::Ffn => "ffn",
        }
    }

    /// The block's pre-LayerNorm sum on `x` (`x` itself when the block is removed).
    fn sum(self, layer: &EncoderLayer, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self {
            Block::Attention => attention_sum(layer.attention.as_ref(), x, mask),
            Block::Ffn => ffn_sum(layer.ffn.as_ref(), x),
        }
    }

    /// The block's output: its LayerNorm of `sum` (`sum` itself when the block is removed).
    fn finish(self, layer: &EncoderLayer, sum: Tensor) -> Result<Tensor> {
        let norm = match self {
            Block::Attention => layer.attention.as_ref().map(|a| &a.norm),
            Block::Ffn => layer.ffn.as_ref().map(|f| &f.norm),
        };
        Ok(match norm {
            Some(norm) => norm.forward(&sum, false)?,
            None => sum,
        })
    }

    /// The features the output projection reads on `x` (kept heads' contexts or kept neurons'
    /// activations) and the projection; `None` when the block has no weights to re-fit.
    fn features(
        self,
        layer: &EncoderLayer,
        x: &Tensor,
        mask: &Tensor,
    ) -> Option<candle_core::Result<Tensor>> {
        match self {
            Block::Attention => (layer.attention.as_ref())
                .filter(|a| !a.heads.is_empty())
                .map(|a| flat_context(a, x, mask)),
            Block::Ffn => (layer.ffn.as_ref())
                .filter(|f| f.width() > 0)
                .map(|f| f.activations(x, false)),
        }
    }

    fn output_mut(self, layer: &mut EncoderLayer) -> Option<&mut Linear> {
        match self {
            Block::Attention => layer.attention.as_mut().map(|a| &mut a.output),
            Block::Ffn => layer.ffn.as_mut().map(|f| &mut f.output),
        }
    }
}

/// Hidden states entering the current block, per batch, for both models.
struct States {
    original: Vec<Tensor>,
    pruned: Vec<Tensor>,
}

/// `pruned` (a pruned copy of `original`, same layers) with its output projections re-fit on
/// `batches`; the fit of every block.
pub fn reconstruct(
    original: &Model,
    pruned: &Model,
    batches: &[AnalysisBatch],
    ridge: f64,
) -> Result<(Model, Vec<BlockFit>)> {
    anyhow::ensure!(
        original.num_layers() == pruned.num_layers(),
        "reconstruction needs a pruned copy of the original (the same layers)"
    );
    let mut out = pruned.clone();
    let mut states = States {
        original: embed_all(original, batches)?,
        pruned: embed_all(pruned, batches)?,
    };
    let rows: Vec<Tensor> = batches.iter().map(real_rows).collect::<Result<_>>()?;
    let mut fits = Vec::new();
    for l in 0..out.num_layers() {
        for block in [Block::Attention, Block::Ffn] {
            let (orig, layer) = (&original.layers[l], &mut out.layers[l]);
            // The original's sums are the targets; the original moves past the block.
            let mut targets = Vec::with_capacity(batches.len());
            for (state, batch) in states.original.iter_mut().zip(batches) {
                let sum = block.sum(orig, state, &batch.inputs.mask_bias)?;
                *state = block.finish(orig, sum.clone())?;
                targets.push(sum);
            }
            let features = (0..batches.len())
                .map(|b| block.features(layer, &states.pruned[b], &batches[b].inputs.mask_bias))
                .collect::<Option<candle_core::Result<Vec<_>>>>()
                .transpose()?;
            if let (Some(features), Some(output)) = (features, block.output_mut(layer)) {
                let fit = refit(output, &features, &targets, &states.pruned, &rows, ridge)?;
                fits.push(BlockFit {
                    layer: l,
                    block: block.name(),
                    features: fit.weight.dim(1)?,
                    error_before: fit.error_before,
                    error_after: fit.error_after,
                });
                *output = Linear::dense(fit.weight, fit.bias);
            }
            for (state, batch) in states.pruned.iter_mut().zip(batches) {
                let sum = block.sum(layer, state, &batch.inputs.mask_bias)?;
                *state = block.finish(layer, sum)?;
            }
        }
    }
    Ok((out, fits))
}

/// The hidden states entering `layer`'s FFN block, per batch, from those entering the layer.
pub(super) fn ffn_inputs(
    layer: &EncoderLayer,
    entering: &[Tensor],
    batches: &[AnalysisBatch],
) -> Result<Vec<Tensor>> {
    entering
        .iter()
        .zip(batches)
        .map(|(x, batch)| {
            let sum = Block::Attention.sum(layer, x, &batch.inputs.mask_bias)?;
            Block::Attention.finish(layer, sum)
        })
        .collect()
}

/// The re-fit of `output` so that `inputs[b] + output(features[b]) ≈ targets[b]` on the real rows.
fn refit(
    output: &Linear,
    features: &[Tensor],
    targets: &[Tensor],
    inputs: &[Tensor],
    rows: &[Tensor],
    ridge: f64,
) -> Result<Fit> {
    let weight = output.weight.to_dense()?;
    let (hidden, width) = weight.dims2()?;
    let mut equations = NormalEquations::new(width, hidden)?;
    for (b, rows) in rows.iter().enumerate() {
        let f = select_rows(&features[b], rows)?;
        let t = select_rows(&(&targets[b] - &inputs[b])?, rows)?;
        equations.add(&f, &t)?;
    }
    equations
        .solve(&weight, &output.bias, ridge)
        .context("layer-wise reconstruction")
}

/// The embeddings of every batch.
fn embed_all(model: &Model, batches: &[AnalysisBatch]) -> Result<Vec<Tensor>> {
    batches
        .iter()
        .map(|b| model.embed(&b.inputs, false))
        .collect()
}

/// Indices (into `[batch · seq]`) of the batch's real tokens.
pub(super) fn real_rows(batch: &AnalysisBatch) -> Result<Tensor> {
    let bias: Vec<f32> = batch.inputs.mask_bias.flatten_all()?.to_vec1()?;
    let real: Vec<u32> = (0..bias.len() as u32)
        .filter(|&i| bias[i as usize] == 0.0)
        .collect();
    Ok(Tensor::new(real, &candle_core::Device::Cpu)?)
}

/// `[batch, seq, n]` → the real rows `[tokens, n]`.
pub(super) fn select_rows(t: &Tensor, rows: &Tensor) -> Result<Tensor> {
    let n = t.dim(D::Minus1)?;
    Ok(t.reshape(((), n))?.index_select(rows, 0)?)
}

/// The per-head contexts of `att` on `x`, side by side: `[batch, seq, heads · head_size]`.
fn flat_context(att: &Attention, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let c = att.context(x, mask, false, false)?;
    let (b, n, t, d) = c.dims4()?;
    c.transpose(1, 2)?.reshape((b, t, n * d))
}

/// The attention block's pre-LayerNorm sum `x + W_o·context + b_o` (`x` for a removed block).
fn attention_sum(att: Option<&Attention>, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(match att {
        None => x.clone(),
        Some(a) if a.heads.is_empty() => x.broadcast_add(&a.output.bias)?,
        Some(a) => (x + a.output.forward(&flat_context(a, x, mask)?)?)?,
    })
}

/// The FFN block's pre-LayerNorm sum `x + W_2·act(W_1 x + b_1) + b_2` (`x` for a removed block).
fn ffn_sum(ffn: Option<&FeedForward>, x: &Tensor) -> Result<Tensor> {
    Ok(match ffn {
        None => x.clone(),
        Some(f) if f.width() == 0 => x.broadcast_add(&f.output.bias)?,
        Some(f) => (x + f.output.forward(&f.activations(x, false)?)?)?,
    })
}

/// Relative squared error `‖ĥ − h‖² / ‖h‖²` of `model`'s hidden states after every layer against
/// `original`'s, on the real tokens of `batches`.
pub fn hidden_errors(
    original: &Model,
    model: &Model,
    batches: &[AnalysisBatch],
) -> Result<Vec<f64>> {
    let layers = original.num_layers();
    let (mut err, mut norm) = (vec![0f64; layers], vec![0f64; layers]);
    for batch in batches {
        let rows = real_rows(batch)?;
        let (mut h, mut g) = (
            original.embed(&batch.inputs, false)?,
            model.embed(&batch.inputs, false)?,
        );
        for l in 0..layers {
            h = original.run_layers(&h, &batch.inputs, l..l + 1, Default::default())?;
            g = model.run_layers(&g, &batch.inputs, l..l + 1, Default::default())?;
            let (hr, gr) = (select_rows(&h, &rows)?, select_rows(&g, &rows)?);
            err[l] += f64::from((&gr - &hr)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
            norm[l] += f64::from(hr.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    Ok(err
        .iter()
        .zip(&norm)
        .map(|(e, n)| e / n.max(f64::MIN_POSITIVE))
        .collect())
}
