//! The dense f32 product `out = x · Wᵀ + b` against a weight matrix packed once, for inference.
//!
//! The gemm crate packs `W` again on every call, runs its AVX2 kernel on AVX-512 machines and, at
//! a few dozen rows (one sentence), spends much of its time outside the micro-kernel. Here `W`
//! (`[n, k]`, row-major as in PyTorch) is packed once into panels of [`NR`] = 16 output rows,
//! `k`-major: panel `p` holds `W[16p + j][i]` at `i · 16 + j` (zero rows pad the last panel). A
//! micro-tile keeps up to 12 rows × 32 outputs of accumulators in AVX-512 registers (6 × 16 with
//! AVX2 and FMA), broadcasts one activation per row and step, and adds the bias as it stores.
//!
//! **The same bits on every path.** Every output is `bias + Σᵢ x[i] · W[j][i]`, the sum taken as
//! one fused multiply-add per `i`, in order, from zero; the scalar path (`f32::mul_add`), the
//! AVX2 and the AVX-512 path therefore give the same bits, whatever the split over threads.
//! (The gemm crate's sums are blocked differently, so the two differ in the last bits.)
//!
//! The packed matrix is a runtime view, never written to a file.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use super::row_quant::{as_uninit, new_output, padded_bias, split_jobs, OutPtr, NR};

/// The instruction set the f32 kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// `f32::mul_add`, one output at a time.
    Scalar,
    /// AVX2 with FMA: 6 rows × one 16-output panel.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// AVX-512 F: 12 rows × two 16-output panels.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// Every instruction set this CPU runs, from the plainest to the fastest.
    pub(crate) fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2Fma);
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    /// The fastest instruction set this CPU runs.
    fn detect() -> Isa {
        *Isa::available()
            .last()
            .expect("the scalar path is always there")
    }

    /// Weight panels per micro-tile of `rows` rows, at most: with few rows, more panels keep
    /// enough independent sums in flight to hide the multiply-add latency.
    fn panels_per_tile(self, rows: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if rows <= 3 => 4,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 2,
            _ => 1,
        }
    }

    /// Activation rows per micro-tile.
    fn rows_per_tile(self) -> usize {
        match self {
            Isa::Scalar => 4,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => 6,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 12,
        }
    }
}

/// A dense f32 weight `W` (`[rows = n, cols = k]`) packed into the kernel's panels. Clones and
/// row views ([`PackedF32::narrow_rows`]) share the packed values.
#[derive(Clone)]
pub struct PackedF32 {
    /// Output rows `n`.
    rows: usize,
    /// Inputs `k`.
    cols: usize,
    /// The panels of the whole matrix this view was cut from.
    data: Arc<[f32]>,
    /// The view's first panel in `data`.
    first_panel: usize,
}

impl std::fmt::Debug for PackedF32 {
    /// Only the size: the packed values are not worth printing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedF32 {} x {}", self.rows, self.cols)
    }
}

impl PackedF32 {
    /// Packs `w` (`rows × cols`, row-major).
    ///
    /// # Panics
    /// If `w.len() != rows * cols`.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "w must hold rows * cols values");
        let panels = rows.div_ceil(NR);
        let mut data = vec![0f32; panels * NR * cols];
        for (j, row) in w.chunks_exact(cols.max(1)).take(rows).enumerate() {
            let panel = &mut data[(j / NR) * NR * cols..(j / NR + 1) * NR * cols];
            for (i, &v) in row.iter().enumerate() {
                panel[i * NR + j % NR] = v;
            }
        }
        PackedF32 {
            rows,
            cols,
            data: data.into(),
            first_panel: 0,
        }
    }

    /// `(rows, cols)` of the view.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Output rows `start..start + len` as a view of the same panels, when they begin on a panel
    /// and end on one or at the last row; `None` otherwise.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Option<PackedF32> {
        let end = start.checked_add(len)?;
        let aligned = start.is_multiple_of(NR) && (end.is_multiple_of(NR) || end == self.rows);
        (aligned && end <= self.rows).then(|| PackedF32 {
            rows: len,
            first_panel: self.first_panel + start / NR,
            ..self.clone()
        })
    }

    /// The values of panels `panels` (of this view).
    fn panel_values(&self, panels: Range<usize>) -> &[f32] {
        let stride = NR * self.cols;
        let first = self.first_panel + panels.start;
        &self.data[first * stride..(first + panels.len()) * stride]
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(NR)
    }
}

