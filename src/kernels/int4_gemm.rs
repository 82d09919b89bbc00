//! Int4 matrix multiply `y = x · Wᵀ` for CPU inference (AVX2; AVX-512 VNNI when present).
//!
//! * Weights `W` ([n, k]) arrive as symmetric int4 codes (`-8..=7`) with one scale per group of
//!   [`GROUP`] consecutive entries of a row, and are packed once ([`PackedInt4::pack`]): two codes
//!   per byte, so the weights the kernel streams are half the int8 kernel's.
//! * Activations are quantized per row at run time exactly as for the int8 kernel (7-bit
//!   asymmetric unsigned codes, `row_quant`), and the zero point is removed exactly per group with
//!   the group's code sum.
//! * Each code is stored offset by 8 (`q + 8`, a nibble in `0..=15`), so unpacking is a mask and
//!   a shift, and the bytes are multiplied as in the int8 kernel (`vpmaddubsw`, or one `vpdpbusd`
//!   with AVX-512 VNNI). The offset comes back out exactly with the activation codes' sum per row
//!   and group: `Σ u (q + 8) − 8 Σ u − zp Σ q = Σ (u − zp) q`. Each group's integer sum is
//!   converted to f32 and scaled by the group's scale into a float accumulator:
//!   `y[r][j] = s_r · Σ_g f32(Σ_{i∈g} (u_i − zp) q_ji) · scale_jg`, the float operations in the
//!   same order in every path (separate multiply and add, no FMA), so every path and every
//!   thread count gives the same bits.
//!
//! # No overflow
//! `vpmaddubsw` forms `u·w + u'·w'` with `0 ≤ u ≤ 127` and `0 ≤ w ≤ 15` (the offset code): at
//! most 3,810. A group of 32 entries adds 8 such pair sums into each i16 lane before widening: at
//! most 30,480, inside i16, so the AVX2 path widens once per group instead of once per step. A
//! group's i32 sum is at most `32 · 127 · 15`; the corrections `8 Σ u` and `zp · Σ q` at most
//! `32 · 127 · 8`. Every one of them is an integer below 2²⁴, so the VNNI path may subtract the
//! corrections in f32 (`cvt(Σ u w) − (zp · Σ q + 8 Σ u)`, one fused multiply-add of exact
//! integers) and get the integer path's value exactly.
//!
//! # Layout
//! Panels of 16 output rows, as in the int8 kernel. For each 8 consecutive `k` values
//! (`8t..8t+8`) of the 16 rows, 64 bytes: byte `lane · 4 + i` of half `h` holds row
//! `16p + 8h + lane`'s code `8t + i` in its low nibble and code `8t + 4 + i` in its high nibble.
//! So one 32-byte load, masked and shifted, gives the int8 kernel's layout for two k-steps.

use super::row_quant::{quantize_block, with_rows, Dims, Isa, Job, PackedWeights, KU, MR, NR};

/// Entries per quantization group (one scale each).
pub const GROUP: usize = 32;
/// `k` values packed into one 32-byte chunk per half panel (two k-steps).
const KPAIR: usize = 2 * KU;
/// Step pairs per group.
const PAIRS_PER_GROUP: usize = GROUP / KPAIR;

/// 32 bytes of packed weights, aligned for `vmovdqa`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Chunk([u8; 32]);

/// Int4 weights `W` ([n, k], one f32 scale per row and group of 32) prepacked once into the
/// kernel's panel layout.
pub struct PackedInt4 {
    dims: Dims,
    groups: usize,
    /// `panels × (cols / 8) × 2` chunks (module docs).
    data: Vec<Chunk>,
    /// `Σ codes` per (panel, group, row of the panel), zero padded.
    colsum: Vec<i32>,
    /// Scale per (panel, group, row of the panel), zero padded.
    scales: Vec<f32>,
}

impl std::fmt::Debug for PackedInt4 {
    /// Only the size: the packed bytes are not worth printing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedInt4 {:?}", self.dims)
    }
}

