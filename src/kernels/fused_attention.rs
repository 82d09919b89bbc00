//! Dense softmax attention for the inference path in one kernel.
//!
//! It reads queries, keys and values in place from the fused projection's output, skips padding
//! keys, folds the `1/√d` scale into the score, and writes each query's context straight into the
//! `[batch, queries, heads · head_size]` layout the output projection reads. The candle path it
//! replaces made three transposing copies, a scaling pass, two batched products, a mask add, a
//! softmax whose libm `expf` took its slow underflow path on every padding key, and a transposing
//! copy before the output projection.
//!
//! Padding keys (mask bias `f32::MIN`, the same test as approximate attention's) get exactly zero
//! weight in the reference too (`e^(f32::MIN)` is 0 in f32), so skipping them changes nothing;
//! any other bias is added. Every sequence has a real first token, so no row is all padding.

use super::spin_pool;
use candle_core::{Device, Result, Tensor};

use super::fastmath::exp_nonpositive;
use super::sparse_attention::{f32_slice, real_keys};

/// Where one head's vectors sit inside rows of a projection output.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// The projection output, `[batch, positions, width]`, row-major.
    pub data: &'a [f32],
    /// Positions per batch entry.
    pub positions: usize,
    /// Floats per position (`width`).
    pub width: usize,
    /// Offset of head 0's vector within a row; head `h` starts at `offset + h · head_size`.
    pub offset: usize,
}

impl Rows<'_> {
    fn vector(&self, batch: usize, position: usize, head: usize, head_size: usize) -> &[f32] {
        let start =
            (batch * self.positions + position) * self.width + self.offset + head * head_size;
        &self.data[start..start + head_size]
    }
}

/// The operands of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Operands<'a> {
    /// Queries (`positions` = number of queries).
    pub q: Rows<'a>,
    /// Keys.
    pub k: Rows<'a>,
    /// Values.
    pub v: Rows<'a>,
    /// Additive mask bias per key, `[batch, keys]`.
    pub bias: &'a [f32],
    /// Number of heads.
    pub heads: usize,
    /// Size of each head.
    pub head_size: usize,
}

/// Query rows per parallel task: enough work per task that the hand-off to another thread is noise.
const ROWS_PER_TASK: usize = 8;

/// The context `[batch · queries, heads · head_size]`, row-major.
pub fn context(ops: &Operands) -> Vec<f32> {
    let width = ops.heads * ops.head_size;
    let batch = ops.bias.len() / ops.k.positions.max(1);
    let queries = ops.q.positions;
    let kept = real_keys(ops.bias, ops.k.positions);
    let threads = crate::threads::count();
    let keys = spin_pool::map(batch, threads, |b| transposed_keys(ops, &kept[b], b));
    let mut out = vec![0f32; batch * queries * width];
    let task = ROWS_PER_TASK * width;
    spin_pool::for_each_chunk_mut(&mut out, task, threads, |t, rows| {
        let mut scores = Vec::new();
        for (r, ctx) in rows.chunks_exact_mut(width).enumerate() {
            let row = t * ROWS_PER_TASK + r;
            let (b, i) = (row / queries, row % queries);
            let keys = Keys {
                kept: &kept[b],
                transposed: &keys[b],
            };
            attend(ops, &keys, b, i, ctx, &mut scores);
        }
    });
    out
}

/// One sequence's real keys: their positions, and their vectors transposed per head, so that a
/// query's scores against every key are computed a vector of keys at a time.
struct Keys<'a> {
    /// Positions of the real keys.
    kept: &'a [usize],
    /// `[heads, head_size, stride]`: component `c` of head `h` of the `n`-th real key at
    /// `(h · head_size + c) · stride + n`, where `stride` is `kept.len()` rounded up to whole
    /// [`LANES`] (zeros after the real keys).
    transposed: &'a [f32],
}

/// `keys` rounded up to whole [`LANES`].
fn padded(keys: usize) -> usize {
    keys.div_ceil(LANES) * LANES
}

/// The real keys of sequence `b`, transposed (see [`Keys::transposed`]).
fn transposed_keys(ops: &Operands, kept: &[usize], b: usize) -> Vec<f32> {
    let (d, n) = (ops.head_size, padded(kept.len()));
    let mut out = vec![0f32; ops.heads * d * n];
    for (idx, &j) in kept.iter().enumerate() {
        for h in 0..ops.heads {
            for (c, &v) in ops.k.vector(b, j, h, d).iter().enumerate() {
                out[(h * d + c) * n + idx] = v;
            }
        }
    }
    out
}

/// Every head's context for query `i` of batch entry `b`, written into `ctx` (`heads · d`).
fn attend(ops: &Operands, keys: &Keys, b: usize, i: usize, ctx: &mut [f32], scores: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { attend_avx512(ops, keys, b, i, ctx, scores) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { attend_avx2(ops, keys, b, i, ctx, scores) };
    }
    attend_portable(ops, keys, b, i, ctx, scores)
}

