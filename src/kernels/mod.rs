//! The compute kernels the runtime's forward and backward passes call: SIMD int8 GEMM, the dense
//! float product, fused and sparse (approximate) attention, GELU, softmax and LayerNorm, with the
//! shared row helpers they are built on. They know nothing of models: they take slices and
//! tensors, and the model in [`crate::model`] calls them.

pub mod attention_mode;
pub mod dense_product;
pub mod f32_gemm;
pub mod fastmath;
pub mod fused_attention;
pub mod gelu;
pub mod int4_gemm;
pub mod int8_gemm;
pub mod layer_norm;
pub mod row_op;
pub mod row_quant;
pub mod softmax;
pub mod sparse_attention;
pub mod spin_pool;

/// Which ops a forward pass runs: the fast inference ops, or ops with a backward pass (needed for
/// gradients; slower).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ops {
    /// Inference only.
    #[default]
    Inference,
    /// Ops with a backward pass.
    Differentiable,
}