/// A code in `-8..=7` as its offset nibble `q + 8` (module docs).
fn nibble(q: i8) -> u8 {
    debug_assert!((-8..=7).contains(&q));
    (q + 8) as u8
}

/// The code of an offset nibble (the low four bits of `n`).
fn unnibble(n: u8) -> i8 {
    (n & 0x0f) as i8 - 8
}

impl PackedInt4 {
    /// Packs int4 codes (`[rows, cols]`, row-major, each in `-8..=7`) with one scale per group of
    /// [`GROUP`] entries along a row (`scales[row * cols / GROUP + group]`), so that
    /// `W[j][i] ≈ codes[j * cols + i] · scales[j * cols / GROUP + i / GROUP]`.
    ///
    /// # Panics
    /// If `cols` is not a multiple of [`GROUP`], a code is outside `-8..=7`, or the lengths do not
    /// match.
    pub fn pack(codes: &[i8], scales: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(cols % GROUP, 0, "cols must be a multiple of {GROUP}");
        assert_eq!(
            codes.len(),
            rows * cols,
            "codes must hold rows * cols values"
        );
        let groups = cols / GROUP;
        assert_eq!(scales.len(), rows * groups, "one scale per row and group");
        assert!(
            codes.iter().all(|q| (-8..=7).contains(q)),
            "int4 codes lie in -8..=7"
        );
        let pairs = cols / KPAIR;
        let panels = rows.div_ceil(NR);
        let mut data = vec![Chunk([0; 32]); panels * pairs * 2];
        let mut colsum = vec![0i32; panels * groups * NR];
        let mut padded_scales = vec![0f32; panels * groups * NR];
        for (j, row) in codes.chunks_exact(cols.max(1)).take(rows).enumerate() {
            let (p, jj) = (j / NR, j % NR);
            let (half, lane) = (jj / 8, jj % 8);
            for (t, eight) in row.chunks_exact(KPAIR).enumerate() {
                let chunk = &mut data[(p * pairs + t) * 2 + half].0;
                for i in 0..KU {
                    chunk[lane * KU + i] = nibble(eight[i]) | nibble(eight[KU + i]) << 4;
                }
            }
            for (g, group) in row.chunks_exact(GROUP).enumerate() {
                let at = (p * groups + g) * NR + jj;
                colsum[at] = group.iter().map(|&q| i32::from(q)).sum();
                padded_scales[at] = scales[j * groups + g];
            }
        }
        PackedInt4 {
            dims: Dims { rows, cols, panels },
            groups,
            data,
            colsum,
            scales: padded_scales,
        }
    }
}

impl PackedWeights for PackedInt4 {
    fn dims(&self) -> Dims {
        self.dims
    }

    fn run_job(&self, job: Job) {
        run_job(job, self)
    }
}

/// One micro-tile: up to `MR` quantized activation rows against one weight panel.
struct Tile<'a> {
    /// Quantized rows, `lda = k` bytes apart.
    a: &'a [u8],
    lda: usize,
    rows: usize,
    s: [f32; MR],
    zp: [i32; MR],
    /// `8 · Σ u` per (row, group), `groups` apart: the offset codes' correction (module docs),
    /// an integer held exactly in f32.
    asum8: &'a [f32],
    /// The rows' zero points as f32 (exact).
    zpf: [f32; MR],
    /// The panel: `k / 8 × 2` chunks.
    w: &'a [Chunk],
    /// `groups × NR` code sums and scales.
    colsum: &'a [i32],
    wscale: &'a [f32],
    bias: Option<&'a [f32]>,
    ncols: usize,
}