/// [`attend_portable`] compiled for AVX2 + FMA, so its loops run eight lanes at a time.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    ops: &Operands,
    keys: &Keys,
    b: usize,
    i: usize,
    ctx: &mut [f32],
    scores: &mut Vec<f32>,
) {
    attend_portable(ops, keys, b, i, ctx, scores)
}

/// [`attend_portable`] compiled for AVX-512, sixteen lanes at a time.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(
    ops: &Operands,
    keys: &Keys,
    b: usize,
    i: usize,
    ctx: &mut [f32],
    scores: &mut Vec<f32>,
) {
    attend_portable(ops, keys, b, i, ctx, scores)
}

#[inline(always)]
fn attend_portable(
    ops: &Operands,
    keys: &Keys,
    b: usize,
    i: usize,
    ctx: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let d = ops.head_size;
    let scale = 1.0 / (d as f32).sqrt();
    let bias = &ops.bias[b * ops.k.positions..(b + 1) * ops.k.positions];
    let kept = keys.kept;
    let n = kept.len();
    for (h, out) in ctx.chunks_exact_mut(d).enumerate() {
        let q = ops.q.vector(b, i, h, d);
        // Plain loops: iterator adapters would be compiled apart from this function, without
        // its AVX2 features.
        let stride = padded(n);
        scores.clear();
        scores.resize(stride, 0.0);
        let head = &keys.transposed[h * d * stride..(h + 1) * d * stride];
        scores_into(q, head, scores);
        scores.truncate(n);
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut blocks = scores.chunks_exact_mut(LANES);
        let mut positions = kept.chunks_exact(LANES);
        for (s, j) in (&mut blocks).zip(&mut positions) {
            for l in 0..LANES {
                s[l] = s[l] * scale + bias[j[l]];
                lanes[l] = lanes[l].max(s[l]);
            }
        }
        for (s, &j) in blocks
            .into_remainder()
            .iter_mut()
            .zip(positions.remainder())
        {
            *s = *s * scale + bias[j];
            lanes[0] = lanes[0].max(*s);
        }
        // `max` is exact, so the order of the lanes changes nothing.
        let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for s in scores.iter_mut() {
            *s = exp_nonpositive(*s - max);
        }
        let total = sum(scores);
        weighted_values(ops, (b, h), kept, scores, out);
        let inv = 1.0 / total;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

/// Each key's score `q · k` into `scores`, from the keys' components `head` (`[d, keys]`, keys
/// a multiple of [`LANES`]): each a sum in component order, up to four blocks of [`LANES`] keys
/// at a time with their sums in registers (independent sums, so the additions overlap).
#[inline(always)]
fn scores_into(q: &[f32], head: &[f32], scores: &mut [f32]) {
    let n = scores.len();
    debug_assert_eq!(n % LANES, 0);
    let mut start = 0;
    while start < n {
        match (n - start) / LANES {
            1 => score_blocks::<1>(q, head, scores, start),
            2 => score_blocks::<2>(q, head, scores, start),
            3 => score_blocks::<3>(q, head, scores, start),
            _ => score_blocks::<4>(q, head, scores, start),
        }
        start += 4 * LANES;
    }
}

/// [`scores_into`] for the `B` blocks of keys from `start`.
#[inline(always)]
fn score_blocks<const B: usize>(q: &[f32], head: &[f32], scores: &mut [f32], start: usize) {
    let n = scores.len();
    let mut acc = [[0f32; LANES]; B];
    for (&qc, component) in q.iter().zip(head.chunks_exact(n)) {
        for (blk, acc) in acc.iter_mut().enumerate() {
            let k = &component[start + blk * LANES..start + (blk + 1) * LANES];
            for l in 0..LANES {
                acc[l] += qc * k[l];
            }
        }
    }
    for (blk, acc) in acc.iter().enumerate() {
        scores[start + blk * LANES..start + (blk + 1) * LANES].copy_from_slice(acc);
    }
}

/// `out = Σ_keys p · v` for head `h` of sequence `b`: each output a sum in key order. A head of
/// 16, 32, 48 or 64 keeps all its sums in registers; other sizes go [`LANES`] outputs at a time.
#[inline(always)]
fn weighted_values(
    ops: &Operands,
    (b, h): (usize, usize),
    kept: &[usize],
    weights: &[f32],
    out: &mut [f32],
) {
    let d = out.len();
    let head = |j: usize| ops.v.vector(b, j, h, d);
    match d {
        16 => value_blocks::<1>(head, kept, weights, out, 0),
        32 => value_blocks::<2>(head, kept, weights, out, 0),
        48 => value_blocks::<3>(head, kept, weights, out, 0),
        64 => value_blocks::<4>(head, kept, weights, out, 0),
        _ => {
            let full = d / LANES * LANES;
            for start in (0..full).step_by(LANES) {
                value_blocks::<1>(head, kept, weights, out, start);
            }
            out[full..].fill(0.0);
            for (&p, &j) in weights.iter().zip(kept) {
                for (o, &v) in out[full..].iter_mut().zip(&head(j)[full..]) {
                    *o += p * v;
                }
            }
        }
    }
}

/// [`weighted_values`] for the `B` blocks of outputs from `start`.
#[inline(always)]
fn value_blocks<'a, const B: usize>(
    head: impl Fn(usize) -> &'a [f32],
    kept: &[usize],
    weights: &[f32],
    out: &mut [f32],
    start: usize,
) {
    let mut acc = [[0f32; LANES]; B];
    for (&p, &j) in weights.iter().zip(kept) {
        let v = &head(j)[start..start + B * LANES];
        for (blk, acc) in acc.iter_mut().enumerate() {
            for l in 0..LANES {
                acc[l] += p * v[blk * LANES + l];
            }
        }
    }
    for (blk, acc) in acc.iter().enumerate() {
        out[start + blk * LANES..start + (blk + 1) * LANES].copy_from_slice(acc);
    }
}

/// Independent partial sums in [`dot`] and [`sum`]: one 512-bit vector.
const LANES: usize = 16;

/// `Σ a_i · b_i` over independent lanes, so that it vectorises without reassociating one sum.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a8, b8) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a_i` over independent lanes.
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for x in chunks {
        for l in 0..LANES {
            lanes[l] += x[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Dense attention context `[batch, queries, heads · head_size]` from the projection outputs:
/// `q` `[batch, queries, ≥ heads · d]` with head 0 at `q_offset`, and `kv` `[batch, keys, ·]`
/// with keys at `k_offset` and values at `v_offset`. `mask_bias` is `[batch, 1, 1, keys]`.
pub fn dense_context(
    q: &Tensor,
    q_offset: usize,
    kv: &Tensor,
    (k_offset, v_offset): (usize, usize),
    mask_bias: &Tensor,
    (heads, head_size): (usize, usize),
) -> Result<Tensor> {
    let (batch, queries, q_width) = q.dims3()?;
    let (_, keys, kv_width) = kv.dims3()?;
    let (q, kv, bias) = (q.contiguous()?, kv.contiguous()?, mask_bias.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (kvs, kvl) = kv.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let rows = |data, positions, width, offset| Rows {
        data,
        positions,
        width,
        offset,
    };
    let kv_data = f32_slice(&kvs, kvl)?;
    let ops = Operands {
        q: rows(f32_slice(&qs, ql)?, queries, q_width, q_offset),
        k: rows(kv_data, keys, kv_width, k_offset),
        v: rows(kv_data, keys, kv_width, v_offset),
        bias: f32_slice(&bs, bl)?,
        heads,
        head_size,
    };
    let out = context(&ops);
    Tensor::from_vec(out, (batch, queries, heads * head_size), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff as max_diff;
    use candle_core::D;

    /// The candle path the kernel replaces: split heads, scale, scores + mask, softmax, values.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, n: usize, d: usize) -> Tensor {
        let heads = |t: &Tensor| {
            let (b, t_len, _) = t.dims3().unwrap();
            t.reshape((b, t_len, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v) = (heads(q), heads(k), heads(v));
        let q = (q * (1.0 / (d as f64).sqrt())).unwrap();
        let scores = q
            .contiguous()
            .unwrap()
            .matmul(&k.contiguous().unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(bias)
            .unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let ctx = probs.matmul(&v.contiguous().unwrap()).unwrap();
        let (b, _, tq, _) = ctx.dims4().unwrap();
        ctx.transpose(1, 2)
            .unwrap()
            .reshape((b, tq, n * d))
            .unwrap()
    }

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let count = shape.0 * shape.1 * shape.2;
        let values: Vec<f32> = (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_kernel_equals_the_candle_path_with_padding_and_first_query_only() {
        for (n, d, seed) in [(2, 4, 1), (3, 13, 2), (12, 32, 3), (4, 64, 4)] {
            let (b, t) = (3, 19);
            let qkv = (random((b, t, 3 * n * d), seed) * 3.0).unwrap();
            // Row 0 full, row 1 padded after 7 tokens, row 2 padded after 1; one extra bias.
            let mut bias = vec![0f32; b * t];
            bias[t + 7..2 * t].fill(f32::MIN);
            bias[2 * t + 1..].fill(f32::MIN);
            bias[3] = -2.5;
            let bias = Tensor::from_vec(bias, (b, 1, 1, t), &Device::Cpu).unwrap();
            let part = |i: usize| qkv.narrow(2, i * n * d, n * d).unwrap();
            let expected = reference(&part(0), &part(1), &part(2), &bias, n, d);
            let got = dense_context(&qkv, 0, &qkv, (n * d, 2 * n * d), &bias, (n, d)).unwrap();
            assert!(max_diff(&got, &expected) < 1e-5, "n={n} d={d}");
            // First query only, from separate q and kv tensors.
            let q = part(0).narrow(1, 0, 1).unwrap();
            let kv = qkv.narrow(2, n * d, 2 * n * d).unwrap();
            let first = dense_context(&q, 0, &kv, (0, n * d), &bias, (n, d)).unwrap();
            let expected_first = expected.narrow(1, 0, 1).unwrap();
            assert!(
                max_diff(&first, &expected_first) < 1e-5,
                "first only, n={n} d={d}"
            );
        }
    }
}
