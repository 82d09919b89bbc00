//! What the quantized kernels (`int8_gemm`, `int4_gemm`) share: the instruction set they run,
//! the activations quantized row by row at run time, and the split of one product over the kernel
//! pool ([`super::spin_pool`]).
//!
//! Each row of `x` is quantized to **7-bit asymmetric unsigned** codes
//! `u = clamp(round(x / s) + zp, 0, 127)` with `s = (hi - lo) / 127`, `lo = min(0, min x)`,
//! `hi = max(0, max x)`, `zp = round(-lo / s)` (the scalar and the AVX2 path give the same codes;
//! see `int8_gemm` for why 7 bits).

use std::mem::MaybeUninit;
use std::ops::Range;

/// Output rows (rows of `W`) per packed panel.
pub(super) const NR: usize = 16;
/// Activation rows per micro-tile.
pub(super) const MR: usize = 4;
/// `k` values per 4-byte group (one `vpbroadcastd`).
pub(super) const KU: usize = 4;
/// Below this many multiply-adds (`m·n·k`) a single thread is used. (Set when a hand-off woke a
/// sleeping rayon worker, ~8–10 µs; with the spinning kernel pool, 2^18 measured the same at b1.)
const PAR_MIN_WORK: usize = 1 << 21;
/// Split over rows of `x` when every thread gets at least this many rows (each
/// thread then reads all weights, ≤ 0.6 MB for MiniLM, from its own L2); below it,
/// split over weight panels (each thread quantizes all rows, which is cheap).
const SPLIT_ROWS_MIN: usize = 32;

/// Instruction set used by the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// Portable scalar code.
    Scalar,
    /// AVX2 intrinsics (`vpmaddubsw`, `vpmaddwd`).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 VNNI: one `vpdpbusd` (four u8 × i8 products summed into each i32 lane, nothing
    /// saturates) replaces the AVX2 path's three instructions, and one 512-bit vector covers a
    /// whole 16-row panel. The i32 sums are the same.
    #[cfg(target_arch = "x86_64")]
    Vnni512,
}

impl Isa {
    /// The fastest instruction set this CPU runs.
    pub(super) fn detect() -> Isa {
        *Isa::available()
            .last()
            .expect("the scalar path is always available")
    }

    /// Every instruction set this CPU runs, from the plainest to the fastest.
    pub(super) fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            isas.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                isas.push(Isa::Vnni512);
            }
        }
        isas
    }
}

/// Raw output pointer shared by the jobs of one call; the jobs write disjoint
/// elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: the pointer is only used inside one kernel call, while `out` is mutably
// borrowed, and concurrent jobs write pairwise disjoint (row, column) ranges.
unsafe impl Send for OutPtr {}
// SAFETY: as above; sharing the pointer value itself is harmless.
unsafe impl Sync for OutPtr {}

/// The size of a packed weight matrix `W`: `rows` outputs (`n`), `cols` inputs (`k`), in `panels`
/// panels of [`NR`] rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Number of weight rows `n` (output features).
    pub rows: usize,
    /// Number of weight columns `k` (input features).
    pub cols: usize,
    /// `rows.div_ceil(NR)`.
    pub panels: usize,
}

/// One job's share of a product: some rows of `x` against some weight panels, with the bias
/// padded to whole panels and the output. Only [`matmul_t`] builds them.
pub struct Job<'a> {
    pub(super) x: &'a [f32],
    pub(super) rows: Range<usize>,
    pub(super) panels: Range<usize>,
    pub(super) bias: Option<&'a [f32]>,
    pub(super) out: OutPtr,
    pub(super) isa: Isa,
}

/// Weights packed once for one of the quantized kernels (`int8_gemm`, `int4_gemm`).
pub trait PackedWeights: Sync {
    /// The matrix's size and panels.
    fn dims(&self) -> Dims;
    /// Multiplies the job's rows of `x`, quantized, with its panels, writing its part of the
    /// output.
    fn run_job(&self, job: Job);
}

/// Computes `out[m, n] = quantize_rows(x[m, k]) · Wᵀ (+ bias)`, dequantized to f32, in the kernel
/// `w` was packed for. Each row of `x` is quantized on the fly (module docs); the result is
/// deterministic and independent of `threads` (up to that many threads of the kernel pool, split
/// over rows of `x` or over weight panels; `threads <= 1` runs on the calling thread).
///
/// # Panics
/// If `x` does not hold `m · k` values, `out` `m · n`, or the bias `n`.
pub fn matmul_t(
    x: &[f32],
    m: usize,
    w: &impl PackedWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
    threads: usize,
) {
    matmul_t_with(x, m, w, bias, out, threads, Isa::detect());
}

