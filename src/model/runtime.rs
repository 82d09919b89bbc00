//! How a loaded model runs, chosen once per command from its flags and carried by the model
//! (and by every model derived from it), instead of process-wide settings.

use crate::formats::quant::Execution;

/// How a loaded model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Runtime {
    /// How quantized matrices multiply (`--execution`).
    pub execution: Execution,
    /// Load checkpoints whose float tensors hold NaN or ±Inf (`--allow-nonfinite`).
    pub nonfinite: Nonfinite,
}

/// Whether a checkpoint may hold NaN or ±Inf in its float tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Nonfinite {
    /// Refuse it, naming the tensor (the default).
    #[default]
    Refuse,
    /// Load it (`--allow-nonfinite`); a run still stops if such values reach a loss or metric.
    Allow,
}
