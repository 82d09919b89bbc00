//! Int8 matrix multiply `y = x · Wᵀ` for CPU inference (AVX2; AVX-512 VNNI when present).
//!
//! * Weights `W` ([n, k]) arrive as symmetric int8 codes (full range `-128..=127`)
//!   with one f32 scale per output row, and are packed once ([`PackedInt8::pack`]).
//! * Activations `x` ([m, k], f32) are quantized per row at run time
//!   (dynamic quantization) to **7-bit asymmetric unsigned** codes
//!   `u = clamp(round(x / s) + zp, 0, 127)` with `s = (hi - lo) / 127`,
//!   `lo = min(0, min x)`, `hi = max(0, max x)`, `zp = round(-lo / s)`
//!   (PyTorch fbgemm's `reduce_range` trick).
//! * Products are formed with `vpmaddubsw` (u8 × i8 → pairwise i16 sums) and
//!   widened with `vpmaddwd(.., 1)` into i32 accumulators. The zero point is removed
//!   exactly in integers with a per-output-row column sum:
//!   `Σ_i (u_i - zp) w_i = Σ_i u_i w_i - zp · Σ_i w_i`.
//!   With AVX-512 VNNI, one `vpdpbusd` per 512-bit vector forms the same sums (four u8 × i8
//!   products into each i32 lane, nothing saturates), so every path gives the same bits. VNNI
//!   alone would allow 8-bit activations; the 7-bit codes stay so that all paths agree.
//! * Output: `y[r][j] = (acc as f32) * (s_r * scale_j)` — the same float operations in
//!   the same order in the SIMD and in the portable path, so both give identical bits.
//!
//! Why 7-bit u8 × i8: on AVX2 without VNNI it needs 3 instructions per 32 MACs
//! (`vpmaddubsw`, `vpmaddwd`, `vpaddd`), against 2 per 16 for i16 × i16 `vpmaddwd`
//! and 4 per 32 for the 8-bit sign trick (`vpsignb` extra). Measured on a 2-core
//! AMD EPYC (Zen 3), 2 threads, MiniLM shapes with m ≥ 800: this scheme ran
//! 1.9–2.5× faster than candle's f32 matmul; i16 `vpmaddwd` and the sign trick
//! (both 8-bit symmetric activations, half the activation error) ran ~1.5×.
//!
//! # No saturation (proof)
//! `vpmaddubsw` computes `u[2p]·w[2p] + u[2p+1]·w[2p+1]` and saturates to i16.
//! Here `0 ≤ u ≤ 127` (clamped at quantization) and `-128 ≤ w ≤ 127`, so each
//! pair sum lies in `[2·127·(-128), 2·127·127] = [-32512, 32258] ⊂ [-32768, 32767]`:
//! it never saturates, for any int8 weight including -128. This is why activations
//! use 7 bits: with 8-bit `u ≤ 255` a pair could reach `2·255·(-128) = -65280`.
//! `vpmaddwd` with a vector of ones adds two such i16 values into an i32 exactly.
//! The i32 accumulators hold `Σ_i u_i w_i`, bounded by `127·128·k`; `pack` asserts
//! `k ≤ 2^17`, so `|acc| ≤ 2_130_706_432 < 2^31`. Likewise `|zp · Σ w| ≤ 127·128·k`
//! and the corrected sum `Σ (u_i - zp) w_i` has `|u_i - zp| ≤ 127`, so it fits in
//! i32 as well (the subtraction is done wrapping, which is exact because the true
//! result fits).
//!
//! # Error
//! Per element, `|x - s·(u - zp)| ≤ s/2` (rounding to the nearest grid point; the
//! clamp at the range ends cannot add error because `zp` moves the grid by at most
//! `s/2`), up to f32 rounding in computing `x/s + zp` (≤ ~4e-5·s). Hence
//! `|y_j - ŷ_j| ≤ (s/2) · Σ_i |W[j][i]|` plus ~3 f32 roundings of the output.
//! The 7-bit step `s = (hi - lo)/127` equals the symmetric 8-bit step `max|x|/127`
//! when the row's range is one-sided (e.g. after GELU) and is at most twice it.
//!
//! # Layout and threading
//! Weights are packed into panels of 16 output rows: for each group of 4 `k`
//! values, 64 bytes hold `W[j][4t..4t+4]` for the 16 rows `j` of the panel (two
//! 32-byte vectors of 8 rows). The micro-kernel broadcasts 4 activation bytes of
//! each of up to 4 activation rows and multiplies them with both vectors:
//! a 4 × 16 tile of i32 accumulators. Work is split over rows of `x` (large `m`)
//! or over weight panels (small `m`) on the kernel pool; every output element is
//! computed by exactly the same integer and float operations whatever the split,
//! so the result does not depend on the thread count.

