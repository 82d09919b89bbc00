//! Exact GELU (Hugging Face `gelu`, the erf form) for the inference path: a branch-free erf that
//! the compiler vectorises (AVX2 + FMA when the CPU has them), run over every core.
//!
//! candle 0.11's `gelu_erf` calls scalar libm `erff` per element on one thread: about 14 % of
//! MiniLM's cycles at batch 32 (`perf`, see the README's runtime section). Its backward pass
//! builds the derivative from a dozen tensor ops (54 ms for one MiniLM FFN at batch 32 × 44
//! tokens); this op's backward is one fused parallel pass.
//!
//! erf follows Abramowitz & Stegun 7.1.26, `erf(a) = 1 − t·P(t)·e^(−a²)` with `t = 1/(1 + p·a)`
//! for `a = |x|` and odd symmetry, whose bound is 1.5e-7. With f32 arithmetic and [`exp_nonpositive`]
//! the error against f64 libm stays below [`ERF_MAX_ERROR`] on every f32 input (tested).

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};

use super::fastmath::{exp_nonpositive, par_rows, par_rows2, task_len, vectorised};
use super::row_op::{RowOp, Saved};

/// Largest absolute error of [`erf`] against f64 libm `erf`, over all f32 inputs (tested).
pub const ERF_MAX_ERROR: f32 = 1e-6;

/// The error function (see the module docs for the method and its bound).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let mut poly = A[4];
    for c in [A[3], A[2], A[1], A[0]] {
        poly = poly * t + c;
    }
    (1.0 - t * poly * exp_nonpositive(-a * a)).copysign(x)
}

/// `0.5 · x · (1 + erf(x / √2))`.
#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d/dx gelu(x) = Φ(x) + x·φ(x)`, with `Φ` the normal CDF and `φ` its density.
#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp_nonpositive(-0.5 * x * x)
}

/// GELU of every element of `input`, in parallel over chunks.
pub fn gelu_slice(input: &[f32]) -> Vec<f32> {
    par_rows(input, 1, gelu_chunk)
}

/// `grad · gelu'(x)`, element by element, in parallel over chunks.
fn gelu_backward_slice(x: &[f32], grad: &[f32]) -> Vec<f32> {
    par_rows2(x, grad, 1, gelu_backward_chunk)
}

#[inline(always)]
fn gelu_chunk(input: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(input) {
        *o = gelu_one(x);
    }
}

#[inline(always)]
fn gelu_backward_chunk(x: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        *o = g * gelu_derivative(x);
    }
}

/// Exact GELU of an f32 CPU tensor, with a backward pass (fused and parallel, unlike candle's).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    RowOp {
        name: "axcompress-gelu-erf",
        whole_rows: false,
        forward: |x, _| gelu_slice(x),
        saved: Saved::Input,
        gradient: |x, grad, _| gelu_backward_slice(x, grad),
    }
    .apply(x)
}

/// GELU of every element of `values`, in place, in parallel over chunks: the values of
/// [`gelu_slice`], without a new buffer.
pub fn gelu_in_place(values: &mut [f32]) {
    let threads = crate::threads::count();
    super::spin_pool::for_each_chunk_mut(values, task_len(1), threads, |_, chunk| {
        vectorised(
            #[inline(always)]
            || {
                let mut input = [0f32; 64];
                for part in chunk.chunks_mut(input.len()) {
                    let input = &mut input[..part.len()];
                    input.copy_from_slice(part);
                    gelu_chunk(input, part);
                }
            },
        )
    });
}

/// GELU applied to a tensor's own storage.
struct GeluInPlace;

impl InplaceOp1 for GeluInPlace {
    fn name(&self) -> &'static str {
        "axcompress-gelu-erf-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (CpuStorage::F32(values), Some((from, to))) = (storage, layout.contiguous_offsets())
        else {
            bail!("gelu in place: the input must be a contiguous f32 tensor");
        };
        gelu_in_place(&mut values[from..to]);
        Ok(())
    }
}

