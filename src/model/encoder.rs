//! The encoder runtime: embeddings, attention and FFN blocks with per-layer shapes, multiplicative
//! gates, and running a range of layers on cached hidden states.

use std::ops::Range;

use candle_core::{Result, Tensor, D};

use super::config::Activation;
use super::inputs::Inputs;
use super::linear::{Linear, Weight};
use super::nn::{activate_owned, LayerNorm};
use crate::kernels::attention_mode::ApproxAttention;
use crate::kernels::softmax::softmax_last;
use crate::kernels::{fused_attention, sparse_attention, Ops};

/// Word, position and (optionally) token-type embeddings followed by LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// `[vocab, hidden]`; may be quantized (rows dequantized as they are looked up).
    pub word: Weight,
    /// `[max_positions, hidden]`.
    pub position: Tensor,
    /// `[type_vocab, hidden]`; `None` for DistilBERT.
    pub token_type: Option<Tensor>,
    /// Embedding LayerNorm.
    pub norm: LayerNorm,
}

impl Embeddings {
    /// Parameters of the tables and the LayerNorm.
    pub fn parameter_count(&self) -> usize {
        let tables = self.word.elem_count() + self.position.elem_count();
        let types = self.token_type.as_ref().map_or(0, Tensor::elem_count);
        tables + types + self.norm.weight.elem_count() + self.norm.bias.elem_count()
    }

    /// Embeds `[batch, seq]` id tensors into `[batch, seq, hidden]`.
    pub fn forward(&self, inputs: &Inputs, ops: Ops) -> Result<Tensor> {
        let lookup = |table: &Weight, ids: &Tensor| -> Result<Tensor> {
            let (b, t) = ids.dims2()?;
            table
                .lookup(&ids.flatten_all()?)?
                .reshape((b, t, table.dims().1))
        };
        let dense = |t: &Tensor| Weight::Dense(t.clone());
        let mut x = (lookup(&self.word, &inputs.input_ids)?
            + lookup(&dense(&self.position), &inputs.position_ids)?)?;
        if let Some(types) = &self.token_type {
            x = (x + lookup(&dense(types), &inputs.token_type_ids)?)?;
        }
        self.norm.forward(&x, ops)
    }
}

/// A multi-head self-attention block keeping a subset of the original heads.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Fused query/key/value projection, `[3 · heads · head_size, hidden]` (all queries, then keys, then values).
    pub qkv: Linear,
    /// Output projection, `[hidden, heads · head_size]`; with no heads only its bias is used.
    pub output: Linear,
    /// Residual LayerNorm.
    pub norm: LayerNorm,
    /// Original indices of the kept heads.
    pub heads: Vec<usize>,
    /// Size of each head.
    pub head_size: usize,
    /// The approximation of the softmax attention; `None` for dense attention.
    pub approx: Option<ApproxAttention>,
}

