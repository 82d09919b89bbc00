//! Small building blocks of the runtime: dense layers, LayerNorm and activations, each with a
//! fast inference path and a differentiable path (ops that have a backward pass).

use candle_core::{Result, Tensor, D};

use super::config::Activation;

/// A dense layer `y = x Wᵀ + b` with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight, `[out, in]`.
    pub weight: Tensor,
    /// Bias, `[out]`.
    pub bias: Tensor,
}

impl Linear {
    /// Applies the layer to `x` of shape `[..., in]` as one 2-D matrix product.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let rows = x.elem_count() / inner.max(1);
        let out = x
            .reshape((rows, inner))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-scalar input") = self.out_features();
        out.reshape(out_dims)
    }

    /// Applies only output rows `start..start + len` of the layer (a slice of a fused projection).
    pub fn forward_rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        Linear {
            weight: self.weight.narrow(0, start, len)?,
            bias: self.bias.narrow(0, start, len)?,
        }
        .forward(x)
    }

    /// Number of outputs.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

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
    /// Normalises `x`; `differentiable` selects the op with a backward pass.
    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension; `differentiable` selects the op with a backward pass.
pub fn softmax_last(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Applies an FFN activation.
pub fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn linear_matches_manual_product() {
        let dev = Device::Cpu;
        let lin = Linear {
            weight: Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap(),
            bias: Tensor::new(&[0.5f32, 0., -1.], &dev).unwrap(),
        };
        let x = Tensor::new(&[[[1f32, 1.]], [[0., 2.]]], &dev).unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 1, 3]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![3.5, 7., 10., 4.5, 8., 11.]);
    }

    #[test]
    fn fast_and_differentiable_paths_agree() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f32, -1.2, 2.0, 0.1]], &dev).unwrap();
        let ln = LayerNorm {
            weight: Tensor::new(&[1f32, 0.5, 2., 1.], &dev).unwrap(),
            bias: Tensor::new(&[0f32, 0.1, 0., -0.2], &dev).unwrap(),
            eps: 1e-12,
        };
        let max_diff = |a: Tensor, b: Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(
            max_diff(
                ln.forward(&x, true).unwrap(),
                ln.forward(&x, false).unwrap()
            ) < 1e-5
        );
        assert!(
            max_diff(
                softmax_last(&x, true).unwrap(),
                softmax_last(&x, false).unwrap()
            ) < 1e-6
        );
    }
}
