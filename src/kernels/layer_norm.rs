//! LayerNorm over the last dimension with a fused backward pass, for the differentiable path.
//!
//! `candle_nn::ops::layer_norm_slow` builds LayerNorm from about ten tensor ops and its gradient
//! from as many again (5.6 ms forward and backward for one MiniLM LayerNorm at batch 32 × 44
//! tokens); the fused `layer_norm` has no backward pass. This op normalises each row in one pass,
//! and computes the gradients of the input, scale and shift in another.
//!
//! The scale and shift gradients are sums over rows: each task sums its rows, and the task sums
//! are added in task order, so the result does not depend on how threads share the work.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath::{contiguous_f32, par_rows, read_f32, task_len, vectorised};

/// Mean and `1/√(variance + eps)` of one row.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn normalise_row(x: &[f32], params: (&[f32], &[f32]), eps: f32, y: &mut [f32]) {
    let (mean, rstd) = moments(x, eps);
    let (scale, shift) = params;
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(scale).zip(shift) {
        *y = (x - mean) * rstd * w + b;
    }
}

/// Writes the input gradient of one row into `dx` and adds its scale and shift gradients to
/// `sums` (`[dw | db]`).
#[inline(always)]
fn backward_row(x: &[f32], g: &[f32], scale: &[f32], eps: f32, dx: &mut [f32], sums: &mut [f32]) {
    let n = x.len();
    let (mean, rstd) = moments(x, eps);
    let (mut mean_gw, mut mean_gw_xhat) = (0f32, 0f32);
    for ((&x, &g), &w) in x.iter().zip(g).zip(scale) {
        let xhat = (x - mean) * rstd;
        mean_gw += g * w;
        mean_gw_xhat += g * w * xhat;
    }
    mean_gw /= n as f32;
    mean_gw_xhat /= n as f32;
    let (dw, db) = sums.split_at_mut(n);
    for i in 0..n {
        let xhat = (x[i] - mean) * rstd;
        dx[i] = rstd * (g[i] * scale[i] - mean_gw - xhat * mean_gw_xhat);
        dw[i] += g[i] * xhat;
        db[i] += g[i];
    }
}

#[inline(always)]
fn normalise_rows(x: &[f32], params: (&[f32], &[f32]), eps: f32, y: &mut [f32]) {
    let len = params.0.len();
    for (y, x) in y.chunks_mut(len).zip(x.chunks(len)) {
        normalise_row(x, params, eps, y)
    }
}

#[inline(always)]
fn backward_rows(x: &[f32], g: &[f32], scale: &[f32], eps: f32, dx: &mut [f32], sums: &mut [f32]) {
    let len = scale.len();
    for ((dx, x), g) in dx.chunks_mut(len).zip(x.chunks(len)).zip(g.chunks(len)) {
        backward_row(x, g, scale, eps, dx, sums)
    }
}

/// LayerNorm of rows of `scale.len()` elements.
fn forward_slice(x: &[f32], scale: &[f32], shift: &[f32], eps: f32) -> Vec<f32> {
    par_rows(
        x,
        scale.len(),
        #[inline(always)]
        |x, y| normalise_rows(x, (scale, shift), eps, y),
    )
}

/// The gradients of input, scale and shift, packed as `[dx rows…, dw, db]` (one allocation).
fn backward_slice(x: &[f32], g: &[f32], scale: &[f32], eps: f32) -> Vec<f32> {
    let len = scale.len();
    let mut out = vec![0f32; x.len() + 2 * len];
    let (dx, sums) = out.split_at_mut(x.len());
    let task = task_len(len);
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(g.par_chunks(task)))
        .map(|(dx, (x, g))| {
            let mut sums = vec![0f32; 2 * len];
            vectorised(
                #[inline(always)]
                || backward_rows(x, g, scale, eps, dx, &mut sums),
            );
            sums
        })
        .collect();
    for p in &partial {
        sums.iter_mut().zip(p).for_each(|(s, p)| *s += p);
    }
    out
}

/// LayerNorm as a candle op on `(x, scale, shift)`.
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "axcompress-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
        shift: &CpuStorage,
        shift_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x_values = contiguous_f32(x, x_layout, "layer norm")?;
        let scale = contiguous_f32(scale, scale_layout, "layer norm")?;
        let shift = contiguous_f32(shift, shift_layout, "layer norm")?;
        let y = forward_slice(x_values, scale, shift, self.eps);
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = x.elem_count() / scale.elem_count().max(1);
        let grad = grad.contiguous()?;
        let packed = read_f32(x, |x| {
            read_f32(&grad, |g| {
                read_f32(scale, |s| backward_slice(x, g, s, self.eps))
            })
        })???;
        let packed = Tensor::from_vec(packed, (rows + 2, scale.elem_count()), x.device())?;
        Ok((
            Some(packed.narrow(0, 0, rows)?.reshape(x.shape())?),
            Some(packed.get(rows)?),
            Some(packed.get(rows + 1)?),
        ))
    }
}

/// LayerNorm over the last dimension of an f32 CPU tensor, with a backward pass.
pub fn layer_norm(x: &Tensor, scale: &Tensor, shift: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        LayerNormOp { eps },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same_gradients, spread};
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_gradients_equal_candles_composite_layer_norm() {
        // More rows than one task holds, and a width that is not a vector width.
        let (rows, len) = (700, 37);
        let dev = Device::Cpu;
        let x = Var::from_vec(spread(rows * len, 0, 6.7, -3.0), (7, 100, len), &dev).unwrap();
        let scale = Var::from_vec(spread(len, 3, 6.7, -3.0), len, &dev).unwrap();
        let shift = Var::from_vec(spread(len, 5, 6.7, -3.0), len, &dev).unwrap();
        let weights =
            Tensor::from_vec(spread(rows * len, 11, 6.7, -3.0), (7, 100, len), &dev).unwrap();
        let ours = layer_norm(&x, &scale, &shift, 1e-5).unwrap();
        let candle = candle_nn::ops::layer_norm_slow(&x, &scale, &shift, 1e-5).unwrap();
        assert!(crate::testing::max_abs_diff(&ours, &candle) < 1e-5);
        let vars = [("x", &x), ("scale", &scale), ("shift", &shift)];
        assert_same_gradients(ours, candle, &weights, &vars, 1e-5);
    }
}
