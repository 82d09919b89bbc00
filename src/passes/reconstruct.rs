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

use super::ridge::NormalEquations;
use crate::analyze::AnalysisBatch;
use crate::model::encoder::{Attention, FeedForward};
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

/// Hidden states entering the current layer, per batch, for both models.
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
        let (orig, layer) = (&original.layers[l], &mut out.layers[l]);
        // Attention: target sums of the original, the pruned model's features.
        let mut targets = Vec::with_capacity(batches.len());
        for (b, batch) in batches.iter().enumerate() {
            let mask = &batch.inputs.mask_bias;
            let sum = attention_sum(orig.attention.as_ref(), &states.original[b], mask)?;
            states.original[b] = match &orig.attention {
                Some(att) => att.norm.forward(&sum, false)?,
                None => sum.clone(),
            };
            targets.push(sum);
        }
        if let Some(att) = layer.attention.as_mut().filter(|a| !a.heads.is_empty()) {
            let features =
                |b: usize| flat_context(att, &states.pruned[b], &batches[b].inputs.mask_bias);
            let (output, fit) = refit(
                &att.output,
                &features,
                &targets,
                &states.pruned,
                &rows,
                ridge,
            )?;
            att.output = output;
            fits.push(fit.block(l, "attention"));
        }
        for (b, batch) in batches.iter().enumerate() {
            let sum = attention_sum(
                layer.attention.as_ref(),
                &states.pruned[b],
                &batch.inputs.mask_bias,
            )?;
            states.pruned[b] = match &layer.attention {
                Some(att) => att.norm.forward(&sum, false)?,
                None => sum,
            };
        }
        // FFN, the same way.
        let mut targets = Vec::with_capacity(batches.len());
        for state in states.original.iter_mut() {
            let sum = ffn_sum(orig.ffn.as_ref(), state)?;
            *state = match &orig.ffn {
                Some(ffn) => ffn.norm.forward(&sum, false)?,
                None => sum.clone(),
            };
            targets.push(sum);
        }
        if let Some(ffn) = layer.ffn.as_mut().filter(|f| f.width() > 0) {
            let features = |b: usize| ffn.activations(&states.pruned[b]);
            let (output, fit) = refit(
                &ffn.output,
                &features,
                &targets,
                &states.pruned,
                &rows,
                ridge,
            )?;
            ffn.output = output;
            fits.push(fit.block(l, "ffn"));
        }
        for state in states.pruned.iter_mut() {
            let sum = ffn_sum(layer.ffn.as_ref(), state)?;
            *state = match &layer.ffn {
                Some(ffn) => ffn.norm.forward(&sum, false)?,
                None => sum,
            };
        }
    }
    Ok((out, fits))
}

/// A solved block fit before it is named.
struct Solved {
    features: usize,
    error_before: f64,
    error_after: f64,
}

impl Solved {
    fn block(self, layer: usize, block: &'static str) -> BlockFit {
        BlockFit {
            layer,
            block,
            features: self.features,
            error_before: self.error_before,
            error_after: self.error_after,
        }
    }
}

/// `output` re-fit so that `inputs[b] + output(features(b)) ≈ targets[b]` on the real rows.
fn refit(
    output: &Linear,
    features: &dyn Fn(usize) -> candle_core::Result<Tensor>,
    targets: &[Tensor],
    inputs: &[Tensor],
    rows: &[Tensor],
    ridge: f64,
) -> Result<(Linear, Solved)> {
    let weight = output.weight.to_dense()?;
    let (hidden, width) = weight.dims2()?;
    let mut equations = NormalEquations::new(width, hidden)?;
    for (b, rows) in rows.iter().enumerate() {
        let f = select_rows(&features(b)?, rows)?;
        let t = select_rows(&(&targets[b] - &inputs[b])?, rows)?;
        equations.add(&f, &t)?;
    }
    let fit = equations
        .solve(&weight, &output.bias, ridge)
        .context("layer-wise reconstruction")?;
    let solved = Solved {
        features: width,
        error_before: fit.error_before,
        error_after: fit.error_after,
    };
    Ok((Linear::dense(fit.weight, fit.bias), solved))
}

/// The embeddings of every batch.
fn embed_all(model: &Model, batches: &[AnalysisBatch]) -> Result<Vec<Tensor>> {
    batches
        .iter()
        .map(|b| model.embed(&b.inputs, false))
        .collect()
}

/// Indices (into `[batch · seq]`) of the batch's real tokens.
fn real_rows(batch: &AnalysisBatch) -> Result<Tensor> {
    let bias: Vec<f32> = batch.inputs.mask_bias.flatten_all()?.to_vec1()?;
    let real: Vec<u32> = (0..bias.len() as u32)
        .filter(|&i| bias[i as usize] == 0.0)
        .collect();
    Ok(Tensor::new(real, &candle_core::Device::Cpu)?)
}

/// `[batch, seq, n]` → the real rows `[tokens, n]`.
fn select_rows(t: &Tensor, rows: &Tensor) -> Result<Tensor> {
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
        Some(f) => (x + f.output.forward(&f.activations(x)?)?)?,
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
