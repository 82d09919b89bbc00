//! The learning-rate schedule of BERT fine-tuning: linear warm-up from 0 to the peak, then linear
//! decay to 0 at the last step.

/// Linear warm-up and decay over a known number of steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    /// Learning rate at the end of the warm-up.
    pub peak: f64,
    /// Steps of warm-up.
    pub warmup: usize,
    /// Steps in the whole run.
    pub total: usize,
}

impl LinearSchedule {
    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        let s = step as f64 + 1.0;
        if step < self.warmup {
            return self.peak * s / self.warmup as f64;
        }
        let left = self.total.saturating_sub(step) as f64;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        self.peak * (left / span).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        let s = LinearSchedule {
            peak: 1.0,
            warmup: 4,
            total: 14,
        };
        let lr: Vec<f64> = (0..14).map(|t| s.at(t)).collect();
        assert_eq!(&lr[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lr[4], 1.0);
        assert!((lr[9] - 0.5).abs() < 1e-12);
        assert!((lr[13] - 0.1).abs() < 1e-12);
        assert!(lr.windows(2).skip(4).all(|w| w[1] < w[0]));
    }
}