impl Attention {
    /// Per-head attention context `[batch, heads, seq_q, head_size]`, before head gates and the
    /// output projection. With [`Queries::First`] only the first position queries (`seq_q = 1`); keys
    /// and values always come from every position. Requires at least one head.
    pub fn context(
        &self,
        x: &Tensor,
        mask_bias: &Tensor,
        ops: Ops,
        queries: Queries,
    ) -> Result<Tensor> {
        let n = self.heads.len();
        let (b, t, _) = x.dims3()?;
        let d = self.head_size;
        let split = |proj: Tensor, i: usize| -> Result<Tensor> {
            let t_len = proj.dim(1)?;
            proj.narrow(D::Minus1, i * n * d, n * d)?
                .reshape((b, t_len, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = if queries == Queries::First {
            let q = self.qkv.forward_rows(&x.narrow(1, 0, 1)?, 0, n * d)?;
            let kv = self.qkv.forward_rows(x, n * d, 2 * n * d)?;
            (split(q, 0)?, split(kv.clone(), 0)?, split(kv, 1)?)
        } else {
            let qkv = self.qkv.forward(x)?;
            (
                split(qkv.clone(), 0)?,
                split(qkv.clone(), 1)?,
                split(qkv, 2)?,
            )
        };
        debug_assert_eq!(k.dim(2)?, t);
        let q = (q * (1.0 / (d as f64).sqrt()))?;
        match self.approx {
            None => {
                let scores = q.matmul(&k.t()?)?.broadcast_add(mask_bias)?;
                softmax_last(&scores, ops)?.matmul(&v)
            }
            Some(approx) if ops == Ops::Differentiable => sparse_attention::masked_reference(
                &q,
                &k,
                &v,
                mask_bias,
                approx,
                Ops::Differentiable,
            ),
            Some(approx) => sparse_attention::context(&q, &k, &v, mask_bias, approx),
        }
    }

    /// The per-head contexts side by side, `[batch, seq, heads · head_size]`: the output
    /// projection's input (inference path, every position).
    pub fn flat_context(&self, x: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let c = self.context(x, mask_bias, Ops::Inference, Queries::All)?;
        let (b, n, t, d) = c.dims4()?;
        c.transpose(1, 2)?.reshape((b, t, n * d))
    }

    /// Dense attention context `[batch, seq_q, heads · head_size]`, ready for the output
    /// projection, in one fused kernel (inference only: no backward pass, no head gates).
    fn fused_context(&self, x: &Tensor, mask_bias: &Tensor, queries: Queries) -> Result<Tensor> {
        let nd = self.heads.len() * self.head_size;
        let shape = (self.heads.len(), self.head_size);
        if queries == Queries::First {
            let q = self.qkv.forward_rows(&x.narrow(1, 0, 1)?, 0, nd)?;
            let kv = self.qkv.forward_rows(x, nd, 2 * nd)?;
            fused_attention::dense_context(&q, 0, &kv, (0, nd), mask_bias, shape)
        } else {
            let qkv = self.qkv.forward(x)?;
            fused_attention::dense_context(&qkv, 0, &qkv, (nd, 2 * nd), mask_bias, shape)
        }
    }

    /// Output projection `W_o · context + b_o`, `[batch, seq_q, hidden]`, with optional head gates.
    pub fn project(&self, context: &Tensor, head_gates: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, tq, d) = context.dims4()?;
        let context = match head_gates {
            Some(g) => context.broadcast_mul(&g.reshape((1, n, 1, 1))?)?,
            None => context.clone(),
        };
        self.output
            .forward(&context.transpose(1, 2)?.reshape((b, tq, n * d))?)
    }

    /// The whole block: `LayerNorm(x + W_o · context + b_o)` (see [`super::structure`]).
    fn forward(
        &self,
        x: &Tensor,
        mask_bias: &Tensor,
        head_gates: Option<&Tensor>,
        ops: Ops,
        queries: Queries,
    ) -> Result<Tensor> {
        let x_q = if queries == Queries::First {
            x.narrow(1, 0, 1)?
        } else {
            x.clone()
        };
        if self.heads.is_empty() {
            // Every head removed: LayerNorm(x + b_o).
            return self
                .norm
                .forward(&x_q.broadcast_add(&self.output.bias)?, ops);
        }
        let out = if ops == Ops::Inference && self.approx.is_none() && head_gates.is_none() {
            self.output
                .forward(&self.fused_context(x, mask_bias, queries)?)?
        } else {
            let context = self.context(x, mask_bias, ops, queries)?;
            self.project(&context, head_gates)?
        };
        self.norm.forward(&(out + x_q)?, ops)
    }
}

/// A position-wise feed-forward block of some width.
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// `[width, hidden]`.
    pub intermediate: Linear,
    /// `[hidden, width]`; with width 0 only its bias is used.
    pub output: Linear,
    /// Residual LayerNorm.
    pub norm: LayerNorm,
    /// Activation between the two projections.
    pub activation: Activation,
}

impl FeedForward {
    /// Number of intermediate neurons.
    pub fn width(&self) -> usize {
        self.intermediate.out_features()
    }

    /// Activations after the first projection, `[batch, seq, width]`.
    pub fn activations(&self, x: &Tensor) -> Result<Tensor> {
        activate_owned(self.intermediate.forward(x)?, self.activation)
    }

    /// The whole block: `LayerNorm(x + W_2 · act(W_1 x + b_1) + b_2)` (see [`super::structure`]).
    pub fn forward(&self, x: &Tensor, neuron_gates: Option<&Tensor>, ops: Ops) -> Result<Tensor> {
        if self.width() == 0 {
            return self.norm.forward(&x.broadcast_add(&self.output.bias)?, ops);
        }
        let mut h = self.activations(x)?;
        if let Some(g) = neuron_gates {
            h = h.broadcast_mul(g)?;
        }
        let out = self.output.forward(&h)?;
        self.norm.forward(&(out + x)?, ops)
    }
}

/// One encoder layer; a `None` block is removed (the identity).
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    /// The attention block, if present.
    pub attention: Option<Attention>,
    /// The FFN block, if present.
    pub ffn: Option<FeedForward>,
}

