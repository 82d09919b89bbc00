//! Exact significance by ablation, with prefix caching.
//!
//! For each batch the plain forward pass is run once, caching every layer's intermediate states.
//! An element of layer `l` is then removed by editing layer `l`'s cached states (subtracting a
//! head's or neuron group's contribution before the residual LayerNorm, or skipping a block),
//! and only layers `l+1..` are recomputed — with many elements of the same layer stacked into
//! one larger batch so every core stays busy. The last layer computes only the first position,
//! the one the classifier reads.

use anyhow::Result;
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;

use super::elements::Element;
use crate::evaluate::finite_rows;
use crate::kernels::Ops;
use crate::memory;
use crate::model::encoder::Queries;
use crate::model::encoder::{EncoderLayer, RunOptions};
use crate::model::nn::LayerNorm;
use crate::model::Model;
use crate::scoring::batch::ScoringBatch;
use crate::scoring::scorer::Scorer;

/// What removing one element did over the analysis data.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Sum of per-example losses.
    pub loss_sum: f64,
    /// Per-example prediction (task label index, or score for regression) in analysis-data order.
    pub predictions: Vec<f32>,
}

/// Upper bound on sequences stacked into one downstream pass.
const MAX_STACKED_SEQUENCES: usize = 256;

/// The share of the memory limit one stacked downstream pass may take.
const STACK_SHARE_OF_LIMIT: u64 = 8;

/// Sequences of `tokens` tokens stacked into one downstream pass of `model`: at most
/// [`MAX_STACKED_SEQUENCES`], and at most what fits an eighth of the memory limit (each sequence
/// holds its hidden states, its FFN activations before and after GELU, and its attention scores).
/// Stacking changes the time, not the bits: every sequence's rows are computed alone.
fn stack_limit(model: &Model, tokens: usize) -> usize {
    let widest = |f: fn(&EncoderLayer) -> usize| model.layers.iter().map(f).max().unwrap_or(0);
    let width = widest(|l| l.ffn.as_ref().map_or(0, |f| f.width()));
    let heads = widest(|l| l.attention.as_ref().map_or(0, |a| a.heads.len()));
    let per_token = 2 * width + 8 * model.config.hidden_size + heads * tokens;
    let per_sequence = (4 * tokens * per_token).max(1) as u64;
    let fits = memory::limit_for(model) / STACK_SHARE_OF_LIMIT / per_sequence;
    (fits as usize).clamp(1, MAX_STACKED_SEQUENCES)
}

/// Cached states of one layer for one batch.
#[derive(Clone)]
struct LayerCache {
    /// Input of the layer.
    x: Tensor,
    /// Per-head context `[B, heads, T, d]` (present attention with heads only).
    context: Option<Tensor>,
    /// `x + W_o · context + b_o`, before the attention LayerNorm.
    attention_pre: Option<Tensor>,
    /// Output of the attention block (= `x` when the block is absent).
    after_attention: Tensor,
    /// FFN activations `[B, T, width]` (present FFN of non-zero width only).
    activations: Option<Tensor>,
    /// `a + W_2 · act + b_2`, before the FFN LayerNorm.
    ffn_pre: Option<Tensor>,
}

impl LayerCache {
    fn compute(layer: &EncoderLayer, x: &Tensor, mask_bias: &Tensor) -> Result<(Self, Tensor)> {
        let (context, attention_pre, after_attention) = match &layer.attention {
            None => (None, None, x.clone()),
            Some(att) => {
                let (context, projected) = if att.heads.is_empty() {
                    (None, x.broadcast_add(&att.output.bias)?)
                } else {
                    let c = att.context(x, mask_bias, Ops::Inference, Queries::All)?;
                    let p = (att.project(&c, None)? + x)?;
                    (Some(c), p)
                };
                let a = att.norm.forward(&projected, Ops::Inference)?;
                (context, Some(projected), a)
            }
        };
        let (activations, ffn_pre, y) = match &layer.ffn {
            None => (None, None, after_attention.clone()),
            Some(ffn) => {
                let (act, pre) = if ffn.width() == 0 {
                    (None, after_attention.broadcast_add(&ffn.output.bias)?)
                } else {
                    let h = ffn.activations(&after_attention)?;
                    let pre = (ffn.output.forward(&h)? + &after_attention)?;
                    (Some(h), pre)
                };
                let y = ffn.norm.forward(&pre, Ops::Inference)?;
                (act, Some(pre), y)
            }
        };
        let cache = LayerCache {
            x: x.clone(),
            context,
            attention_pre,
            after_attention,
            activations,
            ffn_pre,
        };
        Ok((cache, y))
    }