/// [`matmul_t`] into a new vector, which the kernel writes once (no zero fill first).
pub fn matmul_t_new(
    x: &[f32],
    m: usize,
    w: &impl PackedWeights,
    bias: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let len = m * w.dims().rows;
    // SAFETY: `write_product` writes every one of the `m · n` outputs.
    unsafe {
        new_output(len, |out| {
            write_product(x, m, w, bias, out, threads, Isa::detect())
        })
    }
}

/// [`matmul_t`] on the instruction set `isa`.
pub(super) fn matmul_t_with(
    x: &[f32],
    m: usize,
    w: &impl PackedWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
    threads: usize,
    isa: Isa,
) {
    write_product(x, m, w, bias, as_uninit(out), threads, isa);
}

/// A new vector of `len` values, each stored once by `write` (no zero fill first).
///
/// # Safety
/// `write` must store every one of the `len` elements it is given.
pub(super) unsafe fn new_output(
    len: usize,
    write: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    write(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `write` stored all `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// `out` seen as memory to write: only initialised `f32` values are written through it.
pub(super) fn as_uninit(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the kernels only store f32 values.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Writes every one of the `m · n` outputs of the product into `out` (each by exactly one job).
fn write_product(
    x: &[f32],
    m: usize,
    w: &impl PackedWeights,
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
    threads: usize,
    isa: Isa,
) {
    let Dims {
        rows: n,
        cols: k,
        panels,
    } = w.dims();
    assert_eq!(x.len(), m * k, "x must hold m * k values");
    assert_eq!(out.len(), m * n, "out must hold m * n values");
    if m == 0 || n == 0 {
        return;
    }
    let padded = bias.map(|b| padded_bias(b, n, panels));
    let bias = padded.as_deref();
    let out = OutPtr(out.as_mut_ptr().cast());
    split_jobs((m, n, k), panels, threads, |rows, panels| {
        w.run_job(Job {
            x,
            rows,
            panels,
            bias,
            out,
            isa,
        })
    });
}

/// `bias` (one per output of `n`) zero-padded to `panels` whole panels of [`NR`], so that a tile
/// may read a whole panel's worth.
///
/// # Panics
/// If `bias` does not hold `n` values.
pub(super) fn padded_bias(bias: &[f32], n: usize, panels: usize) -> Vec<f32> {
    assert_eq!(bias.len(), n, "one bias per output");
    let mut padded = vec![0f32; panels * NR];
    padded[..n].copy_from_slice(bias);
    padded
}

/// Runs `job(rows of x, weight panels)` over the kernel pool for an `m × n × k` product whose
/// weights are cut into `panels` panels: one job on the calling thread when the product is small,
/// else one job per thread, over rows of `x` (in whole tiles of `MR`) when each thread gets
/// enough of them, or over panels. Every output element is computed by one job, with the same
/// operations whatever the split.
pub(super) fn split_jobs(
    (m, n, k): (usize, usize, usize),
    panels: usize,
    threads: usize,
    job: impl Fn(Range<usize>, Range<usize>) + Sync,
) {
    let threads = if m.saturating_mul(n).saturating_mul(k) < PAR_MIN_WORK {
        1
    } else {
        threads.max(1)
    };
    if threads == 1 {
        job(0..m, 0..panels);
        return;
    }
    let mut jobs: Vec<(Range<usize>, Range<usize>)> = Vec::with_capacity(threads);
    if m >= SPLIT_ROWS_MIN * threads {
        let blocks = m.div_ceil(MR);
        for t in 0..threads {
            let (b0, b1) = (blocks * t / threads, blocks * (t + 1) / threads);
            jobs.push(((b0 * MR).min(m)..(b1 * MR).min(m), 0..panels));
        }
    } else {
        let parts = threads.min(panels);
        for t in 0..parts {
            jobs.push((0..m, panels * t / parts..panels * (t + 1) / parts));
        }
    }
    jobs.retain(|(r, p)| !r.is_empty() && !p.is_empty());
    super::spin_pool::run(jobs.len(), threads, &|i| {
        let (rows, panels) = jobs[i].clone();
        job(rows, panels)
    });
}

/// Quantizes up to `MR` rows of `x` (`k` values each, starting at row `r0`) into `abuf`, rows
/// `lda` bytes apart, and returns each row's `(s, zp)`.
pub(super) fn quantize_block(
    x: &[f32],
    k: usize,
    (r0, rows): (usize, usize),
    abuf: &mut [u8],
    lda: usize,
    isa: Isa,
) -> ([f32; MR], [i32; MR]) {
    let mut s = [0f32; MR];
    let mut zp = [0i32; MR];
    for rr in 0..rows {
        let src = &x[(r0 + rr) * k..(r0 + rr + 1) * k];
        let dst = &mut abuf[rr * lda..rr * lda + k];
        (s[rr], zp[rr]) = quantize_row(src, dst, isa);
    }
    (s, zp)
}

/// Calls the instance of a tile kernel for `rows` (1..=MR) activation rows.
macro_rules! with_rows {
    ($rows:expr, $kernel:ident($($arg:expr),*)) => {
        match $rows {
            4 => $kernel::<4>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            _ => $kernel::<1>($($arg),*),
        }
    };
}
pub(super) use with_rows;

/// Quantization parameters of a row from its range: `(s, 1/s, zp)`. A row holding NaN or ±∞
/// (`finite` false, or an infinite end) gets `s = NaN`, so that every output of the row is NaN
/// as the f32 product would be non-finite, instead of finite numbers from clamped codes. A
/// range too wide for f32 (`hi − lo` overflows) is taken in two halves.
fn quant_params(lo: f32, hi: f32, finite: bool) -> (f32, f32, f32) {
    if !finite || !lo.is_finite() || !hi.is_finite() {
        return (f32::NAN, 0.0, 0.0);
    }
    let range = hi - lo;
    if range.is_infinite() {
        let s = hi / 127.0 - lo / 127.0;
        let inv = 1.0 / s;
        return (s, inv, (-lo * inv).round_ties_even());
    }
    if range > 0.0 {
        let inv = 127.0 / range;
        (range / 127.0, inv, (-lo * inv).round_ties_even())
    } else {
        (0.0, 0.0, 0.0)
    }
}

/// Quantizes one row (`dst.len() == src.len()`) and returns `(s, zp)`.
pub(super) fn quantize_row(src: &[f32], dst: &mut [u8], isa: Isa) -> (f32, i32) {
    match isa {
        Isa::Scalar => quantize_row_scalar(src, dst),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Vnni512` are only chosen after detecting AVX2.
        Isa::Avx2 | Isa::Vnni512 => unsafe { quantize_row_avx2(src, dst) },
    }
}

