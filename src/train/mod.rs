//! Training in candle, for recovery after a pass and for block-structured pruning: the
//! trainable parameters ([`params`]), AdamW with clipping ([`optimizer`]), the learning-rate
//! schedule ([`schedule`]), the objectives — task loss and distillation from the original model
//! ([`loss`]), token replacement for distillation ([`augment`]) — and the loop that keeps the best parameters on the selection split and
//! checkpoints them for `--resume` ([`fit`], [`checkpoint`]).
//!
//! Training runs on the differentiable path of the runtime (`layer_norm_slow`, `ops::softmax`,
//! candle's GELU): the fused inference kernels have no backward pass.

pub mod augment;
pub mod checkpoint;
pub mod fit;
pub mod lasso;
pub mod loss;
pub mod optimizer;
pub mod params;
pub mod schedule;