/// Exact GELU for inference, written over `x`'s own storage: the caller must hold the only
/// reference to it (a product's fresh output). No backward pass; the values of [`gelu_erf`].
pub fn gelu_erf_owned(x: Tensor) -> Result<Tensor> {
    if x.track_op() {
        bail!("gelu in place: the input takes part in a backward pass");
    }
    let x = x.contiguous()?;
    x.inplace_op1(&GeluInPlace)?;
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::cpu::erf::erf_f64;

    #[test]
    fn in_place_gelu_gives_the_values_of_the_op() {
        let values: Vec<f32> = (0..40_000)
            .map(|i| (i as f32 - 20_000.0) / 3_000.0)
            .collect();
        let x = Tensor::from_vec(values, (200, 200), &candle_core::Device::Cpu).unwrap();
        let want: Vec<f32> = gelu_erf(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = gelu_erf_owned(x.copy().unwrap()).unwrap();
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }

    #[test]
    fn erf_is_within_its_bound_of_libm_on_every_relevant_input() {
        // Every f32 in [−6, 6] at one step of 2^-14, plus the tails, where erf is ±1 in f32.
        let mut worst = (0f64, 0f32);
        let mut x = -6.0f32;
        while x <= 6.0 {
            let err = (erf(x) as f64 - erf_f64(x as f64)).abs();
            if err > worst.0 {
                worst = (err, x);
            }
            x += 1.0 / 16384.0;
        }
        for x in [-1e30f32, -50.0, -9.0, 9.0, 50.0, 1e30, 0.0, -0.0, 1e-30] {
            let err = (erf(x) as f64 - erf_f64(x as f64)).abs();
            assert!(err <= ERF_MAX_ERROR as f64, "erf({x}) off by {err}");
        }
        eprintln!("erf: largest error {:.3e} at {}", worst.0, worst.1);
        assert!(
            worst.0 <= ERF_MAX_ERROR as f64,
            "erf off by {} at {}",
            worst.0,
            worst.1
        );
    }

    #[test]
    fn gelu_matches_the_f64_definition_and_keeps_non_finite_values() {
        let xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 / 4000.0).collect();
        let fast = gelu_slice(&xs);
        for (&x, &y) in xs.iter().zip(&fast) {
            let exact = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
            let bound = 0.5 * (x.abs() as f64) * ERF_MAX_ERROR as f64 + 1e-6 * exact.abs() + 1e-12;
            assert!(
                (y as f64 - exact).abs() <= bound,
                "gelu({x}) = {y}, not {exact}"
            );
        }
        let special = gelu_slice(&[f32::NAN, f32::INFINITY, 0.0]);
        assert!(special[0].is_nan());
        assert_eq!(special[1], f32::INFINITY);
        assert_eq!(special[2], 0.0);
    }

    #[test]
    fn tensor_op_equals_candle_gelu_erf_across_chunks() {
        let (rows, cols) = (3000, 17);
        assert!(rows * cols > 3 * crate::kernels::fastmath::task_len(1));
        let xs: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 200.0 - 5.0)
            .collect();
        let x = Tensor::from_vec(xs, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let ours = gelu_erf(&x.t().unwrap()).unwrap();
        let candle = x.t().unwrap().gelu_erf().unwrap();
        let diff = crate::testing::max_abs_diff(&ours, &candle);
        assert!(diff < 5e-6, "{diff}");
    }

    #[test]
    fn gradient_equals_candles_gelu_erf_gradient() {
        use crate::testing::{assert_same_gradients, spread};
        let n = 3 * crate::kernels::fastmath::task_len(1) + 5;
        let dev = candle_core::Device::Cpu;
        let x = candle_core::Var::from_vec(spread(n, 0, 12.0, -6.0), n, &dev).unwrap();
        let weights = Tensor::from_vec(spread(n, 5, 2.0, -1.0), n, &dev).unwrap();
        let (ours, candle) = (gelu_erf(&x).unwrap(), x.gelu_erf().unwrap());
        assert_same_gradients(ours, candle, &weights, &[("x", &x)], 2e-6);
    }
}