use super::row_quant::{quantize_block, with_rows, Dims, Isa, Job, PackedWeights, KU, MR, NR};

/// Largest supported `k` (keeps the i32 accumulators exact; see module docs).
const MAX_COLS: usize = 1 << 17;

/// 32 bytes of packed weights, aligned for `vmovdqa`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Chunk([i8; 32]);

/// Int8 weights `W` ([n, k], one f32 scale per row) prepacked once into the
/// kernel's panel layout.
pub struct PackedInt8 {
    dims: Dims,
    /// `cols.div_ceil(KU)`: number of 4-value groups along `k` (zero padded).
    ksteps: usize,
    /// `panels * ksteps * 2` chunks; see module docs for the layout.
    data: Vec<Chunk>,
    /// `Σ_i codes[j][i]` per row, zero padded to `panels * NR`.
    colsum: Vec<i32>,
    /// Scale per row, zero padded to `panels * NR`.
    scales: Vec<f32>,
}

impl std::fmt::Debug for PackedInt8 {
    /// Only the size: the packed bytes are not worth printing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedInt8 {:?}", self.dims)
    }
}

impl PackedInt8 {
    /// Packs int8 weight codes (`[rows = n, cols = k]`, row-major) with one scale per
    /// row, so that `W[j][i] ≈ codes[j * cols + i] as f32 * scales[j]`.
    ///
    /// # Panics
    /// If `codes.len() != rows * cols`, `scales.len() != rows` or `cols > 131072`.
    pub fn pack(codes: &[i8], scales: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            codes.len(),
            rows * cols,
            "codes must hold rows * cols values"
        );
        assert_eq!(scales.len(), rows, "one scale per row");
        assert!(cols <= MAX_COLS, "cols must be at most {MAX_COLS}");
        let ksteps = cols.div_ceil(KU);
        let panels = rows.div_ceil(NR);
        let mut data = vec![Chunk([0; 32]); panels * ksteps * 2];
        let mut colsum = vec![0i32; panels * NR];
        let mut padded_scales = vec![0f32; panels * NR];
        for (j, row) in codes.chunks_exact(cols.max(1)).take(rows).enumerate() {
            let (p, jj) = (j / NR, j % NR);
            let (half, lane) = (jj / 8, jj % 8);
            for (i, &c) in row.iter().enumerate() {
                data[(p * ksteps + i / KU) * 2 + half].0[lane * KU + i % KU] = c;
            }
            colsum[j] = row.iter().map(|&c| i32::from(c)).sum();
        }
        padded_scales[..rows].copy_from_slice(scales);
        PackedInt8 {
            dims: Dims { rows, cols, panels },
            ksteps,
            data,
            colsum,
            scales: padded_scales,
        }
    }
}

impl PackedWeights for PackedInt8 {
    fn dims(&self) -> Dims {
        self.dims
    }

    fn run_job(&self, job: Job) {
        run_job(job, self)
    }
}

