//! The model as an ONNX graph, block by block, in the order the runtime computes it: embeddings,
//! encoder layers with their own head counts and FFN widths (removed blocks are identities, the
//! last layer computes only the first position), then the classifier head.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::graph::{float, int, ints, Dim, Graph, TensorData};
use super::proto::tensor_proto::DataType;
use crate::formats::quant::{Bits, Codes};
use crate::model::config::{Activation, Family};
use crate::model::encoder::{Attention, FeedForward};
use crate::model::linear::{Linear, Weight};
use crate::model::nn::LayerNorm;
use crate::model::Model;

/// How int8 matrices are written. The default is the one ONNX Runtime 1.32 runs faster (3.1×
/// `qdq`'s speed at batch 32 on MiniLM here), at the cost of its per-tensor activation rounding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Int8Form {
    /// `DynamicQuantizeLinear` on the activations and `MatMulInteger` (what ONNX Runtime's
    /// `quantize_dynamic` writes, fused by it into one integer kernel).
    #[default]
    Dynamic,
    /// Weights as `DequantizeLinear` (per output channel) feeding a float `MatMul` (QDQ).
    Qdq,
}

/// How int4 matrices are written. The default is the one ONNX Runtime 1.32 runs faster: its
/// `MatMulNBits` (what 4-bit blocks become) was slower than its f32 product at batch 32 here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Int4Form {
    /// INT4 weights in blocks of 32 inputs, `DequantizeLinear` (opset 21) feeding `MatMul`: the
    /// codes as they are (ONNX Runtime fuses them into `MatMulNBits`).
    Blocks,
    /// Each matrix's values requantized to int8 per output channel and written as `--int8`
    /// says: twice the bytes, ONNX Runtime's faster int8 kernels, values within half an int8
    /// step of the int4 ones.
    #[default]
    Int8,
}

/// How the graph is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct LowerOptions {
    /// The form of int8 matrices.
    pub int8: Int8Form,
    /// The form of int4 matrices.
    pub int4: Int4Form,
}

/// The graph and what it could not keep.
pub struct Lowered {
    /// The graph, inputs and outputs declared.
    pub graph: Graph,
    /// The opset the graph needs: 17, or 21 for 4-bit blocks.
    pub opset: i64,
    /// What the graph computes differently from axcompress, one line each.
    pub notes: Vec<String>,
}

/// Lowers `model` to a graph with inputs `input_ids`, `attention_mask` (and `token_type_ids`
/// for BERT), dynamic `batch` and `sequence` axes, and output `logits`.
pub fn lower(model: &Model, options: LowerOptions) -> Result<Lowered> {
    let mut l = Lowering {
        g: Graph::default(),
        options,
        uses_int4: false,
        notes: Vec::new(),
    };
    let axes = [Dim::Named("batch"), Dim::Named("sequence")];
    let ids = l.g.input("input_ids", DataType::Int64, &axes);
    let mask = l.g.input("attention_mask", DataType::Int64, &axes);
    let types = (model.config.family == Family::Bert)
        .then(|| l.g.input("token_type_ids", DataType::Int64, &axes));
    let mask_bias = l.mask_bias(&mask);
    let mut x = l.embeddings(model, &ids, &mask, types.as_deref())?;
    let last = model.layers.len().checked_sub(1);
    for (i, layer) in model.layers.iter().enumerate() {
        let first_only = Some(i) == last;
        x = match &layer.attention {
            Some(att) => l.attention(att, &x, &mask_bias, first_only, i)?,
            None if first_only => l.first_position(&x),
            None => x,
        };
        if let Some(ffn) = &layer.ffn {
            x = l.feed_forward(ffn, &x)?;
        }
    }
    let logits = l.head(model, &x)?;
    let labels = model.config.num_labels() as i64;
    l.g.output(
        &logits,
        "logits",
        DataType::Float,
        &[Dim::Named("batch"), Dim::Fixed(labels)],
    );
    Ok(Lowered {
        graph: l.g,
        opset: if l.uses_int4 { 21 } else { 17 },
        notes: l.notes,
    })
}