/// Multiplicative gates of one layer (1 = kept, 0 = removed). `None` means "all ones".
#[derive(Debug, Clone, Default)]
pub struct LayerGates {
    /// Scalar gate of the whole attention block: `g·block(x) + (1−g)·x`.
    pub attention: Option<Tensor>,
    /// One gate per kept head, `[heads]`, applied to each head's context before the output projection.
    pub heads: Option<Tensor>,
    /// Scalar gate of the whole FFN block: `g·block(x) + (1−g)·x`.
    pub ffn: Option<Tensor>,
    /// One gate per FFN neuron, `[width]`, applied after the activation.
    pub neurons: Option<Tensor>,
}

/// Gates for every layer of a model. Gating an element to 0 computes exactly what removing it
/// (see [`super::structure`]) computes.
#[derive(Debug, Clone)]
pub struct Gates {
    /// One entry per encoder layer.
    pub layers: Vec<LayerGates>,
}

impl Gates {
    /// Gates that change nothing.
    pub fn open(layers: usize) -> Self {
        Gates {
            layers: vec![LayerGates::default(); layers],
        }
    }
}

/// Which positions query in an attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queries {
    /// Every position.
    All,
    /// Only the first (`[CLS]`): the last layer of a classifier needs nothing else.
    First,
}

/// How to run the encoder.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions<'a> {
    /// Gates to apply, if any.
    pub gates: Option<&'a Gates>,
    /// The ops: inference, or with a backward pass (needed for gradients; slower).
    pub ops: Ops,
}

/// Blends a block's output with its input by a scalar gate. A gate of exactly 0 on the fast path
/// skips the block.
fn gated_block(
    x: &Tensor,
    gate: Option<&Tensor>,
    ops: Ops,
    block: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let Some(g) = gate else { return block() };
    if ops == Ops::Inference && g.to_scalar::<f32>()? == 0.0 {
        return Ok(x.clone());
    }
    let y = block()?;
    let g = g.reshape((1, 1, 1))?;
    y.broadcast_mul(&g)? + x.broadcast_mul(&(1.0 - &g)?)?
}

impl EncoderLayer {
    /// The states leaving the attention block (entering the FFN) on `x` (inference path; `x`
    /// itself when the block is removed).
    pub fn after_attention(&self, x: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        match &self.attention {
            Some(att) => att.forward(x, mask_bias, None, Ops::Inference, Queries::All),
            None => Ok(x.clone()),
        }
    }

    /// Runs the layer on `[batch, seq, hidden]`; with [`Queries::First`] the output is `[batch, 1, hidden]`
    /// for the first position only (exactly what the full run gives there).
    pub fn forward(
        &self,
        x: &Tensor,
        mask_bias: &Tensor,
        gates: Option<&LayerGates>,
        ops: Ops,
        queries: Queries,
    ) -> Result<Tensor> {
        let g = gates.cloned().unwrap_or_default();
        let mut h = x.clone();
        if let Some(att) = &self.attention {
            let residual = if queries == Queries::First {
                h.narrow(1, 0, 1)?
            } else {
                h.clone()
            };
            h = gated_block(&residual, g.attention.as_ref(), ops, || {
                att.forward(&h, mask_bias, g.heads.as_ref(), ops, queries)
            })?;
        } else if queries == Queries::First {
            h = h.narrow(1, 0, 1)?;
        }
        if let Some(ffn) = &self.ffn {
            h = gated_block(&h, g.ffn.as_ref(), ops, || {
                ffn.forward(&h, g.neurons.as_ref(), ops)
            })?;
        }
        Ok(h)
    }
}

/// Runs `layers[range]` on hidden states entering `range.start` (prefix caching: the states
/// entering a layer can be computed once and reused).
pub fn run_layers(
    layers: &[EncoderLayer],
    hidden: &Tensor,
    mask_bias: &Tensor,
    range: Range<usize>,
    opts: RunOptions,
) -> Result<Tensor> {
    let mut h = hidden.clone();
    for l in range {
        let g = opts.gates.and_then(|g| g.layers.get(l));
        h = layers[l].forward(&h, mask_bias, g, opts.ops, Queries::All)?;
    }
    Ok(h)
}

/// Runs `layers[start..]` and returns the states of the first position only, `[batch, 1, hidden]`:
/// the last layer computes just that position (keys and values still use every position).
pub fn run_to_first_token(
    layers: &[EncoderLayer],
    hidden: &Tensor,
    mask_bias: &Tensor,
    start: usize,
    opts: RunOptions,
) -> Result<Tensor> {
    let Some(last) = layers.len().checked_sub(1).filter(|&last| start <= last) else {
        return hidden.narrow(1, 0, 1);
    };
    let h = run_layers(layers, hidden, mask_bias, start..last, opts)?;
    let g = opts.gates.and_then(|g| g.layers.get(last));
    layers[last].forward(&h, mask_bias, g, opts.ops, Queries::First)
}
