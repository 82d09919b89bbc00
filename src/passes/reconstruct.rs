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
//! only, each weighted by `1 / σ` of the original's sum at that token, so that the fit counts
//! errors as the LayerNorm after the block sees them.

use anyhow::{Context, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

use super::ridge::{Fit, NormalEquations};
use super::select::cached_batches;
use crate::kernels::Ops;
use crate::memory;
use crate::model::encoder::{Attention, EncoderLayer, FeedForward};
use crate::model::inputs::Inputs;
use crate::model::linear::Linear;
use crate::model::Model;
use crate::scoring::batch::ScoringBatch;

/// Default ridge strength (relative to the mean diagonal of `AᵀA`).
pub const DEFAULT_RIDGE: f64 = 0.1;

/// The re-fit of one block: relative squared error of its pre-LayerNorm sum against the
/// original's, each token weighted by `1 / σ` of the original's sum, on the fitting tokens,
/// before and after.
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
            Some(norm) => norm.forward(&sum, Ops::Inference)?,
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
        if !self.fits(layer) {
            return None;
        }
        match self {
            Block::Attention => (layer.attention.as_ref()).map(|a| a.flat_context(x, mask)),
            Block::Ffn => (layer.ffn.as_ref()).map(|f| f.activations(x)),
        }
    }

    /// True when the block has weights to re-fit (kept heads or neurons).
    fn fits(self, layer: &EncoderLayer) -> bool {
        match self {
            Block::Attention => layer
                .attention
                .as_ref()
                .is_some_and(|a| !a.heads.is_empty()),
            Block::Ffn => layer.ffn.as_ref().is_some_and(|f| f.width() > 0),
        }
    }

    fn output(self, layer: &EncoderLayer) -> Option<&Linear> {
        match self {
            Block::Attention => layer.attention.as_ref().map(|a| &a.output),
            Block::Ffn => layer.ffn.as_ref().map(|f| &f.output),
        }
    }

    fn output_mut(self, layer: &mut EncoderLayer) -> Option<&mut Linear> {
        match self {
            Block::Attention => layer.attention.as_mut().map(|a| &mut a.output),
            Block::Ffn => layer.ffn.as_mut().map(|f| &mut f.output),
        }
    }
}

/// The original's and the pruned model's hidden states entering the current block, per batch:
/// kept for the batches within the state budget ([`crate::memory::cache_budget`]), `None` for
/// the others, which are recomputed from the embeddings when needed.
struct States {
    kept: Vec<Option<(Tensor, Tensor)>>,
}

