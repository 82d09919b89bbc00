//! Softmax over the last dimension with a fused backward pass, for the differentiable path.
//!
//! `candle_nn::ops::softmax` builds the softmax from five tensor ops, and its gradient from as
//! many again (17 ms forward and backward for one MiniLM layer's scores at batch 32 × 44
//! tokens); the fused `softmax_last_dim` has no backward pass. This op computes each row in one
//! pass and its gradient, `y ⊙ (g − Σ g ⊙ y)`, in another.

use candle_core::{Result, Tensor};

use super::fastmath::{exp_nonpositive, par_rows, par_rows2};
use super::row_op::{RowOp, Saved};
use super::Ops;

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

#[inline(always)]
fn softmax_rows(x: &[f32], y: &mut [f32], len: usize) {
    for (y, x) in y.chunks_mut(len).zip(x.chunks(len)) {
        softmax_row(x, y)
    }
}

#[inline(always)]
fn softmax_backward_rows(y: &[f32], g: &[f32], out: &mut [f32], len: usize) {
    for ((o, y), g) in out.chunks_mut(len).zip(y.chunks(len)).zip(g.chunks(len)) {
        softmax_backward_row(y, g, o)
    }
}

/// Softmax of rows of `len` elements.
fn softmax_slice(x: &[f32], len: usize) -> Vec<f32> {
    par_rows(
        x,
        len,
        #[inline(always)]
        |x, y| softmax_rows(x, y, len),
    )
}

/// The softmax's gradient for outputs `y` and output gradients `g`, rows of `len` elements.
fn softmax_backward_slice(y: &[f32], g: &[f32], len: usize) -> Vec<f32> {
    par_rows2(
        y,
        g,
        len,
        #[inline(always)]
        |y, g, o| softmax_backward_rows(y, g, o, len),
    )
}

/// Softmax over the last dimension of an f32 CPU tensor, with a backward pass.
pub fn fused_softmax_last(x: &Tensor) -> Result<Tensor> {
    RowOp {
        name: "axcompress-softmax-last",
        whole_rows: true,
        forward: softmax_slice,
        saved: Saved::Output,
        gradient: softmax_backward_slice,
    }
    .apply(x)
}

/// Softmax over the last dimension: the fused op with a backward pass, or candle's inference op.
pub fn softmax_last(x: &Tensor, ops: Ops) -> Result<Tensor> {
    match ops {
        Ops::Differentiable => fused_softmax_last(x),
        Ops::Inference => candle_nn::ops::softmax_last_dim(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same_gradients, spread};
    use candle_core::{Device, Var, D};

    #[test]
    fn forward_and_gradient_equal_candles_composite_softmax() {
        // More rows than one task holds, and a row length that is not a vector width.
        let shape = (40, 30, 37);
        let n = 40 * 30 * 37;
        let x = Var::from_vec(spread(n, 0, 10.0, -5.0), shape, &Device::Cpu).unwrap();
        let weights = Tensor::from_vec(spread(n, 7, 2.0, -1.0), shape, &Device::Cpu).unwrap();
        let ours = fused_softmax_last(&x).unwrap();
        let candle = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
        assert!(crate::testing::max_abs_diff(&ours, &candle) < 1e-6);
        assert_same_gradients(ours, candle, &weights, &[("x", &x)], 1e-6);
    }

    #[test]
    fn a_masked_position_gets_no_weight_and_no_gradient() {
        let x = Var::new(&[[0.5f32, -1e9, 2.0]], &Device::Cpu).unwrap();
        let y = fused_softmax_last(&x).unwrap();
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