fn run_job(job: Job, w: &PackedInt4) {
    let Job {
        x,
        rows,
        panels,
        bias,
        out,
        isa,
    } = job;
    let (n, k) = (w.dims.rows, w.dims.cols);
    let chunks = k / KPAIR * 2;
    let per_panel = w.groups * NR;
    let mut abuf = vec![0u8; MR * k];
    let mut asum8 = vec![0f32; MR * w.groups];
    let mut r0 = rows.start;
    while r0 < rows.end {
        let rc = MR.min(rows.end - r0);
        let (s, zp) = quantize_block(x, k, (r0, rc), &mut abuf, k, isa);
        for (sum, group) in asum8.iter_mut().zip(abuf[..rc * k].chunks_exact(GROUP)) {
            *sum = (8 * group.iter().map(|&u| i32::from(u)).sum::<i32>()) as f32;
        }
        let zpf = zp.map(|zp| zp as f32);
        let tile = |p: usize| Tile {
            a: &abuf,
            lda: k,
            rows: rc,
            s,
            zp,
            asum8: &asum8,
            zpf,
            w: &w.data[p * chunks..(p + 1) * chunks],
            colsum: &w.colsum[p * per_panel..(p + 1) * per_panel],
            wscale: &w.scales[p * per_panel..(p + 1) * per_panel],
            bias: bias.map(|b| &b[p * NR..(p + 1) * NR]),
            ncols: NR.min(n - p * NR),
        };
        // SAFETY: rows r0..r0+rc and columns p*NR..p*NR+ncols lie inside the m × n output;
        // only this job writes them (jobs own disjoint row or panel ranges).
        let dst = |p: usize| unsafe { out.0.add(r0 * n + p * NR) };
        for p in panels.clone() {
            run_tile(&tile(p), dst(p), n, isa);
        }
        r0 += rc;
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
        // SAFETY: `Isa::Vnni512` is only chosen after detecting its features; `dst` as above.
        Isa::Vnni512 => unsafe { with_rows!(tile.rows, tile_vnni512(tile, dst, n)) },
    }
}

/// The code of panel row `jj` at column `i`, read from the packed panel.
fn packed_code(w: &[Chunk], jj: usize, i: usize) -> i8 {
    let (half, lane) = (jj / 8, jj % 8);
    let byte = w[i / KPAIR * 2 + half].0[lane * KU + i % KU];
    unnibble(if i % KPAIR < KU { byte } else { byte >> 4 })
}

/// Portable tile: the same integer sums and float operations as the SIMD tiles.
fn tile_scalar(t: &Tile, dst: *mut f32, ldo: usize) {
    let groups = t.colsum.len() / NR;
    for r in 0..t.rows {
        let a = &t.a[r * t.lda..(r + 1) * t.lda];
        for j in 0..t.ncols {
            let mut y = 0f32;
            for g in 0..groups {
                let acc: i32 = (g * GROUP..(g + 1) * GROUP)
                    .map(|i| i32::from(a[i]) * i32::from(packed_code(t.w, j, i)))
                    .sum();
                let v = acc - t.zp[r] * t.colsum[g * NR + j];
                y += v as f32 * t.wscale[g * NR + j];
            }
            let mut y = y * t.s[r];
            if let Some(b) = t.bias {
                y += b[j];
            }
            // SAFETY: (r, j) is inside the tile, which the caller guarantees is writable.
            unsafe { *dst.add(r * ldo + j) = y };
        }
    }
}