/// Computes `out[m, n] = x[m, k] · Wᵀ (+ bias)` on up to `threads` threads of the kernel pool ([`super::spin_pool`])
/// (`threads <= 1` runs on the calling thread). The bits do not depend on `threads` or the
/// instruction set (module docs).
///
/// # Panics
/// If `x` does not hold `m · k` values, `out` `m · n`, or the bias `n`.
pub fn matmul_t(
    x: &[f32],
    m: usize,
    w: &PackedF32,
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
    w: &PackedF32,
    bias: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let len = m * w.dims().0;
    // SAFETY: `write_product` writes every one of the `m · n` outputs.
    unsafe {
        new_output(len, |out| {
            write_product(x, m, w, bias, out, threads, Isa::detect())
        })
    }
}

/// [`matmul_t`] on the instruction set `isa`.
pub(crate) fn matmul_t_with(
    x: &[f32],
    m: usize,
    w: &PackedF32,
    bias: Option<&[f32]>,
    out: &mut [f32],
    threads: usize,
    isa: Isa,
) {
    write_product(x, m, w, bias, as_uninit(out), threads, isa);
}

/// Writes every one of the `m · n` outputs of the product into `out` (each by exactly one job).
fn write_product(
    x: &[f32],
    m: usize,
    w: &PackedF32,
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
    threads: usize,
    isa: Isa,
) {
    let (n, k) = w.dims();
    assert_eq!(x.len(), m * k, "x must hold m * k values");
    assert_eq!(out.len(), m * n, "out must hold m * n values");
    let padded = bias.map(|b| padded_bias(b, n, w.panels()));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in out.chunks_exact_mut(n) {
            for (j, o) in row.iter_mut().enumerate() {
                o.write(bias.map_or(0.0, |b| b[j]));
            }
        }
        return;
    }
    let job = Job {
        x,
        w,
        bias: padded.as_deref(),
        out: OutPtr(out.as_mut_ptr().cast()),
        isa,
    };
    split_jobs((m, n, k), w.panels(), threads, |rows, panels| {
        job.run(rows, panels)
    });
}

/// What every share of one product reads and writes.
struct Job<'a> {
    x: &'a [f32],
    w: &'a PackedF32,
    /// The bias padded to whole panels.
    bias: Option<&'a [f32]>,
    out: OutPtr,
    isa: Isa,
}

/// Rows of `x` per block whose panels are walked together: about 512 KiB of activations, so that
/// a block stays in L2 while every panel pair streams past it.
const BLOCK_BYTES: usize = 512 << 10;

