//! A candle op that maps the rows of a tensor's last dimension through a kernel, with a backward
//! pass that is another such kernel: the shape shared by GELU (rows of one element) and softmax.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::fastmath::contiguous_f32;

/// `(input, row length) → output` of the input's length.
pub type RowKernel = fn(&[f32], usize) -> Vec<f32>;

/// `(saved, output gradient, row length) → input gradient`.
pub type GradientKernel = fn(&[f32], &[f32], usize) -> Vec<f32>;

/// Which tensor the gradient kernel reads beside the output gradient.
#[derive(Debug, Clone, Copy)]
pub enum Saved {
    /// The op's input (e.g. GELU's `x`).
    Input,
    /// The op's output (e.g. softmax's `y`).
    Output,
}

/// A row-wise op and its gradient.
#[derive(Debug, Clone, Copy)]
pub struct RowOp {
    /// candle's name of the op; its gradient is named `<name>-backward`.
    pub name: &'static str,
    /// Rows of the last dimension (`true`), or every element alone (`false`).
    pub whole_rows: bool,
    /// The forward kernel.
    pub forward: RowKernel,
    /// What the gradient kernel reads.
    pub saved: Saved,
    /// The gradient kernel.
    pub gradient: GradientKernel,
}

impl RowOp {
    /// Applies the op to an f32 CPU tensor, with a backward pass.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self)
    }

    fn row_len(&self, layout: &Layout) -> usize {
        match self.whole_rows {
            true => layout.dims().last().copied().unwrap_or(1),
            false => 1,
        }
    }
}

impl CustomOp1 for RowOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name)?;
        let y = (self.forward)(x, self.row_len(layout));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = match self.saved {
            Saved::Input => arg,
            Saved::Output => res,
        };
        Ok(Some(
            saved.apply_op2_no_bwd(&grad.contiguous()?, &Gradient(*self))?,
        ))
    }
}

/// The gradient of a [`RowOp`] as a candle op on `(saved, output gradient)`.
struct Gradient(RowOp);

impl CustomOp2 for Gradient {
    fn name(&self) -> &'static str {
        "axcompress-row-op-backward"
    }

    fn cpu_fwd(
        &self,
        saved: &CpuStorage,
        saved_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let saved_values = contiguous_f32(saved, saved_layout, self.0.name)?;
        let grad = contiguous_f32(grad, grad_layout, self.0.name)?;
        let len = self.0.row_len(saved_layout);
        let dx = (self.0.gradient)(saved_values, grad, len);
        Ok((CpuStorage::F32(dx), saved_layout.shape().clone()))
    }
}