impl States {
    fn new(original: &Model, pruned: &Model, batches: &[ScoringBatch]) -> Result<Self> {
        // Two models' states per batch: count each batch twice against the budget.
        let cached = cached_batches(batches, original, memory::cache_budget(original)? / 2);
        let kept = batches
            .iter()
            .enumerate()
            .map(|(b, batch)| {
                (b < cached)
                    .then(|| {
                        let embed = |m: &Model| m.embed(&batch.inputs, Ops::Inference);
                        Ok((embed(original)?, embed(pruned)?))
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(States { kept })
    }

    /// Batch `b`'s states entering `block` of layer `l`: the original's, and the pruned
    /// model's (whose layers before `l`, and before `block`, are already re-fit in `pruned`).
    fn entering(
        &self,
        b: usize,
        at: (usize, Block),
        original: &Model,
        pruned: &Model,
        batch: &ScoringBatch,
    ) -> Result<(Tensor, Tensor)> {
        if let Some(states) = &self.kept[b] {
            return Ok(states.clone());
        }
        let from_embeddings = |model: &Model| -> Result<Tensor> {
            let (l, block) = at;
            let x = model.embed(&batch.inputs, Ops::Inference)?;
            let x = model.run_layers(&x, &batch.inputs, 0..l, Default::default())?;
            match block {
                Block::Attention => Ok(x),
                Block::Ffn => {
                    let layer = &model.layers[l];
                    let sum = Block::Attention.sum(layer, &x, &batch.inputs.mask_bias)?;
                    Block::Attention.finish(layer, sum)
                }
            }
        };
        Ok((from_embeddings(original)?, from_embeddings(pruned)?))
    }
}

/// `pruned` (a pruned copy of `original`, same layers) with its output projections re-fit on
/// `batches`; the fit of every block.
pub fn reconstruct(
    original: &Model,
    pruned: &Model,
    batches: &[ScoringBatch],
    ridge: f64,
) -> Result<(Model, Vec<BlockFit>)> {
    anyhow::ensure!(
        original.num_layers() == pruned.num_layers(),
        "reconstruction needs a pruned copy of the original (the same layers)"
    );
    let mut out = pruned.clone();
    let mut states = States::new(original, pruned, batches)?;
    let rows: Vec<Tensor> = batches
        .iter()
        .map(|b| real_rows(&b.inputs))
        .collect::<Result<_>>()?;
    let mut fits = Vec::new();
    for l in 0..out.num_layers() {
        for block in [Block::Attention, Block::Ffn] {
            if let Some(fit) =
                refit_block(original, &out, (l, block), &states, batches, &rows, ridge)?
            {
                fits.push(BlockFit {
                    layer: l,
                    block: block.name(),
                    features: fit.weight.dim(1)?,
                    error_before: fit.error_before,
                    error_after: fit.error_after,
                });
                let output = block
                    .output_mut(&mut out.layers[l])
                    .expect("a fitted block has an output");
                *output = Linear::dense(fit.weight, fit.bias);
            }
            advance(
                &mut states,
                block,
                (&original.layers[l], &out.layers[l]),
                batches,
            )?;
        }
    }
    Ok((out, fits))
}

/// The re-fit of `block` of layer `l` of `pruned` so that `x̂ + output(features(x̂)) ≈ x +
/// block(x)` on the real rows; `None` when the block has no weights to re-fit.
fn refit_block(
    original: &Model,
    pruned: &Model,
    at: (usize, Block),
    states: &States,
    batches: &[ScoringBatch],
    rows: &[Tensor],
    ridge: f64,
) -> Result<Option<Fit>> {
    let (l, block) = at;
    let layer = &pruned.layers[l];
    let Some(output) = block.output(layer).filter(|_| block.fits(layer)) else {
        return Ok(None);
    };
    let weight = output.weight.to_dense()?;
    let (hidden, width) = weight.dims2()?;
    let mut equations = NormalEquations::new(width, hidden)?;
    for (b, batch) in batches.iter().enumerate() {
        let mask = &batch.inputs.mask_bias;
        let (x, x_hat) = states.entering(b, at, original, pruned, batch)?;
        let target = block.sum(&original.layers[l], &x, mask)?;
        let features = block
            .features(layer, &x_hat, mask)
            .expect("the block fits")?;
        let f = select_rows(&features, &rows[b])?;
        let target = select_rows(&target, &rows[b])?;
        let t = (&target - select_rows(&x_hat, &rows[b])?)?;
        equations.add_weighted(&f, &t, &layer_norm_weights(&target)?)?;
    }
    let fit = equations
        .solve(&weight, &output.bias, ridge)
        .context("layer-wise reconstruction")?;
    Ok(Some(fit))
}

/// `1 / σ` of each row of `sums` `[tokens, hidden]` (its standard deviation over the hidden
/// size), `[tokens, 1]`: the scale LayerNorm divides each token's sum by. Weighting the fit's rows
/// with it makes the least squares count errors as they are after the LayerNorm that follows
/// (unweighted, tokens with large sums dominate the fit, and the first layer of the demo model
/// came out further from the original after LayerNorm than without the fit).
fn layer_norm_weights(sums: &Tensor) -> Result<Tensor> {
    let centred = sums.broadcast_sub(&sums.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok((variance + 1e-6)?.sqrt()?.recip()?)
}

/// Moves the kept states of both models past `block` (`layers`: the original's and the re-fit
/// pruned model's layer).
fn advance(
    states: &mut States,
    block: Block,
    layers: (&EncoderLayer, &EncoderLayer),
    batches: &[ScoringBatch],
) -> Result<()> {
    for (kept, batch) in states.kept.iter_mut().zip(batches) {
        if let Some((x, x_hat)) = kept {
            let mask = &batch.inputs.mask_bias;
            *x = block.finish(layers.0, block.sum(layers.0, x, mask)?)?;
            *x_hat = block.finish(layers.1, block.sum(layers.1, x_hat, mask)?)?;
        }
    }
    Ok(())
}

/// The hidden states entering `layer`'s FFN block, per batch, from those entering the layer.
pub(super) fn ffn_inputs(
    layer: &EncoderLayer,
    entering: &[Tensor],
    batches: &[ScoringBatch],
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

/// Indices (into `[batch · seq]`) of the real (not padding) tokens of `inputs`.
pub(super) fn real_rows(inputs: &Inputs) -> Result<Tensor> {
    let bias: Vec<f32> = inputs.mask_bias.flatten_all()?.to_vec1()?;
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

/// The attention block's pre-LayerNorm sum `x + W_o·context + b_o` (`x` for a removed block).
fn attention_sum(att: Option<&Attention>, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(match att {
        None => x.clone(),
        Some(a) if a.heads.is_empty() => x.broadcast_add(&a.output.bias)?,
        Some(a) => (x + a.output.forward(&a.flat_context(x, mask)?)?)?,
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
    batches: &[ScoringBatch],
) -> Result<Vec<f64>> {
    let layers = original.num_layers();
    let (mut err, mut norm) = (vec![0f64; layers], vec![0f64; layers]);
    for batch in batches {
        let rows = real_rows(&batch.inputs)?;
        let (mut h, mut g) = (
            original.embed(&batch.inputs, Ops::Inference)?,
            model.embed(&batch.inputs, Ops::Inference)?,
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
