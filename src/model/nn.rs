//! Small building blocks of the runtime: LayerNorm, with a fast inference path and a
//! differentiable path (an op that has a backward pass), and the FFN activations.

use candle_core::{Result, Tensor};

use super::config::Activation;
use crate::kernels::Ops;

/// LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale (gamma).
    pub weight: Tensor,
    /// Shift (beta).
    pub bias: Tensor,
    /// Epsilon added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Normalises `x` with `ops`.
    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        match ops {
            Ops::Differentiable => {
                crate::kernels::layer_norm::layer_norm(x, &self.weight, &self.bias, self.eps as f32)
            }
            Ops::Inference => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
        }
    }
}

/// Applies an FFN activation to a product's fresh output: exact GELU in place when nothing takes
/// a gradient through it, otherwise as [`activate`].
pub fn activate_owned(x: Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Gelu if !x.track_op() => crate::kernels::gelu::gelu_erf_owned(x),
        _ => activate(&x, activation),
    }
}

/// Applies an FFN activation (every one has a backward pass).
pub fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Gelu => crate::kernels::gelu::gelu_erf(x),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::softmax::softmax_last;
    use candle_core::Device;

    #[test]
    fn fast_and_differentiable_paths_agree() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f32, -1.2, 2.0, 0.1]], &dev).unwrap();
        let ln = LayerNorm {
            weight: Tensor::new(&[1f32, 0.5, 2., 1.], &dev).unwrap(),
            bias: Tensor::new(&[0f32, 0.1, 0., -0.2], &dev).unwrap(),
            eps: 1e-12,
        };
        let max_diff = |a: Tensor, b: Tensor| crate::testing::max_abs_diff(&a, &b);
        assert!(
            max_diff(
                ln.forward(&x, Ops::Differentiable).unwrap(),
                ln.forward(&x, Ops::Inference).unwrap()
            ) < 1e-5
        );
        assert!(
            max_diff(
                softmax_last(&x, Ops::Differentiable).unwrap(),
                softmax_last(&x, Ops::Inference).unwrap()
            ) < 1e-6
        );
    }
}