impl Job<'_> {
    /// Rows `rows` of `x` against the weight panels `panels`.
    fn run(&self, rows: Range<usize>, panels: Range<usize>) {
        let k = self.w.cols;
        let tile_rows = self.isa.rows_per_tile();
        let block = (BLOCK_BYTES / (4 * k)).max(1).div_ceil(tile_rows) * tile_rows;
        let mut b0 = rows.start;
        while b0 < rows.end {
            let b1 = (b0 + block).min(rows.end);
            // The block's rows in tiles of nearly equal size (25 rows: 9, 8 and 8, not 12, 12 and
            // 1, whose single row would pass over the panels for little work).
            let tiles = (b1 - b0).div_ceil(tile_rows);
            let bound = |t: usize| b0 + (b1 - b0) * t / tiles;
            let most = self.isa.panels_per_tile((b1 - b0).div_ceil(tiles));
            let mut p = panels.start;
            while p < panels.end {
                let width = most.min(panels.end - p);
                for t in 0..tiles {
                    self.tile(bound(t)..bound(t + 1), p..p + width);
                }
                p += width;
            }
            b0 = b1;
        }
    }

    /// One micro-tile: rows `rows` against panels `panels` (one to four).
    fn tile(&self, rows: Range<usize>, panels: Range<usize>) {
        let (n, k) = self.w.dims();
        let tile = Tile {
            x: &self.x[rows.start * k..rows.end * k],
            k,
            w: self.w.panel_values(panels.clone()),
            bias: self.bias.map(|b| &b[panels.start * NR..panels.end * NR]),
            cols: (n - panels.start * NR).min(panels.len() * NR),
            // SAFETY: row `rows.start`, column `panels.start · NR` lies inside the m × n output.
            dst: unsafe { self.out.0.add(rows.start * n + panels.start * NR) },
            ldo: n,
        };
        match self.isa {
            Isa::Scalar => tile_scalar(&tile),
            // SAFETY: the ISA was detected; the tile's rows and columns are this share's own.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { avx2::tile(&tile, rows.len()) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::tile(&tile, rows.len()) },
        }
    }
}

/// One micro-tile's operands: `x.len() / k` rows against `w.len() / (k · NR)` panels, written at
/// `dst` (rows `ldo` apart), `cols` of the tile's columns valid.
struct Tile<'a> {
    x: &'a [f32],
    k: usize,
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    cols: usize,
    dst: *mut f32,
    ldo: usize,
}

/// The reference tile: one fused multiply-add per input, in order, from zero.
fn tile_scalar(t: &Tile) {
    let stride = NR * t.k;
    for (r, x) in t.x.chunks_exact(t.k).enumerate() {
        for c in 0..t.cols {
            let panel = &t.w[(c / NR) * stride..(c / NR + 1) * stride];
            let acc = x
                .iter()
                .zip(panel.iter().skip(c % NR).step_by(NR))
                .fold(0f32, |acc, (&a, &b)| a.mul_add(b, acc));
            let y = t.bias.map_or(acc, |b| acc + b[c]);
            // SAFETY: row r and column c < cols lie inside the tile's part of the output.
            unsafe { *t.dst.add(r * t.ldo + c) = y };
        }
    }
}

