//! `y = x Wᵀ + b` for a dense f32 weight as one candle op, with a backward pass.
//!
//! Built from candle ops, a linear layer is a reshape, a transpose, a product and a broadcast
//! addition, and candle's backward pass allocates and adds a zero gradient for every one of
//! them: about four activation-sized buffers per layer and step. This op is one node: its
//! forward pass is one gemm call that starts from the bias, and its backward pass is the two
//! products and a column sum.
//!
//! For inference, [`packed_linear`] runs the same product against a weight packed once
//! ([`PackedF32`]), with no backward pass.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};

use super::f32_gemm::{self, PackedF32};
use super::fastmath::contiguous_f32;

/// `x Wᵀ + b` over the last dimension of `x`, in one gemm call.
struct Linear;

/// `rows × out` outputs of `x [rows, in]` against `weight [out, in]`, each row starting from `bias`.
fn product(x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let out = bias.len();
    let inner = weight.len() / out.max(1);
    let rows = x.len() / inner.max(1);
    let mut dst: Vec<f32> = Vec::with_capacity(rows * out);
    for _ in 0..rows {
        dst.extend_from_slice(bias);
    }
    if rows == 0 || out == 0 || inner == 0 {
        return dst;
    }
    let threads = crate::threads::count();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the strides describe `dst` as rows × out, `x` as rows × inner and `weight`
    // transposed (inner × out), all inside their slices.
    unsafe {
        gemm(
            rows,
            out,
            inner,
            dst.as_mut_ptr(),
            1,
            out as isize,
            true,
            x.as_ptr(),
            1,
            inner as isize,
            weight.as_ptr(),
            inner as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    dst
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "axcompress-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, "linear")?;
        let weight = contiguous_f32(weight, weight_layout, "linear")?;
        let bias = contiguous_f32(bias, bias_layout, "linear")?;
        let shape = output_shape(x_layout, bias.len());
        Ok((CpuStorage::F32(product(x, weight, bias)), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inner) = weight.dims2()?;
        let rows = x.elem_count() / inner.max(1);
        let grad = grad.contiguous()?.reshape((rows, out))?;
        let x2 = x.reshape((rows, inner))?;
        let dx = grad.matmul(weight)?.reshape(x.shape())?;
        // A constant weight (analysis's gate gradients) needs no gradient of its own: its
        // product is as costly as `dx`'s.
        if !weight.track_op() {
            return Ok((Some(dx), None, None));
        }
        let dw = grad.t()?.matmul(&x2)?;
        let db = grad.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The shape of `x`'s layout with its last dimension (checked to exist) set to `out`.
fn output_shape(x_layout: &Layout, out: usize) -> Shape {
    let mut dims = x_layout.dims().to_vec();
    *dims.last_mut().expect("checked by `check_fit`") = out;
    Shape::from(dims)
}

/// An error unless `x [..., inner]` and `bias [out]` fit a weight of `(out, inner)`.
fn check_fit(x: &Tensor, (out, inner): (usize, usize), bias: &Tensor) -> Result<()> {
    if x.rank() == 0 || x.dims()[x.rank() - 1] != inner || bias.dims() != [out] {
        bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            (out, inner),
            bias.dims()
        );
    }
    Ok(())
}

/// `x Wᵀ + b` for `x [..., in]`, `weight [out, in]` and `bias [out]` (f32, CPU), with a
/// backward pass.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_fit(x, weight.dims2()?, bias)?;
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)
}

/// `x Wᵀ + b` against a packed `W`, for inference.
struct PackedLinear<'a>(&'a PackedF32);

impl CustomOp2 for PackedLinear<'_> {
    fn name(&self) -> &'static str {
        "axcompress-packed-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, "linear")?;
        let bias = contiguous_f32(bias, bias_layout, "linear")?;
        let (out, inner) = self.0.dims();
        let rows = x.len() / inner.max(1);
        let dst = f32_gemm::matmul_t_new(x, rows, self.0, Some(bias), crate::threads::count());
        Ok((CpuStorage::F32(dst), output_shape(x_layout, out)))
    }
}

/// `x Wᵀ + b` for `x [..., in]` against `weight`, packed from `[out, in]`, and `bias [out]` (f32,
/// CPU), for inference: the result has no backward pass. The same values as [`linear`] up to the
/// last bits (the sums are blocked differently; see [`f32_gemm`]).
pub fn packed_linear(x: &Tensor, weight: &PackedF32, bias: &Tensor) -> Result<Tensor> {
    check_fit(x, weight.dims(), bias)?;
    x.contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &PackedLinear(weight))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same_gradients, spread};
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_and_gradients_equal_candles_ops() {
        let dev = Device::Cpu;
        let (b, t, inner, out) = (3, 5, 19, 7);
        let x = Var::from_vec(spread(b * t * inner, 0, 2.0, -1.0), (b, t, inner), &dev).unwrap();
        let w = Var::from_vec(spread(out * inner, 3, 2.0, -1.0), (out, inner), &dev).unwrap();
        let bias = Var::from_vec(spread(out, 7, 2.0, -1.0), out, &dev).unwrap();
        let weights =
            Tensor::from_vec(spread(b * t * out, 11, 2.0, -1.0), (b, t, out), &dev).unwrap();
        let ours = linear(&x, &w, &bias).unwrap();
        let candle = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let candle = candle.broadcast_add(&bias).unwrap();
        assert!(crate::testing::max_abs_diff(&ours, &candle) < 1e-5);
        let vars = [("x", &x), ("weight", &w), ("bias", &bias)];
        assert_same_gradients(ours, candle, &weights, &vars, 1e-5);
    }

    #[test]
    fn the_packed_product_equals_the_gemm_product_within_rounding() {
        let dev = Device::Cpu;
        let (b, t, inner, out) = (2, 9, 40, 37);
        let x = Tensor::from_vec(spread(b * t * inner, 1, 2.0, -1.0), (b, t, inner), &dev).unwrap();
        let w = spread(out * inner, 4, 2.0, -1.0);
        let bias = Tensor::from_vec(spread(out, 9, 2.0, -1.0), out, &dev).unwrap();
        let packed = PackedF32::pack(&w, out, inner);
        let w = Tensor::from_vec(w, (out, inner), &dev).unwrap();
        let ours = packed_linear(&x, &packed, &bias).unwrap();
        assert_eq!(ours.dims(), &[b, t, out]);
        assert!(crate::testing::max_abs_diff(&ours, &linear(&x, &w, &bias).unwrap()) < 1e-5);
        assert!(packed_linear(&x.narrow(2, 0, 39).unwrap(), &packed, &bias).is_err());
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        assert!(linear(&zeros(&[2, 4]), &zeros(&[3, 5]), &zeros(&[3])).is_err());
        assert!(linear(&zeros(&[2, 5]), &zeros(&[3, 5]), &zeros(&[4])).is_err());
    }
}
