//! Training objectives: the task loss, and distillation from a teacher (the original model) — KL
//! divergence of the logits at a temperature (squared error for regression), plus optionally
//! the squared error of the final hidden states over real tokens.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use crate::analyze::taylor::batch_loss_sum;
use crate::kernels::Ops;
use crate::model::encoder::RunOptions;
use crate::model::Model;
use crate::scoring::batch::ScoringBatch;

/// What the student is trained to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    /// Weight of the task loss on the gold labels.
    pub task_weight: f64,
    /// Weight of the distillation loss on the teacher's logits (0: no teacher is run).
    pub distill_weight: f64,
    /// Softmax temperature of the distillation loss (scaled by T² as in Hinton et al.).
    pub temperature: f64,
    /// Weight of the squared error of the final hidden states (0: not computed).
    pub hidden_weight: f64,
}

impl Objective {
    /// Whether the teacher has to be run.
    pub fn needs_teacher(&self) -> bool {
        self.distill_weight > 0.0 || self.hidden_weight > 0.0
    }

    /// The loss of `student` on `batch` (a scalar with gradients to the student's variables).
    pub fn loss(&self, student: &Model, teacher: &Model, batch: &ScoringBatch) -> Result<Tensor> {
        self.loss_of_part(student, teacher, batch, BatchSize::of(batch)?)
    }

    /// The share of the loss of a batch of size `whole` that its part `batch` contributes: its
    /// sums over examples and tokens divided by the whole batch's counts, so that the parts' losses
    /// (and gradients) add up to the whole batch's.
    pub fn loss_of_part(
        &self,
        student: &Model,
        teacher: &Model,
        batch: &ScoringBatch,
        whole: BatchSize,
    ) -> Result<Tensor> {
        let diff = RunOptions {
            gates: None,
            ops: Ops::Differentiable,
        };
        let hidden = student.encode(&batch.inputs, diff)?;
        let logits = student.classify(&hidden)?;
        let rows = whole.rows;
        let mut total = (batch_loss_sum(&logits, batch)? * (self.task_weight / rows))?;
        if !self.needs_teacher() {
            return Ok(total);
        }
        let fast = RunOptions::default();
        let (teacher_logits, teacher_hidden) = if self.hidden_weight > 0.0 {
            let h = teacher.encode(&batch.inputs, fast)?;
            (teacher.classify(&h)?, Some(h))
        } else {
            (teacher.forward(&batch.inputs, fast)?, None)
        };
        if self.distill_weight > 0.0 {
            let kd = distillation_over(
                &logits,
                &teacher_logits,
                (self.temperature, rows),
                batch.regression,
            )?;
            total = (total + (kd * self.distill_weight)?)?;
        }
        if let Some(th) = teacher_hidden {
            let mse = hidden_error(&hidden, &th, &batch.inputs.mask_bias, whole.tokens)?;
            total = (total + (mse * self.hidden_weight)?)?;
        }
        Ok(total)
    }
}

/// The examples and real tokens of a batch: what its losses are means over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSize {
    /// Examples.
    pub rows: f64,
    /// Real tokens (mask bias 0).
    pub tokens: f64,
}

impl BatchSize {
    /// The size of `batch`.
    pub fn of(batch: &ScoringBatch) -> Result<BatchSize> {
        let bias = &batch.inputs.mask_bias;
        let rows = batch.examples.len();
        let real = bias.flatten_all()?.eq(0f32)?.to_dtype(DType::F32)?;
        Ok(BatchSize {
            rows: rows as f64,
            tokens: real.sum_all()?.to_scalar::<f32>()? as f64,
        })
    }

    /// The size of the batches `parts` together.
    pub fn sum(parts: &[BatchSize]) -> BatchSize {
        BatchSize {
            rows: parts.iter().map(|p| p.rows).sum(),
            tokens: parts.iter().map(|p| p.tokens).sum(),
        }
    }
}

/// `T² · mean KL(softmax(t/T) ‖ softmax(s/T))` over the batch; squared error for regression.
pub fn distillation(
    student: &Tensor,
    teacher: &Tensor,
    t: f64,
    regression: bool,
) -> Result<Tensor> {
    distillation_over(student, teacher, (t, student.dim(0)? as f64), regression)
}

/// [`distillation`] at temperature `t` with its sum over examples divided by `rows`.
fn distillation_over(
    student: &Tensor,
    teacher: &Tensor,
    (t, rows): (f64, f64),
    regression: bool,
) -> Result<Tensor> {
    let teacher = teacher.detach();
    if regression {
        return Ok(((student - teacher)?.sqr()?.sum_all()? / rows)?);
    }
    let log_p_s = candle_nn::ops::log_softmax(&(student / t)?, D::Minus1)?;
    let log_p_t = candle_nn::ops::log_softmax(&(teacher / t)?, D::Minus1)?;
    let kl = (log_p_t.exp()? * (&log_p_t - log_p_s)?)?.sum_all()?;
    Ok((kl * (t * t / rows))?)
}

/// The squared error per hidden unit summed over real tokens (mask bias 0), divided by `tokens`
/// (the batch's real tokens: a mean).
fn hidden_error(
    student: &Tensor,
    teacher: &Tensor,
    mask_bias: &Tensor,
    tokens: f64,
) -> Result<Tensor> {
    let (b, t, h) = student.dims3()?;
    let mask = mask_bias.reshape((b, t))?.eq(0f32)?.to_dtype(DType::F32)?;
    let per_token = (student - teacher.detach())?.sqr()?.sum(D::Minus1)?;
    Ok(((per_token * mask)?.sum_all()? / (tokens * h as f64).max(1.0))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn distillation_is_zero_on_equal_logits_and_matches_kl_by_hand() {
        let dev = Device::Cpu;
        let s = Tensor::new(&[[1f32, 0.0]], &dev).unwrap();
        let same = distillation(&s, &s, 2.0, false).unwrap();
        assert!(same.to_scalar::<f32>().unwrap().abs() < 1e-7);
        let t = Tensor::new(&[[0f32, 1.0]], &dev).unwrap();
        let got = distillation(&s, &t, 2.0, false).unwrap();
        let softmax = |a: f64, b: f64| {
            let (ea, eb) = ((a / 2.0).exp(), (b / 2.0).exp());
            [ea / (ea + eb), eb / (ea + eb)]
        };
        let (ps, pt) = (softmax(1.0, 0.0), softmax(0.0, 1.0));
        let want = 4.0 * (0..2).map(|i| pt[i] * (pt[i] / ps[i]).ln()).sum::<f64>();
        assert!((got.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
    }
}
