//! Approximate attention, executed for real: per query, the kept keys are chosen (sign matching
//! on packed sign bits, or the largest true scores), and only their keys and values are gathered
//! into the softmax and the weighted sum. Padding keys are never chosen. Ties are broken towards
//! the earlier key, so the same inputs always keep the same keys.
//!
//! [`masked_reference`] computes the same thing densely (every score, then a mask that leaves
//! the kept keys): it is the reference of the tests and the differentiable path (the key choice
//! itself has no gradient).

use candle_core::{Device, Layout, Result, Storage, Tensor};

use super::attention_mode::{ApproxAttention, KeySelector};
use super::fused_attention::dot;
use super::Ops;

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

/// Up to this many kept keys, hard top-k keeps a sorted buffer instead of a selection.
const SMALL_K: usize = 8;

/// The `keep` real keys with the most matching signs (earlier key first on a tie), ascending,
/// into `kept`: a counting pass over the possible counts, then one scan.
fn top_by_count(
    matches: &[u32],
    real: &[usize],
    keep: usize,
    histogram: &mut Vec<usize>,
    kept: &mut Vec<usize>,
) {
    let d = real.iter().map(|&j| matches[j] as usize).max().unwrap_or(0);
    histogram.clear();
    histogram.resize(d + 1, 0);
    for &j in real {
        histogram[matches[j] as usize] += 1;
    }
    // The threshold count: fewer than `keep` keys match more, at least `keep` match as many.
    let (mut above, mut threshold) = (0, d);
    while above + histogram[threshold] < keep {
        above += histogram[threshold];
        threshold -= 1;
    }
    let mut at_threshold = keep - above;
    for &j in real {
        let m = matches[j] as usize;
        if m > threshold || (m == threshold && at_threshold > 0) {
            at_threshold -= usize::from(m == threshold);
            kept.push(j);
        }
    }
}

/// The `keep` highest `(rank, key)` pairs (earlier key first on equal rank), keys ascending,
/// into `scratch.kept`, through a sorted buffer of `keep` entries (few replacements happen).
fn top_few(ranks: impl Iterator<Item = (u32, usize)>, keep: usize, scratch: &mut Scratch) {
    let buffer = &mut scratch.buffer;
    buffer.clear();
    for (rank, j) in ranks {
        if buffer.len() == keep {
            if rank <= buffer[keep - 1].0 {
                continue;
            }
            buffer.pop();
        }
        // After every entry of equal rank: those came from earlier keys.
        let at = buffer.partition_point(|&(r, _)| r >= rank);
        buffer.insert(at, (rank, j));
    }
    scratch.kept.extend(buffer.iter().map(|&(_, j)| j));
    scratch.kept.sort_unstable();
}

/// [`top_few`] for many kept keys: one selection over packed `(rank, key)` tags.
fn top_by_selection(ranks: impl Iterator<Item = (u32, usize)>, keep: usize, scratch: &mut Scratch) {
    // Higher rank first; on equal rank the earlier key (larger `u32::MAX - j`).
    let tag = |(rank, j): (u32, usize)| (u64::from(rank) << 32) | u64::from(u32::MAX - j as u32);
    scratch.ranked.clear();
    scratch.ranked.extend(ranks.map(tag));
    scratch
        .ranked
        .select_nth_unstable_by(keep - 1, |a, b| b.cmp(a));
    let kept = scratch.ranked[..keep]
        .iter()
        .map(|&t| (u32::MAX - t as u32) as usize);
    scratch.kept.extend(kept);
    scratch.kept.sort_unstable();
}

/// Per-head scratch space, reused across the queries of a head.
#[derive(Default)]
struct Scratch {
    ranked: Vec<u64>,
    buffer: Vec<(u32, usize)>,
    histogram: Vec<usize>,
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
    /// Packed sign bits of the keys and of the queries (sign matching only).
    signs: Option<(Vec<u64>, Vec<u64>)>,
    real: &'a [usize],
    d: usize,
}

impl Head<'_> {
    /// The true (scaled, masked) score of query `i` with key `j`.
    #[inline(always)]
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
        match approx.method {
            KeySelector::SignMatch => {
                let words = self.d.div_ceil(64);
                let (keys, queries) = self.signs.as_ref().expect("packed for sign matching");
                scratch.matches.resize(self.bias.len(), 0);
                let q = &queries[i * words..(i + 1) * words];
                sign_matches(q, keys, self.d, &mut scratch.matches);
                let (matches, kept) = (&scratch.matches, &mut scratch.kept);
                top_by_count(matches, self.real, keep, &mut scratch.histogram, kept);
            }
            KeySelector::HardTopk if keep <= SMALL_K => {
                let ranks = self
                    .real
                    .iter()
                    .map(|&j| (ordered_bits(self.score(i, j)), j));
                top_few(ranks, keep, scratch);
            }
            KeySelector::HardTopk => {
                let ranks = self
                    .real
                    .iter()
                    .map(|&j| (ordered_bits(self.score(i, j)), j));
                top_by_selection(ranks, keep, scratch);
            }
        }
    }

    /// Softmax over the kept keys of query `i` and the weighted sum of their values into `out`.
    #[inline(always)]
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