/// AVX2 tile for `R == t.rows` rows: each 32-byte chunk gives two k-steps of 8 panel rows; the
/// i16 pair sums of a whole group are added before widening (module docs).
///
/// # Safety
/// AVX2 must be available; `dst` must be valid for writes of `R` rows (`ldo` apart) × `t.ncols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const R: usize>(t: &Tile, dst: *mut f32, ldo: usize) {
    use std::arch::x86_64::*;
    debug_assert!(R == t.rows && R <= MR);
    let groups = t.colsum.len() / NR;
    let (mask, ones) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi16(1));
    let unpack = |v: __m256i| {
        let lo = _mm256_and_si256(v, mask);
        (lo, _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask))
    };
    let mut yacc = [[_mm256_setzero_ps(); 2]; R];
    let mut wp = t.w.as_ptr() as *const __m256i;
    let mut ap = t.a.as_ptr();
    for g in 0..groups {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for _ in 0..PAIRS_PER_GROUP {
            // SAFETY: the panel holds 2 aligned chunks per step pair and every row 8 bytes per
            // pair; wp / ap advance by one pair.
            unsafe {
                let (lo0, hi0) = unpack(_mm256_load_si256(wp));
                let (lo1, hi1) = unpack(_mm256_load_si256(wp.add(1)));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let row = ap.add(r * t.lda);
                    let a0 = _mm256_set1_epi32((row as *const i32).read_unaligned());
                    let a1 = _mm256_set1_epi32((row.add(KU) as *const i32).read_unaligned());
                    let p0 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(a0, lo0),
                        _mm256_maddubs_epi16(a1, hi0),
                    );
                    let p1 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(a0, lo1),
                        _mm256_maddubs_epi16(a1, hi1),
                    );
                    acc_r[0] = _mm256_add_epi16(acc_r[0], p0);
                    acc_r[1] = _mm256_add_epi16(acc_r[1], p1);
                }
                wp = wp.add(2);
                ap = ap.add(KPAIR);
            }
        }
        // SAFETY: colsum and wscale hold NR values per group.
        let (cs, ws) = unsafe {
            let (c, w) = (t.colsum.as_ptr().add(g * NR), t.wscale.as_ptr().add(g * NR));
            (
                [
                    _mm256_loadu_si256(c as *const __m256i),
                    _mm256_loadu_si256(c.add(8) as *const __m256i),
                ],
                [_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8))],
            )
        };
        for (r, (acc_r, y_r)) in acc.iter().zip(yacc.iter_mut()).enumerate() {
            let zp = _mm256_set1_epi32(t.zp[r]);
            let offset = _mm256_set1_epi32(t.asum8[r * groups + g] as i32);
            for h in 0..2 {
                let sum = _mm256_sub_epi32(_mm256_madd_epi16(acc_r[h], ones), offset);
                let v = _mm256_sub_epi32(sum, _mm256_mullo_epi32(zp, cs[h]));
                y_r[h] = _mm256_add_ps(y_r[h], _mm256_mul_ps(_mm256_cvtepi32_ps(v), ws[h]));
            }
        }
    }
    for (r, y_r) in yacc.iter().enumerate() {
        let s = _mm256_set1_ps(t.s[r]);
        let mut y = [_mm256_mul_ps(y_r[0], s), _mm256_mul_ps(y_r[1], s)];
        if let Some(b) = t.bias {
            // SAFETY: the padded bias holds NR values per panel.
            unsafe {
                y[0] = _mm256_add_ps(y[0], _mm256_loadu_ps(b.as_ptr()));
                y[1] = _mm256_add_ps(y[1], _mm256_loadu_ps(b.as_ptr().add(8)));
            }
        }
        let mut row = [0f32; NR];
        // SAFETY: `row` holds NR values; the caller guarantees row r of the tile is writable for
        // ncols columns.
        unsafe {
            _mm256_storeu_ps(row.as_mut_ptr(), y[0]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), y[1]);
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * ldo), t.ncols);
        }
    }
}