/// Quantizes rows `rows` of `x` block by block and multiplies them with the weight
/// panels `panels`, writing the corresponding part of `out`.
fn run_job(job: Job, w: &PackedInt8) {
    let Job {
        x,
        rows,
        panels,
        bias,
        out,
        isa,
    } = job;
    let (n, k) = (w.dims.rows, w.dims.cols);
    let lda = w.ksteps * KU;
    // Quantized activations of one row block; padding columns stay 0 (the packed
    // weights there are 0 too, so their value would not matter anyway).
    let mut abuf = vec![0u8; PAIR_ROWS * lda];
    let most = if isa == Isa::Vnni512 { PAIR_ROWS } else { MR };
    let tiles = rows.len().div_ceil(most);
    let bound = |t: usize| rows.start + rows.len() * t / tiles.max(1);
    for t in 0..tiles {
        // The rows in tiles of nearly equal size (25 rows in VNNI tiles: 7, 6, 6 and 6).
        let (r0, rc) = (bound(t), bound(t + 1) - bound(t));
        let (mut s, mut zp) = ([0f32; PAIR_ROWS], [0i32; PAIR_ROWS]);
        for first in (0..rc).step_by(MR) {
            let block = MR.min(rc - first);
            let (bs, bzp) = quantize_block(
                x,
                k,
                (r0 + first, block),
                &mut abuf[first * lda..],
                lda,
                isa,
            );
            s[first..first + block].copy_from_slice(&bs[..block]);
            zp[first..first + block].copy_from_slice(&bzp[..block]);
        }
        let tile = |p: usize| Tile {
            a: &abuf,
            lda,
            rows: rc,
            s,
            zp,
            w: &w.data[p * w.ksteps * 2..(p + 1) * w.ksteps * 2],
            colsum: &w.colsum[p * NR..(p + 1) * NR],
            wscale: &w.scales[p * NR..(p + 1) * NR],
            bias: bias.map(|b| &b[p * NR..(p + 1) * NR]),
            ncols: NR.min(n - p * NR),
        };
        // SAFETY: rows r0..r0+rc and columns p*NR..p*NR+ncols lie inside the m × n output;
        // this job is the only one writing them (jobs own disjoint row or panel ranges) and
        // `out` outlives the job.
        let dst = |p: usize| unsafe { out.0.add(r0 * n + p * NR) };
        let mut p = panels.start;
        while p < panels.end {
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Vnni512 && p + 1 < panels.end {
                // SAFETY: `Isa::Vnni512` is only chosen after detecting its features; both
                // destinations are valid as above.
                unsafe { tile_pair_vnni512(rc, [&tile(p), &tile(p + 1)], [dst(p), dst(p + 1)], n) };
                p += 2;
                continue;
            }
            // A single panel runs at most MR rows at a time.
            let whole = tile(p);
            for first in (0..rc).step_by(MR) {
                let mut part = Tile {
                    a: &abuf[first * lda..],
                    rows: MR.min(rc - first),
                    ..whole
                };
                part.s[..PAIR_ROWS - first].copy_from_slice(&s[first..]);
                part.zp[..PAIR_ROWS - first].copy_from_slice(&zp[first..]);
                // SAFETY: row r0 + first lies inside the job's rows, as above.
                let dst = unsafe { dst(p).add(first * n) };
                run_tile(&part, dst, n, isa);
            }
            p += 1;
        }
    }
}