    /// The same cache restricted to the first position (what the last layer needs).
    fn first_position(&self) -> Result<Self> {
        let first = |t: &Tensor, dim: usize| t.narrow(dim, 0, 1)?.contiguous();
        Ok(LayerCache {
            x: first(&self.x, 1)?,
            context: self.context.as_ref().map(|c| first(c, 2)).transpose()?,
            attention_pre: self
                .attention_pre
                .as_ref()
                .map(|t| first(t, 1))
                .transpose()?,
            after_attention: first(&self.after_attention, 1)?,
            activations: self.activations.as_ref().map(|t| first(t, 1)).transpose()?,
            ffn_pre: self.ffn_pre.as_ref().map(|t| first(t, 1)).transpose()?,
        })
    }
}

/// Removes each element in turn and records the loss and predictions over all `batches`.
/// Returns one outcome per element, in order.
pub fn ablate(
    model: &Model,
    batches: &[ScoringBatch],
    elements: &[Element],
    scorer: &Scorer,
    progress: &ProgressBar,
) -> Result<Vec<Outcome>> {
    let total: usize = batches.iter().map(|b| b.examples.len()).sum();
    let mut outcomes = vec![
        Outcome {
            loss_sum: 0.0,
            predictions: vec![0.0; total],
        };
        elements.len()
    ];
    let last = model.num_layers().saturating_sub(1);
    for (number, batch) in batches.iter().enumerate() {
        let mask = &batch.inputs.mask_bias;
        let mut h = model.embed(&batch.inputs, Ops::Inference)?;
        let mut caches = Vec::with_capacity(model.num_layers());
        for layer in &model.layers {
            let (cache, y) = LayerCache::compute(layer, &h, mask)?;
            caches.push(cache);
            h = y;
        }
        let (b, tokens) = batch.inputs.input_ids.dims2()?;
        let chunk = (stack_limit(model, tokens) / b).max(1);
        for (l, cache) in caches.iter().enumerate() {
            let cache = if l == last {
                cache.first_position()?
            } else {
                cache.clone()
            };
            let of_layer: Vec<usize> = (0..elements.len())
                .filter(|&i| elements[i].layer() == l)
                .collect();
            for kind in of_layer.chunk_by(|&a, &b| same_kind(&elements[a], &elements[b])) {
                for ids in kind.chunks(chunk) {
                    let group: Vec<&Element> = ids.iter().map(|&i| &elements[i]).collect();
                    let variants = layer_variants(model, l, &cache, &group)?;
                    let k = group.len();
                    let stacked_mask = Tensor::cat(&vec![mask; k], 0)?;
                    let logits = model.logits_from(
                        &variants,
                        &stacked_mask,
                        l + 1,
                        RunOptions::default(),
                    )?;
                    let logits = finite_rows(&logits, "analysis (ablation)", number)?;
                    for (j, &id) in ids.iter().enumerate() {
                        let out = &mut outcomes[id];
                        for (row, &ex) in logits[j * b..(j + 1) * b].iter().zip(&batch.examples) {
                            out.loss_sum += scorer.example_loss(row, ex);
                            out.predictions[ex] = scorer.prediction(row);
                        }
                    }
                    progress.inc((k * b) as u64);
                }
            }
        }
    }
    Ok(outcomes)
}