/// The real key positions of each sequence, from the mask bias `[sequences, keys]`.
pub(crate) fn real_keys(bias: &[f32], keys: usize) -> Vec<Vec<usize>> {
    bias.chunks_exact(keys.max(1))
        .map(|row| (0..row.len()).filter(|&j| is_real(row[j])).collect())
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
        let q = &ops.q[bh * queries * d..(bh + 1) * queries * d];
        let per_head = queries * keys;
        Head {
            q,
            k,
            v: &ops.v[bh * keys * d..(bh + 1) * keys * d],
            bias: &ops.bias[b * keys..(b + 1) * keys],
            scores: ops.scores.map(|s| &s[bh * per_head..(bh + 1) * per_head]),
            signs: (approx.method == KeySelector::SignMatch)
                .then(|| (pack_signs(k, d), pack_signs(q, d))),
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
    let real = real_keys(ops.bias, ops.dims.keys);
    let mut out = vec![0f32; batch * heads * queries * d];
    let threads = crate::threads::count();
    super::spin_pool::for_each_chunk_mut(&mut out, queries * d, threads, |bh, out| {
        run_head(&Head::of(ops, bh, &real, approx), approx, out)
    });
    out
}

/// Every query of one head, into its rows of `out`; with AVX2 where the CPU has it.
fn run_head(head: &Head, approx: ApproxAttention, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { run_head_avx2(head, approx, out) };
        }
    }
    run_head_portable(head, approx, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_head_avx2(head: &Head, approx: ApproxAttention, out: &mut [f32]) {
    run_head_portable(head, approx, out)
}

#[inline(always)]
fn run_head_portable(head: &Head, approx: ApproxAttention, out: &mut [f32]) {
    let mut scratch = Scratch::default();
    for (i, row) in out.chunks_exact_mut(head.d).enumerate() {
        head.select(approx, i, &mut scratch);
        head.attend(i, &mut scratch, row);
    }
}

/// The approximate attention context `[batch, heads, queries, head_size]` of scaled `q`, `k`, `v`
/// and `mask_bias` `[batch, 1, 1, keys]`, through [`gathered`]. Hard top-k takes its true
/// scores from one matrix product (it needs all of them; the product is the fastest way).
pub fn context(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    approx: ApproxAttention,
) -> Result<Tensor> {
    let (batch, heads, queries, head_size) = q.dims4()?;
    let keys = k.dim(2)?;
    let scores = match approx.method {
        KeySelector::HardTopk => Some(q.matmul(&k.t()?)?),
        KeySelector::SignMatch => None,
    };
    // Read the operands in place (no copies).
    let contiguous = |t: &Tensor| t.contiguous();
    let (q, k, v, bias) = (
        contiguous(q)?,
        contiguous(k)?,
        contiguous(v)?,
        contiguous(mask_bias)?,
    );
    let guards = [&q, &k, &v, &bias].map(|t| t.storage_and_layout());
    let score_guard = scores.as_ref().map(|s| s.storage_and_layout());
    let [q, k, v, bias] = [0, 1, 2, 3].map(|i| f32_slice(&guards[i].0, guards[i].1));
    let scores = score_guard
        .as_ref()
        .map(|(s, l)| f32_slice(s, l))
        .transpose()?;
    let dims = Dims {
        batch,
        heads,
        queries,
        keys,
        head_size,
    };
    let ops = Operands {
        q: q?,
        k: k?,
        v: v?,
        bias: bias?,
        scores,
        dims,
    };
    let out = gathered(&ops, approx);
    Tensor::from_vec(out, (batch, heads, queries, head_size), &Device::Cpu)
}

/// The f32 elements of a contiguous CPU tensor's storage.
pub(crate) fn f32_slice<'s>(storage: &'s Storage, layout: &Layout) -> Result<&'s [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("approximate attention runs on the CPU");
    };
    super::fastmath::contiguous_f32(cpu, layout, "approximate attention")
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
    let real = real_keys(ops.bias, ops.dims.keys);
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
    ops: Ops,
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
    let operands = Operands {
        q: &qv,
        k: &kv,
        v: &vv,
        bias: &bias,
        scores: None,
        dims,
    };
    let mask = Tensor::from_vec(
        kept_mask(&operands, approx),
        (batch, heads, queries, keys),
        &Device::Cpu,
    )?;
    let scores = q
        .matmul(&k.t()?)?
        .broadcast_add(mask_bias)?
        .broadcast_add(&mask)?;
    super::softmax::softmax_last(&scores, ops)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention_mode::Keep;

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
        let p = crate::kernels::softmax::softmax_last(&s, Ops::Inference).unwrap();
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
                    let r = masked_reference(&q, &k, &v, &m, approx, Ops::Inference).unwrap();
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

    #[test]
    fn fast_selections_keep_the_top_keys_with_earlier_keys_winning_ties() {
        let mut rng = Rng(13);
        for _ in 0..200 {
            let n = 1 + rng.below(80);
            let real: Vec<usize> = (0..n + 5).filter(|_| rng.below(4) > 0).collect();
            if real.is_empty() {
                continue;
            }
            // Few distinct ranks, so ties are common.
            let ranks: Vec<u32> = (0..n + 5).map(|_| rng.below(6) as u32).collect();
            let keep = 1 + rng.below(real.len());
            let mut naive = real.clone();
            naive.sort_by_key(|&j| (std::cmp::Reverse(ranks[j]), j));
            naive.truncate(keep);
            naive.sort_unstable();
            let pairs = || real.iter().map(|&j| (ranks[j], j));
            let mut scratch = Scratch::default();
            top_few(pairs(), keep, &mut scratch);
            assert_eq!(scratch.kept, naive, "top_few");
            scratch.kept.clear();
            top_by_selection(pairs(), keep, &mut scratch);
            assert_eq!(scratch.kept, naive, "top_by_selection");
            let mut kept = Vec::new();
            top_by_count(&ranks, &real, keep, &mut scratch.histogram, &mut kept);
            assert_eq!(kept, naive, "top_by_count");
        }
    }
}
