//! Approximate attention, executed for real: per query, the kept keys are chosen (sign matching
//! on packed sign bits, or the largest true scores), and only their keys and values are gathered
//! into the softmax and the weighted sum. Padding keys are never chosen. Ties are broken towards
//! the earlier key, so the same inputs always keep the same keys.
//!
//! [`masked_reference`] computes the same thing densely (every score, then a mask that leaves
//! the kept keys): it is the reference of the tests and the differentiable path (the key choice
//! itself has no gradient).

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::attention_mode::{ApproxAttention, KeySelector};

/// Shapes of one attention call: `q` is `[batch, heads, queries, head_size]`, `k` and `v` are
/// `[batch, heads, keys, head_size]`, the mask bias `[batch, keys]` (0 for real tokens, very
/// negative for padding), all row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Sequences.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Query positions.
    pub queries: usize,
    /// Key positions.
    pub keys: usize,
    /// Head size.
    pub head_size: usize,
}

/// The operands of one attention call, as slices (see [`Dims`] for the layouts); `q` already
/// carries the `1/√d` scale.
#[derive(Debug, Clone, Copy)]
pub struct Operands<'a> {
    /// Scaled queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Additive mask, `[batch, keys]`.
    pub bias: &'a [f32],
    /// `q·kᵀ` per head, `[batch, heads, queries, keys]`, when already computed (hard top-k
    /// needs every true score anyway; a matrix product computes them fastest).
    pub scores: Option<&'a [f32]>,
    /// Shapes.
    pub dims: Dims,
}

/// A key position is real when its mask bias is not the padding value.
fn is_real(bias: f32) -> bool {
    bias > f32::MIN / 2.0
}