fn same_kind(a: &Element, b: &Element) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Layer `l`'s output with each element of `group` (all of one kind, all in layer `l`) removed,
/// stacked along the batch dimension: `[k · B, T, hidden]`.
fn layer_variants(
    model: &Model,
    l: usize,
    cache: &LayerCache,
    group: &[&Element],
) -> Result<Tensor> {
    let layer = &model.layers[l];
    let finish_ffn = |a: &Tensor| -> Result<Tensor> {
        match &layer.ffn {
            Some(ffn) => Ok(ffn.forward(a, None, Ops::Inference)?),
            None => Ok(a.clone()),
        }
    };
    let (b, t, hidden) = cache.x.dims3()?;
    let k = group.len();
    match group[0] {
        Element::AttentionBlock { .. } => finish_ffn(&cache.x),
        Element::FfnBlock { .. } => Ok(cache.after_attention.clone()),
        Element::Head { .. } => {
            let att = layer.attention.as_ref().expect("head of a present block");
            let context = cache.context.as_ref().expect("heads present");
            let d = att.head_size;
            let positions: Vec<u32> = group
                .iter()
                .map(|e| match e {
                    Element::Head { head, .. } => {
                        att.heads.iter().position(|h| h == head).expect("kept head") as u32
                    }
                    _ => unreachable!("grouped by kind"),
                })
                .collect();
            let idx = Tensor::new(positions, &Device::Cpu)?;
            // [k, B·T, d] contexts of the removed heads and [k, d, hidden] their W_o columns.
            let ctx = context
                .index_select(&idx, 1)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((k, b * t, d))?;
            let n = att.heads.len();
            let w = att
                .output
                .weight
                .to_dense()?
                .reshape((hidden, n, d))?
                .index_select(&idx, 1)?
                .permute((1, 2, 0))?
                .contiguous()?;
            let pre = cache.attention_pre.as_ref().expect("present");
            finish_ffn(&without_contributions(pre, &ctx, &w, &att.norm)?)
        }
        Element::Group { .. } => {
            let ffn = layer.ffn.as_ref().expect("group of a present block");
            let acts = cache.activations.as_ref().expect("width > 0");
            let neurons: Vec<u32> = group
                .iter()
                .flat_map(|e| match e {
                    Element::Group { neurons, .. } => neurons.iter().map(|&n| n as u32),
                    _ => unreachable!("grouped by kind"),
                })
                .collect();
            let g = neurons.len() / k;
            let idx = Tensor::new(neurons, &Device::Cpu)?;
            let width = ffn.width();
            let h = acts
                .reshape((b * t, width))?
                .index_select(&idx, 1)?
                .reshape((b * t, k, g))?
                .transpose(0, 1)?
                .contiguous()?;
            let w = ffn
                .output
                .weight
                .to_dense()?
                .index_select(&idx, 1)?
                .reshape((hidden, k, g))?
                .permute((1, 2, 0))?
                .contiguous()?;
            let pre = cache.ffn_pre.as_ref().expect("present");
            without_contributions(pre, &h, &w, &ffn.norm)
        }
    }
}

/// `LayerNorm(pre − inputs_j · weights_j)` for each removed element `j`, stacked: `pre` is the
/// cached pre-LayerNorm sum `[B, T, hidden]`, `inputs` `[k, B·T, g]` the removed elements'
/// activations and `weights` `[k, g, hidden]` their output-projection columns. Returns
/// `[k · B, T, hidden]`.
fn without_contributions(
    pre: &Tensor,
    inputs: &Tensor,
    weights: &Tensor,
    norm: &LayerNorm,
) -> Result<Tensor> {
    let (b, t, hidden) = pre.dims3()?;
    let k = inputs.dim(0)?;
    let contribution = inputs.matmul(weights)?.reshape((k, b, t, hidden))?;
    let pre = pre
        .unsqueeze(0)?
        .broadcast_sub(&contribution)?
        .reshape((k * b, t, hidden))?;
    Ok(norm.forward(&pre, Ops::Inference)?)
}