/// Scalar code of one element: `clamp(round_half_even(v · inv + zp), 0, 127)`.
/// Matches `vcvtps2dq` (round to nearest even; NaN → 0 after the clamp).
#[inline(always)]
fn quantize_one(v: f32, inv: f32, zp: f32) -> u8 {
    ((v * inv + zp).round_ties_even() as i32).clamp(0, 127) as u8
}

fn quantize_row_scalar(src: &[f32], dst: &mut [u8]) -> (f32, i32) {
    // `if v < lo` matches `vminps(v, lo)` (keeps `lo` for NaN and for ±0).
    let (mut lo, mut hi, mut finite) = (0f32, 0f32, true);
    for &v in src {
        if v < lo {
            lo = v;
        }
        if v > hi {
            hi = v;
        }
        finite &= !v.is_nan();
    }
    let (s, inv, zp) = quant_params(lo, hi, finite);
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = quantize_one(v, inv, zp);
    }
    (s, zp as i32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(src: &[f32], dst: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let len = src.len();
    let main = len / 32 * 32;
    let (mut vlo, mut vhi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut vnan = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= len {
        // SAFETY: i + 8 <= len.
        let v = unsafe { _mm256_loadu_ps(src.as_ptr().add(i)) };
        vlo = _mm256_min_ps(v, vlo);
        vhi = _mm256_max_ps(v, vhi);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        i += 8;
    }
    let finite = _mm256_movemask_ps(vnan) == 0 && !src[i..].iter().any(|v| v.is_nan());
    let (mut lo_l, mut hi_l) = ([0f32; 8], [0f32; 8]);
    // SAFETY: both arrays hold 8 f32.
    unsafe {
        _mm256_storeu_ps(lo_l.as_mut_ptr(), vlo);
        _mm256_storeu_ps(hi_l.as_mut_ptr(), vhi);
    }
    let (mut lo, mut hi) = (0f32, 0f32);
    // Lanes and tail: the same comparisons as the scalar path; min/max are exact,
    // so the order does not change the result.
    for &v in lo_l.iter().chain(&src[i..]) {
        if v < lo {
            lo = v;
        }
    }
    for &v in hi_l.iter().chain(&src[i..]) {
        if v > hi {
            hi = v;
        }
    }
    let (s, inv, zp) = quant_params(lo, hi, finite);
    let (vinv, vzp) = (_mm256_set1_ps(inv), _mm256_set1_ps(zp));
    let (zero, max) = (_mm256_setzero_si256(), _mm256_set1_epi32(127));
    let q = |p: *const f32| {
        // SAFETY: callers pass p with 8 readable f32.
        let v = unsafe { _mm256_loadu_ps(p) };
        // Separate mul and add (no FMA) to match the scalar path bit for bit.
        let t = _mm256_add_ps(_mm256_mul_ps(v, vinv), vzp);
        _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(t), zero), max)
    };
    let mut i = 0;
    while i < main {
        let p = src.as_ptr().wrapping_add(i);
        // All values are in 0..=127, so the saturating packs are exact.
        let a = _mm256_packs_epi32(q(p), q(p.wrapping_add(8)));
        let b = _mm256_packs_epi32(q(p.wrapping_add(16)), q(p.wrapping_add(24)));
        let bytes = _mm256_packus_epi16(a, b);
        // packs work per 128-bit lane: restore the element order.
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: i + 32 <= main <= dst.len().
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, bytes) };
        i += 32;
    }
    for (d, &v) in dst[main..].iter_mut().zip(&src[main..]) {
        *d = quantize_one(v, inv, zp);
    }
    (s, zp as i32)
}