/// A sort key that orders f32 scores like `total_cmp` as unsigned integers.
fn ordered_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Sign bits of `rows` rows of `d` values, packed into `words_per_row(d)` words each (bit set =
/// negative; unused high bits are 0).
fn pack_signs(values: &[f32], d: usize) -> Vec<u64> {
    let words = d.div_ceil(64);
    let mut out = vec![0u64; values.len() / d * words];
    for (row, packed) in values.chunks_exact(d).zip(out.chunks_exact_mut(words)) {
        for (i, x) in row.iter().enumerate() {
            packed[i / 64] |= u64::from(x.to_bits() >> 31) << (i % 64);
        }
    }
    out
}

/// Matching signs of a query with each key: `d − popcount(q XOR k)`.
fn sign_matches(q: &[u64], keys: &[u64], d: usize, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512vpopcntdq") && is_x86_feature_detected!("avx512f") {
            // SAFETY: the features were just detected.
            return unsafe { sign_matches_vpopcnt(q, keys, d, out) };
        }
        if is_x86_feature_detected!("popcnt") {
            // SAFETY: the feature was just detected.
            return unsafe { sign_matches_popcnt(q, keys, d, out) };
        }
    }
    sign_matches_portable(q, keys, d, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq,popcnt")]
unsafe fn sign_matches_vpopcnt(q: &[u64], keys: &[u64], d: usize, out: &mut [u32]) {
    sign_matches_portable(q, keys, d, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn sign_matches_popcnt(q: &[u64], keys: &[u64], d: usize, out: &mut [u32]) {
    sign_matches_portable(q, keys, d, out)
}

/// The reference popcount scoring (compiled again above with hardware popcount enabled).
#[inline(always)]
fn sign_matches_portable(q: &[u64], keys: &[u64], d: usize, out: &mut [u32]) {
    let words = q.len();
    if words == 1 {
        let q = q[0];
        for (o, k) in out.iter_mut().zip(keys) {
            *o = d as u32 - (q ^ k).count_ones();
        }
        return;
    }
    for (o, k) in out.iter_mut().zip(keys.chunks_exact(words)) {
        let differ: u32 = q.iter().zip(k).map(|(a, b)| (a ^ b).count_ones()).sum();
        *o = d as u32 - differ;
    }
}

/// Dot product with eight independent partial sums (vectorises without reassociating a single
/// sum).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Per-head scratch space, reused across the queries of a head.
#[derive(Default)]
struct Scratch {
    ranked: Vec<u64>,
    matches: Vec<u32>,
    kept: Vec<usize>,
    weights: Vec<f32>,
}

/// One head of one sequence: its slices and the real key positions.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: &'a [f32],
    scores: Option<&'a [f32]>,
    key_signs: Option<Vec<u64>>,
    real: &'a [usize],
    d: usize,
}

impl Head<'_> {
    /// The true (scaled, masked) score of query `i` with key `j`.
    fn score(&self, i: usize, j: usize) -> f32 {
        let keys = self.bias.len();
        let s = match self.scores {
            Some(s) => s[i * keys + j],
            None => dot(
                &self.q[i * self.d..(i + 1) * self.d],
                &self.k[j * self.d..(j + 1) * self.d],
            ),
        };
        s + self.bias[j]
    }

    /// The keys query `i` keeps, ascending, into `scratch.kept`.
    fn select(&self, approx: ApproxAttention, i: usize, scratch: &mut Scratch) {
        let keep = approx.k.keys(self.real.len());
        scratch.kept.clear();
        if keep >= self.real.len() {
            scratch.kept.extend_from_slice(self.real);
            return;
        }
        scratch.ranked.clear();
        // Higher rank first; on equal rank the earlier key (larger `u32::MAX - j`).
        let tag = |rank: u32, j: usize| (u64::from(rank) << 32) | u64::from(u32::MAX - j as u32);
        match approx.method {
            KeySelector::SignMatch => {
                let d = self.d;
                let words = d.div_ceil(64);
                let signs = self.key_signs.as_deref().expect("packed for sign matching");
                let q = pack_signs(&self.q[i * d..(i + 1) * d], d);
                scratch.matches.resize(self.bias.len(), 0);
                sign_matches(&q, signs, d, &mut scratch.matches);
                debug_assert_eq!(signs.len(), self.bias.len() * words);
                let ranked = self.real.iter().map(|&j| tag(scratch.matches[j], j));
                scratch.ranked.extend(ranked);
            }
            KeySelector::HardTopk => {
                let ranked = self
                    .real
                    .iter()
                    .map(|&j| tag(ordered_bits(self.score(i, j)), j));
                scratch.ranked.extend(ranked);
            }
        }
        scratch
            .ranked
            .select_nth_unstable_by(keep - 1, |a, b| b.cmp(a));
        let kept = scratch.ranked[..keep]
            .iter()
            .map(|&t| (u32::MAX - t as u32) as usize);
        scratch.kept.extend(kept);
        scratch.kept.sort_unstable();
    }

    /// Softmax over the kept keys of query `i` and the weighted sum of their values into `out`.
    fn attend(&self, i: usize, scratch: &mut Scratch, out: &mut [f32]) {
        scratch.weights.clear();
        let scores = scratch.kept.iter().map(|&j| self.score(i, j));
        scratch.weights.extend(scores);
        let max = scratch.weights.iter().copied().fold(f32::MIN, f32::max);
        let mut sum = 0f32;
        for w in &mut scratch.weights {
            *w = (*w - max).exp();
            sum += *w;
        }
        out.fill(0.0);
        for (&j, &w) in scratch.kept.iter().zip(&scratch.weights) {
            let p = w / sum;
            for (o, x) in out.iter_mut().zip(&self.v[j * self.d..(j + 1) * self.d]) {
                *o += p * x;
            }
        }
    }
}

/// The real key positions of each sequence.
fn real_keys(bias: &[f32], dims: Dims) -> Vec<Vec<usize>> {
    bias.chunks_exact(dims.keys)
        .map(|row| (0..dims.keys).filter(|&j| is_real(row[j])).collect())
        .collect()
}

impl<'a> Head<'a> {
    /// Head `bh` (= sequence · heads + head) of `ops`; `real` holds every sequence's real keys.
    fn of(ops: &Operands<'a>, bh: usize, real: &'a [Vec<usize>], approx: ApproxAttention) -> Self {
        let Dims {
            heads,
            queries,
            keys,
            head_size: d,
            ..
        } = ops.dims;
        let b = bh / heads;
        let k = &ops.k[bh * keys * d..(bh + 1) * keys * d];
        let per_head = queries * keys;
        Head {
            q: &ops.q[bh * queries * d..(bh + 1) * queries * d],
            k,
            v: &ops.v[bh * keys * d..(bh + 1) * keys * d],
            bias: &ops.bias[b * keys..(b + 1) * keys],
            scores: ops.scores.map(|s| &s[bh * per_head..(bh + 1) * per_head]),
            key_signs: (approx.method == KeySelector::SignMatch).then(|| pack_signs(k, d)),
            real: &real[b],
            d,
        }
    }
}

/// The approximate attention context `[batch, heads, queries, head_size]`, gathered: only the
/// kept keys enter the softmax and the weighted sum. Heads run in parallel.
pub fn gathered(ops: &Operands, approx: ApproxAttention) -> Vec<f32> {
    let Dims {
        batch,
        heads,
        queries,
        head_size: d,
        ..
    } = ops.dims;
    let real = real_keys(ops.bias, ops.dims);
    let mut out = vec![0f32; batch * heads * queries * d];
    out.par_chunks_mut(queries * d)
        .enumerate()
        .for_each(|(bh, out)| {
            let head = Head::of(ops, bh, &real, approx);
            let mut scratch = Scratch::default();
            for (i, row) in out.chunks_exact_mut(d).enumerate() {
                head.select(approx, i, &mut scratch);
                head.attend(i, &mut scratch, row);
            }
        });
    out
}

/// A mask `[batch, heads, queries, keys]`: 0 where [`gathered`] keeps a key, `f32::MIN` elsewhere.
pub fn kept_mask(ops: &Operands, approx: ApproxAttention) -> Vec<f32> {
    let Dims {
        batch,
        heads,
        queries,
        keys,
        ..
    } = ops.dims;
    let real = real_keys(ops.bias, ops.dims);
    let mut out = vec![f32::MIN; batch * heads * queries * keys];
    let mut scratch = Scratch::default();
    for (bh, mask) in out.chunks_exact_mut(queries * keys).enumerate() {
        let head = Head::of(ops, bh, &real, approx);
        for (i, row) in mask.chunks_exact_mut(keys).enumerate() {
            head.select(approx, i, &mut scratch);
            for &j in &scratch.kept {
                row[j] = 0.0;
            }
        }
    }
    out
}

/// The dense reference: every score, the kept-key mask added, softmax, product with all values.
/// `q` is scaled; `mask_bias` is `[batch, 1, 1, keys]`. Differentiable in `q`, `k` and `v`.
pub fn masked_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    approx: ApproxAttention,
    differentiable: bool,
) -> Result<Tensor> {
    let (batch, heads, queries, d) = q.dims4()?;
    let keys = k.dim(2)?;
    let dims = Dims {
        batch,
        heads,
        queries,
        keys,
        head_size: d,
    };
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (qv, kv, vv, bias) = (flat(q)?, flat(k)?, flat(v)?, flat(mask_bias)?);
    let ops = Operands {
        q: &qv,
        k: &kv,
        v: &vv,
        bias: &bias,
        scores: None,
        dims,
    };
    let mask = Tensor::from_vec(
        kept_mask(&ops, approx),
        (batch, heads, queries, keys),
        &Device::Cpu,
    )?;
    let scores = q
        .matmul(&k.t()?)?
        .broadcast_add(mask_bias)?
        .broadcast_add(&mask)?;
    super::nn::softmax_last(&scores, differentiable)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention_mode::Keep;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            ((self.next() + 1.0) / 2.0 * n as f32) as usize % n
        }
    }

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        bias: Vec<f32>,
        dims: Dims,
    }

    fn case(rng: &mut Rng, dims: Dims) -> Case {
        let Dims {
            batch,
            heads,
            queries,
            keys,
            head_size: d,
        } = dims;
        let mut fill = |n: usize| (0..n).map(|_| rng.next()).collect::<Vec<f32>>();
        let q = fill(batch * heads * queries * d);
        let k = fill(batch * heads * keys * d);
        let v = fill(batch * heads * keys * d);
        let mut bias = vec![0f32; batch * keys];
        for b in 0..batch {
            let real = 1 + rng.below(keys);
            bias[b * keys + real..(b + 1) * keys].fill(f32::MIN);
        }
        Case {
            q,
            k,
            v,
            bias,
            dims,
        }
    }

    fn tensors(c: &Case) -> [Tensor; 4] {
        let Dims {
            batch,
            heads,
            queries,
            keys,
            head_size: d,
        } = c.dims;
        let dev = &Device::Cpu;
        [
            Tensor::from_vec(c.q.clone(), (batch, heads, queries, d), dev).unwrap(),
            Tensor::from_vec(c.k.clone(), (batch, heads, keys, d), dev).unwrap(),
            Tensor::from_vec(c.v.clone(), (batch, heads, keys, d), dev).unwrap(),
            Tensor::from_vec(c.bias.clone(), (batch, 1, 1, keys), dev).unwrap(),
        ]
    }

    fn ops(c: &Case) -> Operands<'_> {
        Operands {
            q: &c.q,
            k: &c.k,
            v: &c.v,
            bias: &c.bias,
            scores: None,
            dims: c.dims,
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn dense(c: &Case) -> Vec<f32> {
        let [q, k, v, m] = tensors(c);
        let s = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .broadcast_add(&m)
            .unwrap();
        let p = crate::model::nn::softmax_last(&s, false).unwrap();
        p.matmul(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    const METHODS: [KeySelector; 2] = [KeySelector::SignMatch, KeySelector::HardTopk];

    #[test]
    fn gathered_equals_masked_reference_for_random_k() {
        let mut rng = Rng(7);
        for d in [4, 32, 64, 80] {
            let dims = Dims {
                batch: 3,
                heads: 2,
                queries: 9,
                keys: 9,
                head_size: d,
            };
            let c = case(&mut rng, dims);
            let [q, k, v, m] = tensors(&c);
            for method in METHODS {
                for _ in 0..4 {
                    let keep = match rng.below(2) {
                        0 => Keep::Count(1 + rng.below(9)),
                        _ => Keep::Fraction(f64::from(0.05 + 0.9 * (rng.next() + 1.0) / 2.0)),
                    };
                    let approx = ApproxAttention { method, k: keep };
                    let g = gathered(&ops(&c), approx);
                    let r = masked_reference(&q, &k, &v, &m, approx, false).unwrap();
                    let diff = max_diff(&g, &r.flatten_all().unwrap().to_vec1().unwrap());
                    assert!(diff <= 1e-5, "{approx} d={d}: {diff}");
                }
            }
        }
    }

    #[test]
    fn all_keys_equal_dense_attention() {
        let mut rng = Rng(3);
        let dims = Dims {
            batch: 2,
            heads: 3,
            queries: 17,
            keys: 17,
            head_size: 32,
        };
        let c = case(&mut rng, dims);
        for method in METHODS {
            for k in [Keep::Count(17), Keep::Count(500), Keep::Fraction(1.0)] {
                let g = gathered(&ops(&c), ApproxAttention { method, k });
                assert!(max_diff(&g, &dense(&c)) <= 1e-6, "{method:?} {k}");
            }
        }
    }

    #[test]
    fn precomputed_scores_give_the_same_result() {
        let mut rng = Rng(11);
        let dims = Dims {
            batch: 2,
            heads: 2,
            queries: 1,
            keys: 12,
            head_size: 16,
        };
        let c = case(&mut rng, dims);
        let [q, k, ..] = tensors(&c);
        let s: Vec<f32> = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let approx = ApproxAttention {
            method: KeySelector::HardTopk,
            k: Keep::Count(3),
        };
        let with = Operands {
            scores: Some(&s),
            ..ops(&c)
        };
        assert!(max_diff(&gathered(&with, approx), &gathered(&ops(&c), approx)) <= 1e-6);
    }

    #[test]
    fn padding_is_never_kept_and_ties_keep_the_earlier_key() {
        // Keys 0 and 2 match the query's signs equally; key 1 less; key 3 is padding.
        let c = Case {
            q: vec![1.0, -1.0],
            k: vec![2.0, -3.0, -1.0, -1.0, 5.0, -0.5, 1.0, -1.0],
            v: vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 9.0, 9.0],
            bias: vec![0.0, 0.0, 0.0, f32::MIN],
            dims: Dims {
                batch: 1,
                heads: 1,
                queries: 1,
                keys: 4,
                head_size: 2,
            },
        };
        let sign = ApproxAttention {
            method: KeySelector::SignMatch,
            k: Keep::Count(1),
        };
        assert_eq!(gathered(&ops(&c), sign), vec![1.0, 0.0]);
        let mask = kept_mask(
            &ops(&c),
            ApproxAttention {
                k: Keep::Count(9),
                ..sign
            },
        );
        assert_eq!(mask[3], f32::MIN);
        // Hard top-1: scores 5, 0, 5.5 → key 2.
        let hard = ApproxAttention {
            method: KeySelector::HardTopk,
            k: Keep::Count(1),
        };
        assert_eq!(gathered(&ops(&c), hard), vec![0.5, 0.5]);
    }

    #[test]
    fn popcount_paths_agree_with_a_plain_count() {
        let mut rng = Rng(5);
        for d in [7, 32, 64, 100] {
            let vals: Vec<f32> = (0..d * 6).map(|_| rng.next()).collect();
            let signs = pack_signs(&vals, d);
            let words = d.div_ceil(64);
            let mut fast = vec![0u32; 5];
            sign_matches(&signs[..words], &signs[words..], d, &mut fast);
            let mut portable = vec![0u32; 5];
            sign_matches_portable(&signs[..words], &signs[words..], d, &mut portable);
            let plain: Vec<u32> = (1..6)
                .map(|j| {
                    (0..d)
                        .filter(|&i| (vals[i] < 0.0) == (vals[j * d + i] < 0.0))
                        .count() as u32
                })
                .collect();
            assert_eq!(fast, plain, "d={d}");
            assert_eq!(portable, plain, "d={d}");
        }
    }
}