/// Runs `$call` with the const `$r` set to the tile's row count `$rows`, one of the literals.
macro_rules! with_tile_rows {
    ($rows:expr, |$r:ident| $call:expr; $($n:literal)*) => {
        match $rows {
            $($n => {
                const $r: usize = $n;
                $call
            })*
            _ => unreachable!("a tile has 1 to the ISA's rows"),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, NR};

    /// The tile in AVX-512, over its one to four panels.
    ///
    /// # Safety
    /// AVX-512 F must be available and the tile's destination writable.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(t: &Tile, rows: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match t.w.len() / (NR * t.k) {
                4 => with_tile_rows!(rows, |R| kernel::<R, 4>(t); 1 2 3),
                3 => with_tile_rows!(rows, |R| kernel::<R, 3>(t); 1 2 3),
                2 => with_tile_rows!(rows, |R| kernel::<R, 2>(t); 1 2 3 4 5 6 7 8 9 10 11 12),
                _ => with_tile_rows!(rows, |R| kernel::<R, 1>(t); 1 2 3 4 5 6 7 8 9 10 11 12),
            }
        }
    }

    /// Steps ahead (of 64 bytes per panel) that the panels are prefetched: a sentence's forward
    /// pass reads every weight once, from L3, and the prefetch measured 1.1-1.2x faster at batch
    /// 1 (`bench`, 16, 32 and 64 steps alike).
    const PREFETCH: usize = 32;

    /// `R` rows × `P` panels, all accumulators in registers.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const P: usize>(t: &Tile) {
        let k = t.k;
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        for i in 0..k {
            // SAFETY: panel q holds k · NR values from q · k · NR; each row holds k values.
            unsafe {
                let mut b = [_mm512_setzero_ps(); P];
                for (q, b_q) in b.iter_mut().enumerate() {
                    let at = w.add(q * NR * k + i * NR);
                    *b_q = _mm512_loadu_ps(at);
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH * NR) as *const i8);
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*x.add(r * k + i));
                    for q in 0..P {
                        acc_r[q] = _mm512_fmadd_ps(a, b[q], acc_r[q]);
                    }
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (q, &sum) in acc_r.iter().enumerate() {
                let valid = t.cols.saturating_sub(q * NR).min(NR);
                let y = match t.bias {
                    // SAFETY: the padded bias holds NR values per panel.
                    Some(b) => {
                        _mm512_add_ps(sum, unsafe { _mm512_loadu_ps(b.as_ptr().add(q * NR)) })
                    }
                    None => sum,
                };
                let mask: __mmask16 = ((1u32 << valid) - 1) as u16;
                // SAFETY: row r, columns q · NR + 0..valid lie inside the tile's output.
                unsafe { _mm512_mask_storeu_ps(t.dst.add(r * t.ldo + q * NR), mask, y) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, NR};

    /// The tile in AVX2 with FMA, one panel.
    ///
    /// # Safety
    /// AVX2 and FMA must be available and the tile's destination writable.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(t: &Tile, rows: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { with_tile_rows!(rows, |R| kernel::<R>(t); 1 2 3 4 5 6) }
    }

    /// `R` rows × one panel (two 8-lane halves), all accumulators in registers.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const R: usize>(t: &Tile) {
        let k = t.k;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        for i in 0..k {
            // SAFETY: the panel holds k · NR values; each row holds k values.
            unsafe {
                let b = [
                    _mm256_loadu_ps(w.add(i * NR)),
                    _mm256_loadu_ps(w.add(i * NR + 8)),
                ];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a = _mm256_set1_ps(*x.add(r * k + i));
                    acc_r[0] = _mm256_fmadd_ps(a, b[0], acc_r[0]);
                    acc_r[1] = _mm256_fmadd_ps(a, b[1], acc_r[1]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let mut y = [0f32; NR];
            for (h, &sum) in acc_r.iter().enumerate() {
                let v = match t.bias {
                    // SAFETY: the padded bias holds NR values.
                    Some(b) => {
                        _mm256_add_ps(sum, unsafe { _mm256_loadu_ps(b.as_ptr().add(8 * h)) })
                    }
                    None => sum,
                };
                // SAFETY: y holds NR = 16 values.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(8 * h), v) };
            }
            // SAFETY: row r, columns 0..cols (≤ NR) lie inside the tile's output.
            unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), t.dst.add(r * t.ldo), t.cols) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_quant::testing::Rng;
    use super::*;

    fn random(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.f()).collect()
    }

    /// `x Wᵀ + b` in f64, the reference for the error bound.
    fn exact(x: &[f32], w: &[f32], bias: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                    .sum();
                out[r * n + j] = dot + f64::from(bias[j]);
            }
        }
        out
    }

    fn shapes() -> Vec<(usize, usize, usize)> {
        vec![
            (1, 1, 1),
            (1, 16, 7),
            (3, 17, 5),
            (12, 32, 33),
            (13, 48, 64),
            (25, 70, 96),
            (40, 100, 9),
            (7, 15, 130),
        ]
    }

    fn run(
        x: &[f32],
        w: &PackedF32,
        bias: Option<&[f32]>,
        m: usize,
        t: usize,
        isa: Isa,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * w.dims().0];
        matmul_t_with(x, m, w, bias, &mut out, t, isa);
        out
    }

    #[test]
    fn every_instruction_set_and_split_gives_the_scalar_bits() {
        let mut rng = Rng(7);
        let isas = Isa::available();
        eprintln!("instruction sets compared with the scalar path: {isas:?}");
        for (m, n, k) in shapes() {
            let (x, w, b) = (
                random(&mut rng, m * k),
                random(&mut rng, n * k),
                random(&mut rng, n),
            );
            let packed = PackedF32::pack(&w, n, k);
            for bias in [Some(&b[..]), None] {
                let want = run(&x, &packed, bias, m, 1, Isa::Scalar);
                for &isa in &isas {
                    for threads in [1, 2, 3] {
                        let got = run(&x, &packed, bias, m, threads, isa);
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{isa:?}, {threads} threads, {m}x{n}x{k}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_new_output_holds_the_values_written_over_nan() {
        let mut rng = Rng(13);
        for (m, n, k) in shapes().into_iter().chain([(3, 5, 0)]) {
            let (x, w, b) = (
                random(&mut rng, m * k),
                random(&mut rng, n * k),
                random(&mut rng, n),
            );
            let packed = PackedF32::pack(&w, n, k);
            let want = run(&x, &packed, Some(&b), m, 2, Isa::detect());
            let got = matmul_t_new(&x, m, &packed, Some(&b), 2);
            let same = got.len() == want.len()
                && got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{m}x{n}x{k}");
        }
    }

    #[test]
    fn equals_the_exact_product_within_rounding() {
        let mut rng = Rng(11);
        for (m, n, k) in shapes() {
            let (x, w, b) = (
                random(&mut rng, m * k),
                random(&mut rng, n * k),
                random(&mut rng, n),
            );
            let got = run(
                &x,
                &PackedF32::pack(&w, n, k),
                Some(&b),
                m,
                2,
                Isa::detect(),
            );
            // |x|, |w| < 1: each of the k + 1 roundings is below 2^-24 of a partial sum ≤ k + 1.
            let bound = (k as f64 + 1.0).powi(2) * f64::from(f32::EPSILON);
            for (g, e) in got.iter().zip(exact(&x, &w, &b, m, n, k)) {
                assert!(
                    (f64::from(*g) - e).abs() <= bound,
                    "{m}x{n}x{k}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn a_parallel_large_product_gives_the_single_thread_bits() {
        let mut rng = Rng(3);
        let (m, n, k) = (97, 200, 150);
        let (x, w) = (random(&mut rng, m * k), random(&mut rng, n * k));
        let packed = PackedF32::pack(&w, n, k);
        let one = run(&x, &packed, None, m, 1, Isa::detect());
        assert_eq!(one, run(&x, &packed, None, m, 2, Isa::detect()));
        assert_eq!(one, run(&x, &packed, None, m, 1, Isa::Scalar));
    }

    #[test]
    fn a_row_view_multiplies_like_the_rows_it_shows() {
        let mut rng = Rng(5);
        let (m, n, k) = (5, 40, 24);
        let (x, w) = (random(&mut rng, m * k), random(&mut rng, n * k));
        let packed = PackedF32::pack(&w, n, k);
        let view = packed
            .narrow_rows(16, 24)
            .expect("starts on a panel, ends at the last row");
        let alone = PackedF32::pack(&w[16 * k..], 24, k);
        assert_eq!(
            run(&x, &view, None, m, 1, Isa::detect()),
            run(&x, &alone, None, m, 1, Isa::detect())
        );
        assert!(
            packed.narrow_rows(8, 16).is_none(),
            "does not start on a panel"
        );
        assert!(packed.narrow_rows(16, 20).is_none(), "ends inside a panel");
        assert!(packed.narrow_rows(32, 16).is_none(), "past the end");
    }

    #[test]
    fn no_inputs_give_the_bias() {
        let packed = PackedF32::pack(&[], 3, 0);
        let out = run(&[], &packed, Some(&[1.0, 2.0, 3.0]), 2, 1, Isa::detect());
        assert_eq!(out, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        assert!(run(&[], &packed, None, 0, 1, Isa::detect()).is_empty());
    }
}
