//! AdamW (Loshchilov & Hutter) with decoupled weight decay and global gradient-norm clipping,
//! as PyTorch's `AdamW` and `clip_grad_norm_` compute them. Its state (step and moments) is
//! plain tensors, so a checkpoint can hold it and a resumed run continues exactly.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::params::Param;

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamSettings {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied to parameters whose `decay` flag is set.
    pub weight_decay: f64,
    /// Largest global L2 norm of the gradients; larger gradients are scaled down to it.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamSettings {
    /// BERT fine-tuning defaults: β = (0.9, 0.999), ε = 1e-8, decay 0.01, clipping at 1.0.
    fn default() -> Self {
        AdamSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
        }
    }
}

/// AdamW over a fixed list of parameters.
pub struct AdamW {
    /// Hyper-parameters.
    pub settings: AdamSettings,
    /// Steps taken.
    pub step: usize,
    /// First and second moments, one pair per parameter, in parameter order.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    /// A fresh optimizer (zero moments) for `params`.
    pub fn new(params: &[Param], settings: AdamSettings) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                let z = p.var.as_tensor().zeros_like()?;
                Ok((z.clone(), z))
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            settings,
            step: 0,
            moments,
        })
    }

    /// One update of every parameter from `grads` at learning rate `lr`. Returns the global
    /// gradient norm before clipping. Parameters without a gradient are left as they are.
    pub fn step(&mut self, params: &[Param], grads: &GradStore, lr: f64) -> Result<f64> {
        let s = self.settings;
        let norm = global_norm(params, grads)?;
        let clip = match s.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - s.beta1.powi(t), 1.0 - s.beta2.powi(t));
        for (p, (m, v)) in params.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let mut g = (g.detach() * clip)?;
            if let Some(mask) = &p.mask {
                g = (g * mask)?;
            }
            *m = ((&*m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
            *v = ((&*v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + s.eps)?)?;
            let theta = p.var.as_tensor().detach();
            let decayed = match p.decay {
                true => (&theta * (1.0 - lr * s.weight_decay))?,
                false => theta,
            };
            let mut next = (decayed - (update * lr)?)?;
            if let Some(mask) = &p.mask {
                next = (next * mask)?;
            }
            p.var.set(&next)?;
        }
        Ok(norm)
    }
}

/// The L2 norm of all gradients of `params` together.
fn global_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    let mut sum = 0.0;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn param(values: &[f32], decay: bool) -> Param {
        let t = Tensor::new(values, &Device::Cpu).unwrap();
        Param {
            name: "w".into(),
            var: Var::from_tensor(&t).unwrap(),
            decay,
            mask: None,
            quantized: None,
        }
    }

    /// Two steps of `loss = Σ w²` against the AdamW update computed by hand (PyTorch's formula).
    #[test]
    fn two_steps_match_the_adamw_formula() {
        let p = param(&[1.0, -2.0], true);
        let settings = AdamSettings {
            max_grad_norm: None,
            ..AdamSettings::default()
        };
        let mut opt = AdamW::new(std::slice::from_ref(&p), settings).unwrap();
        let (lr, s) = (0.1, settings);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            let grads = p.var.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(std::slice::from_ref(&p), &grads.backward().unwrap(), lr)
                .unwrap();
            for i in 0..2 {
                let g = 2.0 * want[i];
                m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g;
                v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g * g;
                let mh = m[i] / (1.0 - s.beta1.powi(t));
                let vh = v[i] / (1.0 - s.beta2.powi(t));
                want[i] = want[i] * (1.0 - lr * s.weight_decay) - lr * mh / (vh.sqrt() + s.eps);
            }
        }
        let got = p.var.as_tensor().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn clipping_scales_the_gradient_to_the_maximum_norm() {
        let p = param(&[3.0, 4.0], false);
        let settings = AdamSettings {
            max_grad_norm: Some(1.0),
            ..AdamSettings::default()
        };
        let mut opt = AdamW::new(std::slice::from_ref(&p), settings).unwrap();
        // loss = w·(3,4)/… : gradient (3, 4), norm 5.
        let c = Tensor::new(&[3f32, 4.], &Device::Cpu).unwrap();
        let loss = (p.var.as_tensor() * &c).unwrap().sum_all().unwrap();
        let norm = opt
            .step(std::slice::from_ref(&p), &loss.backward().unwrap(), 0.0)
            .unwrap();
        assert!((norm - 5.0).abs() < 1e-5);
        let m = opt.moments[0].0.to_vec1::<f32>().unwrap();
        let want = [0.1 * 0.6, 0.1 * 0.8];
        for (a, b) in m.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