/// One tile in the kernel of `isa`.
fn run_tile(tile: &Tile, dst: *mut f32, n: usize, isa: Isa) {
    match isa {
        Isa::Scalar => tile_scalar(tile, dst, n),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen after detecting AVX2; `dst` is valid as above.
        Isa::Avx2 => unsafe { with_rows!(tile.rows, tile_avx2(tile, dst, n)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Vnni512` is only chosen after detecting AVX2, AVX-512 F, VNNI and VL;
        // `dst` is valid as above.
        Isa::Vnni512 => unsafe { with_rows!(tile.rows, tile_vnni512(tile, dst, n)) },
    }
}

/// Activation rows per tile of the paired 512-bit VNNI kernel (16 accumulators); the other
/// kernels take up to [`MR`].
const PAIR_ROWS: usize = 2 * MR;

/// One micro-tile: up to `MR` ([`PAIR_ROWS`] in the paired VNNI kernel) quantized activation rows
/// against one weight panel.
struct Tile<'a> {
    /// Quantized rows, `lda` bytes apart (`lda = ksteps * KU`).
    a: &'a [u8],
    lda: usize,
    /// Number of valid activation rows (1..=MR, or 1..=PAIR_ROWS in the paired VNNI kernel).
    rows: usize,
    s: [f32; PAIR_ROWS],
    zp: [i32; PAIR_ROWS],
    /// The panel: `ksteps * 2` chunks.
    w: &'a [Chunk],
    colsum: &'a [i32],
    wscale: &'a [f32],
    /// Added to each output column after scaling (`NR` values), if any.
    bias: Option<&'a [f32]>,
    /// Number of valid output columns (1..=NR).
    ncols: usize,
}

/// Portable tile: the same integer sums and float operations as `tile_avx2`.
/// `dst` points at output element (row 0, column 0) of the tile, rows `ldo` apart.
fn tile_scalar(t: &Tile, dst: *mut f32, ldo: usize) {
    let ksteps = t.w.len() / 2;
    for r in 0..t.rows {
        let a = &t.a[r * t.lda..(r + 1) * t.lda];
        for j in 0..t.ncols {
            let (half, lane) = (j / 8, j % 8);
            let mut acc = 0i32;
            for (step, ag) in a.chunks_exact(KU).enumerate().take(ksteps) {
                let wg = &t.w[step * 2 + half].0[lane * KU..(lane + 1) * KU];
                for (&u, &c) in ag.iter().zip(wg) {
                    acc += i32::from(u) * i32::from(c);
                }
            }
            let v = acc.wrapping_sub(t.zp[r].wrapping_mul(t.colsum[j]));
            let mut y = v as f32 * (t.s[r] * t.wscale[j]);
            if let Some(b) = t.bias {
                y += b[j];
            }
            // SAFETY: (r, j) is inside the tile, which the caller guarantees is
            // writable.
            unsafe { *dst.add(r * ldo + j) = y };
        }
    }
}

/// AVX2 micro-kernel for `R == t.rows` activation rows × one 16-row weight panel.
///
/// # Safety
/// AVX2 must be available; `dst` must be valid for writes of the tile's `R` rows
/// (`ldo` apart) × `t.ncols` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const R: usize>(t: &Tile, dst: *mut f32, ldo: usize) {
    use std::arch::x86_64::*;
    debug_assert!(R == t.rows && R <= MR);
    debug_assert!(t.a.len() >= (R - 1) * t.lda + t.w.len() / 2 * KU);
    let ksteps = t.w.len() / 2;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    let mut wp = t.w.as_ptr() as *const __m256i;
    let mut ap = t.a.as_ptr();
    for _ in 0..ksteps {
        // SAFETY: the panel holds 2 aligned chunks per step and each of the R rows
        // holds 4 bytes per step (asserted above); wp/ap advance by one step.
        unsafe {
            let w0 = _mm256_load_si256(wp);
            let w1 = _mm256_load_si256(wp.add(1));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let a = _mm256_set1_epi32((ap.add(r * t.lda) as *const i32).read_unaligned());
                // u8 × i8 pair sums: no saturation (module docs), then widen exactly.
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(a, w0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(a, w1), ones);
                acc_r[0] = _mm256_add_epi32(acc_r[0], p0);
                acc_r[1] = _mm256_add_epi32(acc_r[1], p1);
            }
            wp = wp.add(2);
            ap = ap.add(KU);
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile(t, &acc, dst, ldo) }
}

/// 512-bit VNNI micro-kernel: the 64 bytes of a panel's k-step (16 rows × 4 values) are one
/// vector, so each row takes one `vpdpbusd` per step. Same integer sums, same bits.
///
/// # Safety
/// AVX2, AVX-512 F, VNNI and VL must be available; `dst` as for [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vnni,avx512vl")]
unsafe fn tile_vnni512<const R: usize>(t: &Tile, dst: *mut f32, ldo: usize) {
    use std::arch::x86_64::*;
    debug_assert!(R == t.rows && R <= MR);
    debug_assert!(t.a.len() >= (R - 1) * t.lda + t.w.len() / 2 * KU);
    let ksteps = t.w.len() / 2;
    let mut acc = [_mm512_setzero_si512(); R];
    let mut wp = t.w.as_ptr() as *const __m512i;
    let mut ap = t.a.as_ptr();
    for _ in 0..ksteps {
        // SAFETY: as in `tile_avx2` (two 32-byte chunks = one 64-byte vector per step).
        unsafe {
            let w = _mm512_loadu_si512(wp);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_epi32((ap.add(r * t.lda) as *const i32).read_unaligned());
                *acc_r = _mm512_dpbusd_epi32(*acc_r, a, w);
            }
            wp = wp.add(1);
            ap = ap.add(KU);
        }
    }
    let halves = acc.map(|a| [_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64::<1>(a)]);
    // SAFETY: forwarded from the caller.
    unsafe { store_tile(t, &halves, dst, ldo) }
}

/// Steps ahead (of 64 bytes per panel) that [`pair_vnni512`] prefetches its panels: a sentence's
/// forward pass reads every weight once, from L3.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 32;

/// Two adjacent panels against the same `rows` activation rows in the 512-bit VNNI kernel:
/// each broadcast activation group feeds two `vpdpbusd`, halving the broadcasts per product.
///
/// # Safety
/// As for [`tile_vnni512`], for both tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vnni,avx512vl")]
unsafe fn tile_pair_vnni512(rows: usize, t: [&Tile; 2], dst: [*mut f32; 2], ldo: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            8 => pair_vnni512::<8>(t, dst, ldo),
            7 => pair_vnni512::<7>(t, dst, ldo),
            6 => pair_vnni512::<6>(t, dst, ldo),
            5 => pair_vnni512::<5>(t, dst, ldo),
            4 => pair_vnni512::<4>(t, dst, ldo),
            3 => pair_vnni512::<3>(t, dst, ldo),
            2 => pair_vnni512::<2>(t, dst, ldo),
            _ => pair_vnni512::<1>(t, dst, ldo),
        }
    }
}

/// [`tile_pair_vnni512`] for `R` rows.
///
/// # Safety
/// As for [`tile_vnni512`], for both tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vnni,avx512vl")]
unsafe fn pair_vnni512<const R: usize>(t: [&Tile; 2], dst: [*mut f32; 2], ldo: usize) {
    use std::arch::x86_64::*;
    debug_assert!(R == t[0].rows && R == t[1].rows && t[0].w.len() == t[1].w.len());
    let ksteps = t[0].w.len() / 2;
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    let mut wp = t.map(|t| t.w.as_ptr() as *const __m512i);
    let mut ap = t[0].a.as_ptr();
    for _ in 0..ksteps {
        // SAFETY: as in `tile_vnni512`, for each panel.
        unsafe {
            let w = [_mm512_loadu_si512(wp[0]), _mm512_loadu_si512(wp[1])];
            for p in wp {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_epi32((ap.add(r * t[0].lda) as *const i32).read_unaligned());
                acc_r[0] = _mm512_dpbusd_epi32(acc_r[0], a, w[0]);
                acc_r[1] = _mm512_dpbusd_epi32(acc_r[1], a, w[1]);
            }
            wp = wp.map(|p| p.add(1));
            ap = ap.add(KU);
        }
    }
    for panel in 0..2 {
        let halves = acc.map(|a| {
            [
                _mm512_castsi512_si256(a[panel]),
                _mm512_extracti64x4_epi64::<1>(a[panel]),
            ]
        });
        // SAFETY: forwarded from the caller.
        unsafe { store_tile(t[panel], &halves, dst[panel], ldo) }
    }
}

/// Epilogue of the SIMD tiles: removes the zero point, converts, scales by
/// `s_r · scale_j` and stores the tile.
///
/// # Safety
/// AVX2 must be available; `dst` as for [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_tile<const R: usize>(
    t: &Tile,
    acc: &[[std::arch::x86_64::__m256i; 2]; R],
    dst: *mut f32,
    ldo: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: colsum and wscale hold NR = 16 values.
    let (cs, ws) = unsafe {
        (
            [
                _mm256_loadu_si256(t.colsum.as_ptr() as *const __m256i),
                _mm256_loadu_si256(t.colsum.as_ptr().add(8) as *const __m256i),
            ],
            [
                _mm256_loadu_ps(t.wscale.as_ptr()),
                _mm256_loadu_ps(t.wscale.as_ptr().add(8)),
            ],
        )
    };
    for (r, acc_r) in acc.iter().enumerate() {
        let zp = _mm256_set1_epi32(t.zp[r]);
        let s = _mm256_set1_ps(t.s[r]);
        let mut y = [_mm256_setzero_ps(); 2];
        for h in 0..2 {
            let v = _mm256_sub_epi32(acc_r[h], _mm256_mullo_epi32(zp, cs[h]));
            y[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(s, ws[h]));
            if let Some(b) = t.bias {
                // SAFETY: the padded bias holds NR = 16 values per panel.
                y[h] = _mm256_add_ps(y[h], unsafe { _mm256_loadu_ps(b.as_ptr().add(8 * h)) });
            }
        }
        // SAFETY: the caller guarantees row r of the tile is writable for ncols
        // columns; the full-width stores are used only when ncols == NR.
        unsafe {
            let row = dst.add(r * ldo);
            if t.ncols == NR {
                _mm256_storeu_ps(row, y[0]);
                _mm256_storeu_ps(row.add(8), y[1]);
            } else {
                let mut tmp = [0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), y[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), y[1]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), row, t.ncols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_quant::testing::{bits, Case, Rng};
    use super::super::row_quant::{matmul_t, matmul_t_with};
    use super::*;

    impl Case {
        fn unit_scales(m: usize, n: usize, k: usize, x: Vec<f32>, codes: Vec<i8>) -> Self {
            let scales = vec![1.0f32; n];
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

    /// A random int8 product (`case` of the shared generator: full-range codes, a scale per row).
    fn case(rng: &mut Rng, m: usize, n: usize, k: usize) -> Case {
        Case::random(rng, (m, n, k), |rng| rng.next() as u8 as i8, n)
    }

    fn run(c: &Case, threads: usize, isa: Isa) -> Vec<f32> {
        run_with_bias(c, None, threads, isa)
    }

    fn run_with_bias(c: &Case, bias: Option<&[f32]>, threads: usize, isa: Isa) -> Vec<f32> {
        let w = PackedInt8::pack(&c.codes, &c.scales, c.n, c.k);
        let mut out = vec![f32::NAN; c.m * c.n];
        matmul_t_with(&c.x, c.m, &w, bias, &mut out, threads, isa);
        out
    }

    #[test]
    fn a_new_output_holds_the_values_written_over_nan() {
        let mut rng = Rng(9);
        for (m, n, k) in shapes() {
            let c = case(&mut rng, m, n, k);
            let w = PackedInt8::pack(&c.codes, &c.scales, c.n, c.k);
            let got = super::super::row_quant::matmul_t_new(&c.x, c.m, &w, None, 2);
            assert_eq!(bits(&got), bits(&run(&c, 2, Isa::detect())), "{m}x{n}x{k}");
        }
    }

    #[test]
    fn fused_bias_equals_adding_it_afterwards_bit_for_bit() {
        let mut rng = Rng(5);
        for (m, n, k) in shapes() {
            let c = case(&mut rng, m, n, k);
            let bias: Vec<f32> = (0..n).map(|_| rng.f() * 3.0).collect();
            let plain = run(&c, 2, Isa::Scalar);
            let added: Vec<f32> = plain
                .iter()
                .enumerate()
                .map(|(i, y)| y + bias[i % n])
                .collect();
            for isa in Isa::available() {
                let fused = run_with_bias(&c, Some(&bias), 2, isa);
                assert_eq!(bits(&fused), bits(&added), "{isa:?} m={m} n={n} k={k}");
            }
        }
    }

    fn shapes() -> Vec<(usize, usize, usize)> {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut v = vec![
            (1, 1, 1),
            (1, 17, 33),
            (1, 384, 384),
            (25, 1152, 384),
            (7, 31, 1536),
            (130, 33, 100),
            (5, 16, 4),
            (3, 15, 3),
        ];
        for _ in 0..20 {
            v.push((1 + rng.below(140), 1 + rng.below(70), 1 + rng.below(300)));
        }
        v
    }

    #[test]
    fn simd_matches_scalar_bit_for_bit() {
        let isas = Isa::available();
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            assert!(isas.contains(&Isa::Avx2));
        }
        eprintln!("instruction sets compared with the scalar path: {isas:?}");
        let mut rng = Rng(1);
        for (m, n, k) in shapes() {
            let c = case(&mut rng, m, n, k);
            let a = run(&c, 1, Isa::Scalar);
            for &isa in &isas[1..] {
                let b = run(&c, 1, isa);
                assert_eq!(bits(&a), bits(&b), "{isa:?} m={m} n={n} k={k}");
            }
        }
    }

    #[test]
    fn threads_do_not_change_bytes() {
        let mut rng = Rng(2);
        let mut all = shapes();
        all.extend([
            (800, 384, 384),
            (64, 1536, 384),
            (25, 384, 1536),
            (300, 100, 200),
        ]);
        for (m, n, k) in all {
            let c = case(&mut rng, m, n, k);
            let one = run(&c, 1, Isa::detect());
            let two = run(&c, 2, Isa::detect());
            let three = run(&c, 3, Isa::detect());
            assert_eq!(bits(&one), bits(&two), "m={m} n={n} k={k}");
            assert_eq!(bits(&one), bits(&three), "m={m} n={n} k={k}");
        }
    }

    /// Against the f32 product with the dequantized weights (computed in f64 with
    /// the exact products `code · scale`): for each output,
    /// `|Δy_j| ≤ s·(1/2 + 1e-4) · Σ_i |W[j][i]| + 4·2⁻²⁴ · Σ_i |x_i|·|W[j][i]|`,
    /// where `s = (hi - lo)/127` is the row's activation step. The first term is
    /// the activation rounding (≤ s/2 per element, see module docs; the 1e-4·s
    /// covers f32 rounding in `x·(1/s) + zp` and in `s` itself, ≤ ~4e-5·s); the
    /// second covers the three f32 roundings of `(acc as f32) · (s · scale)`.
    #[test]
    fn error_within_activation_rounding_bound() {
        let mut rng = Rng(3);
        let mut all = shapes();
        all.extend([(64, 384, 384), (25, 384, 1536)]);
        for (m, n, k) in all {
            let c = case(&mut rng, m, n, k);
            let y = run(&c, 2, Isa::detect());
            for r in 0..m {
                let xr = &c.x[r * k..(r + 1) * k];
                let lo = xr.iter().fold(0f32, |a, &v| a.min(v));
                let hi = xr.iter().fold(0f32, |a, &v| a.max(v));
                let s = f64::from((hi - lo) / 127.0);
                for j in 0..n {
                    let (mut exact, mut sum_w, mut sum_xw) = (0f64, 0f64, 0f64);
                    for (i, &xv) in xr.iter().enumerate() {
                        let wv = f64::from(c.codes[j * k + i]) * f64::from(c.scales[j]);
                        exact += f64::from(xv) * wv;
                        sum_w += wv.abs();
                        sum_xw += (f64::from(xv) * wv).abs();
                    }
                    let bound =
                        s * (0.5 + 1e-4) * sum_w + 4.0 * 2f64.powi(-24) * (sum_xw + s * sum_w);
                    let err = (f64::from(y[r * n + j]) - exact).abs();
                    assert!(
                        err <= bound,
                        "m={m} n={n} k={k} r={r} j={j}: err {err} > bound {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn weight_code_minus_128_and_extremes() {
        // Worst case for saturation: u = 127 next to u = 127 against -128 / 127.
        let (m, n, k) = (3, 5, 67);
        let x: Vec<f32> = (0..m * k)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let codes: Vec<i8> = (0..n * k)
            .map(|i| if i % 2 == 0 { -128 } else { 127 })
            .collect();
        let c = Case::unit_scales(m, n, k, x, codes);
        let (a, b) = (run(&c, 1, Isa::Scalar), run(&c, 1, Isa::detect()));
        assert_eq!(bits(&a), bits(&b));
        // x has only ±1, which are exactly representable (zp = 64 → -1 ↦ 0.5 steps
        // off at most): compare with the exact product within the bound.
        for r in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| f64::from(c.x[r * k + i]) * f64::from(c.codes[j * k + i]))
                    .sum();
                let s = 2.0 / 127.0;
                let bound = s * (0.5 + 1e-4) * 128.0 * k as f64 + 1e-3;
                assert!((f64::from(a[r * n + j]) - exact).abs() <= bound);
            }
        }
    }

    #[test]
    fn extreme_pairs_do_not_saturate() {
        // x ≥ 0 with max 1 → lo = 0, zp = 0, u = 127 everywhere: every vpmaddubsw
        // pair is 127·(-128)·2 = -32512 (row 0) or 127·127·2 = 32258 (row 1).
        let (m, n, k) = (5, 2, 1536);
        let x = vec![1.0f32; m * k];
        let codes: Vec<i8> = (0..n * k).map(|i| if i < k { -128 } else { 127 }).collect();
        let c = Case::unit_scales(m, n, k, x, codes);
        let (a, b) = (run(&c, 1, Isa::Scalar), run(&c, 1, Isa::detect()));
        assert_eq!(bits(&a), bits(&b));
        let s = 1.0f32 / 127.0;
        for r in 0..m {
            assert_eq!(b[r * n], (-128 * 127 * k as i32) as f32 * s);
            assert_eq!(b[r * n + 1], (127 * 127 * k as i32) as f32 * s);
        }
    }

    #[test]
    fn non_finite_activations_give_nan_rows_like_f32() {
        // Row 0 holds a NaN (at a SIMD position and, in row 2, in the scalar tail), row 1 a +∞,
        // row 3 is ordinary: only the first three rows turn NaN, and row 3 is unchanged.
        let mut rng = Rng(7);
        let (m, n, k) = (4, 20, 67);
        let mut c = case(&mut rng, m, n, k);
        let clean = run(&c, 1, Isa::Scalar);
        c.x[3] = f32::NAN;
        c.x[k + 10] = f32::INFINITY;
        c.x[2 * k + k - 1] = f32::NAN;
        for isa in Isa::available() {
            let out = run(&c, 1, isa);
            for r in 0..3 {
                assert!(
                    out[r * n..(r + 1) * n].iter().all(|v| v.is_nan()),
                    "{isa:?} row {r}"
                );
            }
            assert_eq!(bits(&out[3 * n..]), bits(&clean[3 * n..]), "{isa:?}");
        }
    }

    #[test]
    fn a_range_wider_than_f32_still_quantizes() {
        // ±2e38 in one row: hi − lo overflows f32, yet the product is finite.
        let (m, n, k) = (1, 3, 64);
        let x: Vec<f32> = (0..k)
            .map(|i| if i % 2 == 0 { 2e38 } else { -2e38 })
            .collect();
        let codes: Vec<i8> = (0..n * k).map(|i| (i % 5) as i8 - 2).collect();
        let mut c = Case::unit_scales(m, n, k, x, codes);
        c.scales = vec![1e-6; n];
        for isa in Isa::available() {
            let out = run(&c, 1, isa);
            for (j, &got) in out.iter().enumerate() {
                let exact: f64 = (0..k)
                    .map(|i| f64::from(c.x[i]) * f64::from(c.codes[j * k + i]) * 1e-6)
                    .sum();
                let got = f64::from(got);
                assert!(got.is_finite(), "{isa:?}: {got}");
                assert!(
                    (got - exact).abs() <= 1e-2 * 4e32 * k as f64,
                    "{got} vs {exact}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "cols must be at most")]
    fn too_many_cols_is_rejected() {
        PackedInt8::pack(&[], &[], 0, MAX_COLS + 1);
    }

    #[test]
    fn zero_rows_and_empty() {
        let w = PackedInt8::pack(&[1, 2, 3, 4, 5, 6], &[1.0, 2.0], 2, 3);
        assert_eq!((w.dims().rows, w.dims().cols), (2, 3));
        let mut out = vec![f32::NAN; 4];
        matmul_t(&[0.0; 6], 2, &w, None, &mut out, 2);
        assert_eq!(out, vec![0.0; 4]);
        let mut none: Vec<f32> = Vec::new();
        matmul_t(&[], 0, &w, None, &mut none, 2);
        // k = 0: the product is empty, so every output is 0.
        let w0 = PackedInt8::pack(&[], &[0.5, 0.25, 1.0], 3, 0);
        let mut out = vec![f32::NAN; 6];
        matmul_t(&[], 2, &w0, None, &mut out, 1);
        assert_eq!(out, vec![0.0; 6]);
    }
}