/// 512-bit VNNI tile: one 64-byte load holds two k-steps of the whole 16-row panel, unpacked into
/// two vectors, each taking one `vpdpbusd` per row into its own accumulator (the low and the high
/// nibbles' chains run side by side instead of one after the other). The integer sums are the same
/// as [`tile_avx2`]'s, so are the bits. (Two panels per tile, as the int8 kernel runs, measured
/// slower here in the model at two threads: b1 4.3 → 4.5 ms.)
///
/// # Safety
/// AVX2, AVX-512 F, BW, VNNI and VL must be available; `dst` as for [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni,avx512vl")]
unsafe fn tile_vnni512<const R: usize>(t: &Tile, dst: *mut f32, ldo: usize) {
    use std::arch::x86_64::*;
    debug_assert!(R == t.rows && R <= MR);
    let groups = t.colsum.len() / NR;
    let mask = _mm512_set1_epi8(0x0f);
    let mut yacc = [_mm512_setzero_ps(); R];
    let mut wp = t.w.as_ptr() as *const __m512i;
    let mut ap = t.a.as_ptr();
    for g in 0..groups {
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        for _ in 0..PAIRS_PER_GROUP {
            // SAFETY: the panel holds 2 aligned chunks (one 64-byte vector) per step pair and
            // every row 8 bytes per pair; wp / ap advance by one pair.
            unsafe {
                let v = _mm512_loadu_si512(wp);
                let w = [
                    _mm512_and_si512(v, mask),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
                ];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let row = ap.add(r * t.lda);
                    let a = [
                        _mm512_set1_epi32((row as *const i32).read_unaligned()),
                        _mm512_set1_epi32((row.add(KU) as *const i32).read_unaligned()),
                    ];
                    for h in 0..2 {
                        acc_r[h] = _mm512_dpbusd_epi32(acc_r[h], a[h], w[h]);
                    }
                }
                wp = wp.add(1);
                ap = ap.add(KPAIR);
            }
        }
        // SAFETY: colsum and wscale hold NR values per group.
        let (cs, ws) = unsafe {
            (
                _mm512_cvtepi32_ps(_mm512_loadu_si512(
                    t.colsum.as_ptr().add(g * NR) as *const __m512i
                )),
                _mm512_loadu_ps(t.wscale.as_ptr().add(g * NR)),
            )
        };
        for (r, (acc_r, y_r)) in acc.iter().zip(yacc.iter_mut()).enumerate() {
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(acc_r[0], acc_r[1]));
            let offset = _mm512_set1_ps(t.asum8[r * groups + g]);
            // Exact: every term is an integer below 2^24 (module docs).
            let zp = _mm512_set1_ps(t.zpf[r]);
            let v = _mm512_sub_ps(sum, _mm512_fmadd_ps(zp, cs, offset));
            *y_r = _mm512_add_ps(*y_r, _mm512_mul_ps(v, ws));
        }
    }
    for (r, y_r) in yacc.iter().enumerate() {
        let mut y = _mm512_mul_ps(*y_r, _mm512_set1_ps(t.s[r]));
        if let Some(b) = t.bias {
            // SAFETY: the padded bias holds NR values per panel.
            y = _mm512_add_ps(y, unsafe { _mm512_loadu_ps(b.as_ptr()) });
        }
        let mut row = [0f32; NR];
        // SAFETY: as in `tile_avx2`.
        unsafe {
            _mm512_storeu_ps(row.as_mut_ptr(), y);
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * ldo), t.ncols);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_quant::matmul_t_with;
    use super::super::row_quant::testing::{bits, Case, Rng};
    use super::*;

    /// A random int4 product: codes in `-8..=7`, a scale per group of 32.
    fn case(rng: &mut Rng, m: usize, n: usize, k: usize) -> Case {
        let code = |rng: &mut Rng| (rng.next() % 16) as i8 - 8;
        Case::random(rng, (m, n, k), code, n * k / GROUP)
    }

    fn run(c: &Case, bias: Option<&[f32]>, threads: usize, isa: Isa) -> Vec<f32> {
        let w = PackedInt4::pack(&c.codes, &c.scales, c.n, c.k);
        let mut out = vec![f32::NAN; c.m * c.n];
        matmul_t_with(&c.x, c.m, &w, bias, &mut out, threads, isa);
        out
    }

    fn shapes() -> Vec<(usize, usize, usize)> {
        vec![
            (1, 1, 32),
            (1, 17, 64),
            (1, 384, 384),
            (3, 15, 96),
            (5, 16, 32),
            (7, 31, 1536),
            (25, 1152, 384),
            (130, 33, 160),
        ]
    }

    #[test]
    fn every_instruction_set_and_thread_count_gives_the_scalar_bits() {
        let mut rng = Rng(11);
        let mut all = shapes();
        all.extend([(800, 384, 384), (64, 1536, 384)]);
        for (m, n, k) in all {
            let c = case(&mut rng, m, n, k);
            let bias: Vec<f32> = (0..n).map(|_| rng.f()).collect();
            for b in [None, Some(bias.as_slice())] {
                let reference = run(&c, b, 1, Isa::Scalar);
                for isa in Isa::available() {
                    for threads in [1, 2, 3] {
                        let got = run(&c, b, threads, isa);
                        assert_eq!(bits(&got), bits(&reference), "{isa:?} m={m} n={n} k={k}");
                    }
                }
            }
        }
    }

    /// Against the exact product with the dequantized weights: the error is the activation
    /// rounding, at most `s/2` per element (`row_quant`), so `|Δy_j| ≤ s·(½ + 1e-4)·Σ|W_ji|` plus
    /// f32 rounding of the per-group float sums.
    #[test]
    fn error_within_the_activation_rounding_bound() {
        let mut rng = Rng(12);
        for (m, n, k) in shapes() {
            let c = case(&mut rng, m, n, k);
            let y = run(&c, None, 2, Isa::detect());
            for r in 0..m {
                let xr = &c.x[r * k..(r + 1) * k];
                let lo = xr.iter().fold(0f32, |a, &v| a.min(v));
                let hi = xr.iter().fold(0f32, |a, &v| a.max(v));
                let s = f64::from((hi - lo) / 127.0);
                for j in 0..n {
                    let (mut exact, mut sum_w, mut sum_xw) = (0f64, 0f64, 0f64);
                    for (i, &xv) in xr.iter().enumerate() {
                        let scale = c.scales[(j * k + i) / GROUP];
                        let wv = f64::from(c.codes[j * k + i]) * f64::from(scale);
                        exact += f64::from(xv) * wv;
                        sum_w += wv.abs();
                        sum_xw += (f64::from(xv) * wv).abs();
                    }
                    let rounding = (k / GROUP + 3) as f64 * 2f64.powi(-24);
                    let bound = s * (0.5 + 1e-4) * sum_w + rounding * (sum_xw + s * sum_w);
                    let err = (f64::from(y[r * n + j]) - exact).abs();
                    assert!(
                        err <= bound,
                        "m={m} n={n} k={k} r={r} j={j}: {err} > {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_extreme_codes_pack_and_multiply_exactly() {
        // Activations all 1 (zp 0, u = 127 everywhere): row 0 holds -8s, row 1 7s, row 2
        // alternates; every group's sum is exact in integers.
        let (m, n, k) = (2, 3, 64);
        let x = vec![1.0f32; m * k];
        let codes: Vec<i8> = (0..n * k)
            .map(|i| match i / k {
                0 => -8,
                1 => 7,
                _ => [-8, 7][i % 2],
            })
            .collect();
        let c = Case {
            m,
            n,
            k,
            x,
            codes,
            scales: vec![1.0; n * k / GROUP],
        };
        let s = 1.0f32 / 127.0;
        for isa in Isa::available() {
            let y = run(&c, None, 1, isa);
            for r in 0..m {
                assert_eq!(y[r * n], (-8 * 127 * k as i32) as f32 * s, "{isa:?}");
                assert_eq!(y[r * n + 1], (7 * 127 * k as i32) as f32 * s, "{isa:?}");
                assert_eq!(y[r * n + 2], (-127 * k as i32 / 2) as f32 * s, "{isa:?}");
            }
        }
    }

    #[test]
    fn nibbles_round_trip_every_code_in_either_half_of_a_byte() {
        for q in -8i8..=7 {
            for other in -8i8..=7 {
                let byte = nibble(q) | nibble(other) << 4;
                assert_eq!(unnibble(byte), q, "low nibble of {byte:#04x}");
                assert_eq!(unnibble(byte >> 4), other, "high nibble of {byte:#04x}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "multiple of 32")]
    fn columns_off_the_group_size_are_refused() {
        PackedInt4::pack(&[0; 40], &[1.0], 1, 40);
    }
}
