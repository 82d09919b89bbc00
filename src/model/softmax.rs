//! Softmax over the last dimension with a fused backward pass, for the differentiable path.
//!
//! `candle_nn::ops::softmax` builds the softmax from five tensor ops, and its gradient from as
//! many again (17 ms forward and backward for one MiniLM layer's scores at batch 32 × 44
//! tokens); the fused `softmax_last_dim` has no backward pass. This op computes each row in one
//! pass and its gradient, `y ⊙ (g − Σ g ⊙ y)`, in another.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath::{contiguous_f32, exp_nonpositive, vectorised};

/// Elements per parallel task (whole rows are handed out).
const TASK_ELEMENTS: usize = 16384;

/// Rows of `len` elements per task.
fn rows_per_task(len: usize) -> usize {
    (TASK_ELEMENTS / len.max(1)).max(1) * len.max(1)
}

#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (y, &x) in y.iter_mut().zip(x) {
        *y = exp_nonpositive(x - max);
        sum += *y;
    }
    let inv = 1.0 / sum;
    y.iter_mut().for_each(|y| *y *= inv);
}

#[inline(always)]
fn softmax_backward_row(y: &[f32], g: &[f32], out: &mut [f32]) {
    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
        *o = y * (g - dot);
    }
}

/// Inlined into [`vectorised`]'s wrappers, so that it compiles for their vector unit.
#[inline(always)]
fn softmax_rows(x: &[f32], y: &mut [f32], len: usize) {
    for (y, x) in y.chunks_mut(len).zip(x.chunks(len)) {
        softmax_row(x, y)
    }
}

/// Inlined into [`vectorised`]'s wrappers, so that it compiles for their vector unit.
#[inline(always)]
fn softmax_backward_rows(y: &[f32], g: &[f32], out: &mut [f32], len: usize) {
    for ((o, y), g) in out.chunks_mut(len).zip(y.chunks(len)).zip(g.chunks(len)) {
        softmax_backward_row(y, g, o)
    }
}

/// Softmax of rows of `len` elements.
fn softmax_slice(x: &[f32], len: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let task = rows_per_task(len);
    out.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .for_each(|(y, x)| {
            vectorised(
                #[inline(always)]
                || softmax_rows(x, y, len),
            )
        });
    out
}

/// The softmax's gradient for outputs `y` and output gradients `g`, rows of `len` elements.
fn softmax_backward_slice(y: &[f32], g: &[f32], len: usize) -> Vec<f32> {
    let mut out = vec![0f32; y.len()];
    let task = rows_per_task(len);
    out.par_chunks_mut(task)
        .zip(y.par_chunks(task).zip(g.par_chunks(task)))
        .for_each(|(o, (y, g))| {
            vectorised(
                #[inline(always)]
                || softmax_backward_rows(y, g, o, len),
            )
        });
    out
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1)
}

struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "axcompress-softmax-last"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "softmax")?;
        let y = softmax_slice(x, last_dim(layout));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// The softmax's gradient as a candle op on `(y, grad)`.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "axcompress-softmax-last-backward"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        y_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y_values = contiguous_f32(y, y_layout, "softmax backward")?;
        let grad = contiguous_f32(grad, grad_layout, "softmax backward")?;
        let out = softmax_backward_slice(y_values, grad, last_dim(y_layout));
        Ok((CpuStorage::F32(out), y_layout.shape().clone()))
    }
}

/// Softmax over the last dimension of an f32 CPU tensor, with a backward pass.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxLast)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn input(shape: (usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1001) as f32 / 100.0 - 5.0)
            .collect();
        Tensor::from_vec(xs, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_and_gradient_equal_candles_composite_softmax() {
        // More rows than one task holds, and a row length that is not a vector width.
        let x = Var::from_tensor(&input((40, 30, 37))).unwrap();
        let weights = input((40, 30, 37)).sin().unwrap();
        let ours = softmax_last(&x).unwrap();
        let candle = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
        assert!(crate::testing::max_abs_diff(&ours, &candle) < 1e-6);
        let grad = |y: Tensor| {
            let loss = (y * &weights).unwrap().sum_all().unwrap();
            loss.backward().unwrap().get(&x).unwrap().clone()
        };
        let diff = crate::testing::max_abs_diff(&grad(ours), &grad(candle));
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn a_masked_position_gets_no_weight_and_no_gradient() {
        let x = Var::new(&[[0.5f32, -1e9, 2.0]], &Device::Cpu).unwrap();
        let y = softmax_last(&x).unwrap();
        let values = y.to_vec2::<f32>().unwrap();
        assert!(values[0][1] < 1e-30, "{}", values[0][1]);
        let weights = Tensor::new(&[[1f32, 5.0, -2.0]], &Device::Cpu).unwrap();
        let grads = (y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let masked = grads.get(&x).unwrap().to_vec2::<f32>().unwrap()[0][1];
        assert!(masked.abs() < 1e-30, "{masked}");
    }
}