/// What the kernels' tests share: a seeded generator and products with activations of every
/// shape the kernels meet.
#[cfg(test)]
pub(super) mod testing {
    /// Small deterministic PRNG (xorshift64*), so the tests need no dependency.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Uniform in [-1, 1).
        pub fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// One product: `x` (`[m, k]`) against weight codes (`[n, k]`) and their scales.
    pub struct Case {
        pub m: usize,
        pub n: usize,
        pub k: usize,
        pub x: Vec<f32>,
        pub codes: Vec<i8>,
        pub scales: Vec<f32>,
    }

    impl Case {
        /// Random activations of mixed row shapes (symmetric, one-sided like after GELU, with
        /// an outlier, an all-zero last row, tiny values), codes from `code` and `scales`
        /// positive scales.
        pub fn random(
            rng: &mut Rng,
            (m, n, k): (usize, usize, usize),
            code: impl Fn(&mut Rng) -> i8,
            scales: usize,
        ) -> Case {
            let mut x = Vec::with_capacity(m * k);
            for r in 0..m {
                for i in 0..k {
                    x.push(match r % 5 {
                        0 => rng.f() * 3.0,
                        1 => (rng.f() * 2.0).max(-0.17),
                        2 if i == k / 2 => 40.0,
                        2 => rng.f(),
                        3 if m > 1 && r == m - 1 => 0.0,
                        _ => rng.f() * 0.01 - 0.02,
                    });
                }
            }
            let codes = (0..n * k).map(|_| code(rng)).collect();
            let scales = (0..scales).map(|_| (rng.f().abs() + 0.1) * 0.01).collect();
            Case {
                m,
                n,
                k,
                x,
                codes,
                scales,
            }
        }
    }

    /// The bits of each value, to compare outputs exactly (NaN included).
    pub fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_paths_agree() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for len in [1, 5, 8, 31, 32, 33, 100, 384] {
            let src: Vec<f32> = (0..len).map(|_| next() * 10.0 - 3.0).collect();
            let mut a = vec![0u8; len];
            let mut b = vec![0u8; len];
            let pa = quantize_row(&src, &mut a, Isa::Scalar);
            let pb = quantize_row(&src, &mut b, Isa::detect());
            assert_eq!((pa.0.to_bits(), pa.1), (pb.0.to_bits(), pb.1));
            assert_eq!(a, b);
            assert!(a.iter().all(|&u| u <= 127));
        }
    }
}