struct Lowering {
    g: Graph,
    options: LowerOptions,
    uses_int4: bool,
    notes: Vec<String>,
}

/// An f32 tensor's values, row-major.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Lowering {
    /// `[batch, 1, 1, sequence]`: 0 where the mask is 1, `f32::MIN` where it is 0 (the runtime's
    /// additive mask).
    fn mask_bias(&mut self, mask: &str) -> String {
        let m = self
            .g
            .op("Cast", &[mask], vec![int("to", DataType::Float as i64)]);
        let one = self.g.scalar("one", 1.0);
        let padding = self.g.op("Sub", &[&one, &m], Vec::new());
        let min = self.g.scalar("mask_min", f32::MIN);
        let bias = self.g.op("Mul", &[&padding, &min], Vec::new());
        let axes = self.g.i64s("axes", &[1, 2]);
        self.g.op("Unsqueeze", &[&bias, &axes], Vec::new())
    }

    fn embeddings(
        &mut self,
        model: &Model,
        ids: &str,
        mask: &str,
        types: Option<&str>,
    ) -> Result<String> {
        let e = &model.embeddings;
        let word = self.lookup(&e.word, ids)?;
        let positions = self.positions(model, ids, mask)?;
        let mut x = self.g.op("Add", &[&word, &positions], Vec::new());
        match (&e.token_type, types) {
            (Some(table), Some(types)) => {
                let table = self.dense_table(table)?;
                let rows = self.g.op("Gather", &[&table, types], vec![int("axis", 0)]);
                x = self.g.op("Add", &[&x, &rows], Vec::new());
            }
            // RoBERTa: every token has type 0.
            (Some(table), None) => {
                let row = self.g.f32s(
                    "token_type_row",
                    values(&table.get(0)?)?,
                    &[table.dims()[1]],
                );
                x = self.g.op("Add", &[&x, &row], Vec::new());
            }
            (None, _) => {}
        }
        self.layer_norm(&e.norm, &x)
    }

    /// Position embeddings: rows `0..sequence` (BERT, DistilBERT), or RoBERTa's
    /// `pad + cumsum(mask)` on real tokens and `pad` on padding.
    fn positions(&mut self, model: &Model, ids: &str, mask: &str) -> Result<String> {
        let table = self.dense_table(&model.embeddings.position)?;
        if model.config.family == Family::Roberta {
            let axis = self.g.i64_scalar("axis", 1);
            let seen = self.g.op("CumSum", &[mask, &axis], Vec::new());
            let real = self.g.op("Mul", &[&seen, mask], Vec::new());
            let pad = self
                .g
                .i64_scalar("pad", i64::from(model.config.pad_token_id));
            let index = self.g.op("Add", &[&real, &pad], Vec::new());
            return Ok(self.g.op("Gather", &[&table, &index], vec![int("axis", 0)]));
        }
        let len = self
            .g
            .op("Shape", &[ids], vec![int("start", 1), int("end", 2)]);
        let zero = self.g.i64s("zero", &[0]);
        let axis = self.g.i64s("axis", &[0]);
        Ok(self
            .g
            .op("Slice", &[&table, &zero, &len, &axis], Vec::new()))
    }

    fn dense_table(&mut self, t: &Tensor) -> Result<String> {
        let dims = t.dims().to_vec();
        Ok(self.g.f32s("table", values(t)?, &dims))
    }

    /// Rows of an embedding table for `[batch, sequence]` ids: a quantized table is gathered
    /// as codes and scales and dequantized row by row.
    fn lookup(&mut self, table: &Weight, ids: &str) -> Result<String> {
        let Weight::Quantized(q) = table else {
            let table = self.dense_table(&table.to_dense()?)?;
            return Ok(self.g.op("Gather", &[&table, ids], vec![int("axis", 0)]));
        };
        let c = &q.codes;
        let groups = c.cols / c.group;
        let gathered = match c.bits {
            Bits::Int8 => {
                let codes = self.g.initializer(
                    "table_codes",
                    TensorData::I8(c.codes.clone()),
                    &[c.rows, groups, c.group],
                );
                let gathered = self.g.op("Gather", &[&codes, ids], vec![int("axis", 0)]);
                self.g.op(
                    "Cast",
                    &[&gathered],
                    vec![int("to", DataType::Float as i64)],
                )
            }
            Bits::Int4 => self.int4_rows(c, ids),
        };
        let scales: Vec<f32> = c.scales.iter().map(|s| s.to_f32()).collect();
        let scales = self.g.f32s("table_scales", scales, &[c.rows, groups, 1]);
        let row_scales = self.g.op("Gather", &[&scales, ids], vec![int("axis", 0)]);
        let rows = self.g.op("Mul", &[&gathered, &row_scales], Vec::new());
        let shape = self.g.i64s("shape", &[0, 0, c.cols as i64]);
        Ok(self.g.op("Reshape", &[&rows, &shape], Vec::new()))
    }

    /// The codes of an int4 table's rows as floats `[batch, sequence, groups, group]`, from a
    /// table stored two codes per byte (`code + 8`, the first in the low nibble) and split by
    /// float arithmetic, which every runtime has.
    fn int4_rows(&mut self, c: &Codes, ids: &str) -> String {
        let packed: Vec<u8> = c
            .codes
            .chunks(2)
            .map(|p| (p[0] + 8) as u8 | (((p[1] + 8) as u8) << 4))
            .collect();
        let table = self.g.initializer(
            "table_codes4",
            TensorData::U8(packed),
            &[c.rows, c.cols / 2],
        );
        let bytes = self.g.op("Gather", &[&table, ids], vec![int("axis", 0)]);
        let bytes = self
            .g
            .op("Cast", &[&bytes], vec![int("to", DataType::Float as i64)]);
        let sixteen = self.g.scalar("sixteen", 16.0);
        let shifted = self.g.op("Div", &[&bytes, &sixteen], Vec::new());
        let high = self.g.op("Floor", &[&shifted], Vec::new());
        let high_part = self.g.op("Mul", &[&high, &sixteen], Vec::new());
        let low = self.g.op("Sub", &[&bytes, &high_part], Vec::new());
        let last = self.g.i64s("axes", &[-1]);
        let low = self.g.op("Unsqueeze", &[&low, &last], Vec::new());
        let high = self.g.op("Unsqueeze", &[&high, &last], Vec::new());
        let pairs = self.g.op("Concat", &[&low, &high], vec![int("axis", -1)]);
        let shape = self
            .g
            .i64s("shape", &[0, 0, (c.cols / c.group) as i64, c.group as i64]);
        let codes = self.g.op("Reshape", &[&pairs, &shape], Vec::new());
        let eight = self.g.scalar("eight", 8.0);
        self.g.op("Sub", &[&codes, &eight], Vec::new())
    }

    fn layer_norm(&mut self, norm: &LayerNorm, x: &str) -> Result<String> {
        let h = norm.weight.dims()[0];
        let scale = self.g.f32s("ln_scale", values(&norm.weight)?, &[h]);
        let bias = self.g.f32s("ln_bias", values(&norm.bias)?, &[h]);
        Ok(self.g.op(
            "LayerNormalization",
            &[x, &scale, &bias],
            vec![int("axis", -1), float("epsilon", norm.eps as f32)],
        ))
    }

    /// `x[:, 0:1, :]`.
    fn first_position(&mut self, x: &str) -> String {
        let zero = self.g.i64s("zero", &[0]);
        let one = self.g.i64s("one", &[1]);
        let axis = self.g.i64s("axis", &[1]);
        self.g.op("Slice", &[x, &zero, &one, &axis], Vec::new())
    }

    /// `x Wᵀ + b`.
    fn linear(&mut self, x: &str, layer: &Linear) -> Result<String> {
        let product = self.product(x, &layer.weight)?;
        let out = layer.bias.dims()[0];
        let bias = self.g.f32s("bias", values(&layer.bias)?, &[out]);
        Ok(self.g.op("Add", &[&product, &bias], Vec::new()))
    }

    /// `x Wᵀ` in the form the weight's precision calls for.
    fn product(&mut self, x: &str, weight: &Weight) -> Result<String> {
        match weight {
            Weight::Quantized(q) => self.quantized_product(x, &q.codes),
            Weight::Stacked(s) => {
                let quantized: Option<Vec<&Codes>> = s
                    .parts
                    .iter()
                    .map(|p| match p {
                        Weight::Quantized(q) => Some(q.codes.as_ref()),
                        _ => None,
                    })
                    .collect();
                let same = quantized.filter(|c| {
                    c.windows(2)
                        .all(|w| (w[0].bits, w[0].group) == (w[1].bits, w[1].group))
                });
                if let Some(parts) = same {
                    return self.quantized_product(x, &Codes::stack(&parts)?);
                }
                if s.parts.iter().all(|p| p.is_dense()) {
                    return self.float_product(x, &weight.to_dense()?);
                }
                let outs = s
                    .parts
                    .iter()
                    .map(|p| self.product(x, p))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
                Ok(self.g.op("Concat", &refs, vec![int("axis", -1)]))
            }
            // Block-sparse stripes are written dense: no standard operator skips the zeros.
            Weight::Dense(_) | Weight::Striped(_) => self.float_product(x, &weight.to_dense()?),
        }
    }

    fn float_product(&mut self, x: &str, w: &Tensor) -> Result<String> {
        let (out, inp) = w.dims2()?;
        let wt = self
            .g
            .f32s("weight", values(&w.t()?.contiguous()?)?, &[inp, out]);
        Ok(self.g.op("MatMul", &[x, &wt], Vec::new()))
    }

    /// `x Wᵀ` for a quantized matrix, in the form `--int8` / `--int4` ask for.
    fn quantized_product(&mut self, x: &str, c: &Codes) -> Result<String> {
        match (c.bits, self.options.int4) {
            (Bits::Int4, Int4Form::Int8) => {
                let requantized = Codes::quantize(&c.dequantize(), c.rows, c.cols, Bits::Int8)?;
                self.int8_product(x, &requantized)
            }
            (Bits::Int4, Int4Form::Blocks) => Ok(self.int4_product(x, c)),
            (Bits::Int8, _) => self.int8_product(x, c),
        }
    }

    /// An int8 matrix (one scale per output): dynamic activation quantization and an integer
    /// product, or the weight dequantized per channel (QDQ).
    fn int8_product(&mut self, x: &str, c: &Codes) -> Result<String> {
        if c.group != c.cols {
            bail!("int8 matrices with group scales are not supported");
        }
        let scales: Vec<f32> = c.scales.iter().map(|s| s.to_f32()).collect();
        let codes = TensorData::I8(transposed(&c.codes, c.rows, c.cols));
        let w = self.g.initializer("weight_q", codes, &[c.cols, c.rows]);
        let w_scale = self.g.f32s("weight_scale", scales, &[c.rows]);
        if self.options.int8 == Int8Form::Qdq {
            let w = self
                .g
                .op("DequantizeLinear", &[&w, &w_scale], vec![int("axis", 1)]);
            return Ok(self.g.op("MatMul", &[x, &w], Vec::new()));
        }
        let q = self.g.op_n("DynamicQuantizeLinear", &[x], 3, Vec::new());
        let product = self.g.op("MatMulInteger", &[&q[0], &w, &q[2]], Vec::new());
        let to_float = vec![int("to", DataType::Float as i64)];
        let product = self.g.op("Cast", &[&product], to_float);
        let scale = self.g.op("Mul", &[&q[1], &w_scale], Vec::new());
        Ok(self.g.op("Mul", &[&product, &scale], Vec::new()))
    }

    /// An int4 matrix as INT4 codes dequantized in blocks along the inputs (opset 21).
    fn int4_product(&mut self, x: &str, c: &Codes) -> String {
        self.uses_int4 = true;
        let groups = c.cols / c.group;
        // Scales laid out like the transposed weight: [groups of inputs, outputs].
        let scales: Vec<f32> = (0..groups)
            .flat_map(|g| (0..c.rows).map(move |r| c.scales[r * groups + g].to_f32()))
            .collect();
        let codes = TensorData::I4(transposed(&c.codes, c.rows, c.cols));
        let w = self.g.initializer("weight_q4", codes, &[c.cols, c.rows]);
        let w_scale = self.g.f32s("weight_scale", scales, &[groups, c.rows]);
        let blocks = vec![int("axis", 0), int("block_size", c.group as i64)];
        let w = self.g.op("DequantizeLinear", &[&w, &w_scale], blocks);
        self.g.op("MatMul", &[x, &w], Vec::new())
    }

    /// The attention block on `x` (`[batch, sequence, hidden]`); with `first_only`, only the
    /// first position queries and is returned.
    fn attention(
        &mut self,
        att: &Attention,
        x: &str,
        mask_bias: &str,
        first_only: bool,
        layer: usize,
    ) -> Result<String> {
        let x_q = if first_only {
            self.first_position(x)
        } else {
            x.to_string()
        };
        if att.heads.is_empty() {
            let bias = self.g.f32s(
                "bias",
                values(&att.output.bias)?,
                &[att.output.bias.dims()[0]],
            );
            let sum = self.g.op("Add", &[&x_q, &bias], Vec::new());
            return self.layer_norm(&att.norm, &sum);
        }
        if let Some(mode) = att.approx {
            self.notes.push(format!(
                "layer {layer}: {mode} attention is written as exact attention (no ONNX operator computes it)"
            ));
        }
        let (q, k, v) = self.projections(att, x, &x_q, first_only)?;
        let context =
            self.scaled_dot_product(&q, &k, &v, mask_bias, (att.heads.len(), att.head_size));
        let out = self.linear(&context, &att.output)?;
        let sum = self.g.op("Add", &[&out, &x_q], Vec::new());
        self.layer_norm(&att.norm, &sum)
    }

    /// Queries (from `x_q`), keys and values (from `x`), each `[batch, positions, heads · size]`:
    /// one product and a split, or with `first_only` the query rows on `x_q` and the key and
    /// value rows on `x`.
    fn projections(
        &mut self,
        att: &Attention,
        x: &str,
        x_q: &str,
        first_only: bool,
    ) -> Result<(String, String, String)> {
        let nd = att.heads.len() * att.head_size;
        let mut parts = if first_only {
            let q = self.linear(x_q, &att.qkv.narrow_rows_stored(0, nd)?)?;
            let kv = self.linear(x, &att.qkv.narrow_rows_stored(nd, 2 * nd)?)?;
            let split = self.g.i64s("split", &[nd as i64; 2]);
            let kv = self
                .g
                .op_n("Split", &[&kv, &split], 2, vec![int("axis", -1)]);
            std::iter::once(q).chain(kv).collect::<Vec<_>>()
        } else {
            let qkv = self.linear(x, &att.qkv)?;
            let split = self.g.i64s("split", &[nd as i64; 3]);
            self.g
                .op_n("Split", &[&qkv, &split], 3, vec![int("axis", -1)])
        };
        let v = parts.pop().expect("three parts");
        let k = parts.pop().expect("three parts");
        Ok((parts.pop().expect("three parts"), k, v))
    }

    /// `softmax(q kᵀ / √size + mask) v` per head, the heads side by side again:
    /// `[batch, queries, heads · size]`.
    fn scaled_dot_product(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        mask_bias: &str,
        (n, d): (usize, usize),
    ) -> String {
        let scale = self.g.scalar("query_scale", 1.0 / (d as f32).sqrt());
        let q = self.g.op("Mul", &[q, &scale], Vec::new());
        let heads = self.g.i64s("shape", &[0, 0, n as i64, d as i64]);
        let split_heads = |g: &mut Graph, t: &str, perm: &[i64]| {
            let r = g.op("Reshape", &[t, &heads], Vec::new());
            g.op("Transpose", &[&r], vec![ints("perm", perm)])
        };
        let q = split_heads(&mut self.g, &q, &[0, 2, 1, 3]);
        let k = split_heads(&mut self.g, k, &[0, 2, 3, 1]);
        let v = split_heads(&mut self.g, v, &[0, 2, 1, 3]);
        let scores = self.g.op("MatMul", &[&q, &k], Vec::new());
        let scores = self.g.op("Add", &[&scores, mask_bias], Vec::new());
        let probs = self.g.op("Softmax", &[&scores], vec![int("axis", -1)]);
        let context = self.g.op("MatMul", &[&probs, &v], Vec::new());
        let context = self
            .g
            .op("Transpose", &[&context], vec![ints("perm", &[0, 2, 1, 3])]);
        let flat = self.g.i64s("shape", &[0, 0, (n * d) as i64]);
        self.g.op("Reshape", &[&context, &flat], Vec::new())
    }

    fn feed_forward(&mut self, ffn: &FeedForward, x: &str) -> Result<String> {
        let out = if ffn.width() == 0 {
            let b = &ffn.output.bias;
            self.g.f32s("bias", values(b)?, &[b.dims()[0]])
        } else {
            let h = self.linear(x, &ffn.intermediate)?;
            let h = self.activation(&h, ffn.activation);
            self.linear(&h, &ffn.output)?
        };
        let sum = self.g.op("Add", &[&out, x], Vec::new());
        self.layer_norm(&ffn.norm, &sum)
    }

    /// The FFN activation from standard operators, in the pattern ONNX Runtime fuses.
    fn activation(&mut self, x: &str, activation: Activation) -> String {
        match activation {
            Activation::Relu => self.g.op("Relu", &[x], Vec::new()),
            // x · ½(1 + erf(x / √2))
            Activation::Gelu => {
                let root2 = self.g.scalar("sqrt2", std::f32::consts::SQRT_2);
                let scaled = self.g.op("Div", &[x, &root2], Vec::new());
                let erf = self.g.op("Erf", &[&scaled], Vec::new());
                let one = self.g.scalar("one", 1.0);
                let shifted = self.g.op("Add", &[&erf, &one], Vec::new());
                let product = self.g.op("Mul", &[x, &shifted], Vec::new());
                let half = self.g.scalar("half", 0.5);
                self.g.op("Mul", &[&product, &half], Vec::new())
            }
            // ½x(1 + tanh(√(2/π)(x + 0.044715x³)))
            Activation::GeluTanh => {
                let three = self.g.scalar("three", 3.0);
                let cube = self.g.op("Pow", &[x, &three], Vec::new());
                let c = self.g.scalar("gelu_c", 0.044715);
                let cube = self.g.op("Mul", &[&cube, &c], Vec::new());
                let inner = self.g.op("Add", &[x, &cube], Vec::new());
                let k = self.g.scalar("gelu_k", (2.0 / std::f32::consts::PI).sqrt());
                let inner = self.g.op("Mul", &[&inner, &k], Vec::new());
                let t = self.g.op("Tanh", &[&inner], Vec::new());
                let one = self.g.scalar("one", 1.0);
                let t = self.g.op("Add", &[&t, &one], Vec::new());
                let product = self.g.op("Mul", &[x, &t], Vec::new());
                let half = self.g.scalar("half", 0.5);
                self.g.op("Mul", &[&product, &half], Vec::new())
            }
        }
    }

    /// Logits from the first position: dense, tanh (ReLU for DistilBERT), out.
    fn head(&mut self, model: &Model, x: &str) -> Result<String> {
        let zero = self.g.i64_scalar("zero", 0);
        let first = self.g.op("Gather", &[x, &zero], vec![int("axis", 1)]);
        let h = self.linear(&first, &model.head.dense)?;
        let op = match model.head.family {
            Family::DistilBert => "Relu",
            _ => "Tanh",
        };
        let h = self.g.op(op, &[&h], Vec::new());
        self.linear(&h, &model.head.out)
    }
}

/// A row-major `[rows, cols]` matrix's codes as `[cols, rows]`.
fn transposed(codes: &[i8], rows: usize, cols: usize) -> Vec<i8> {
    let mut out = vec![0i8; codes.len()];
    for (r, row) in codes.chunks(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}
