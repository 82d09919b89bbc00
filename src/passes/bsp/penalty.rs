//! The reweighted group-lasso penalty of BSP's first phase over every target matrix.

use std::cell::RefCell;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::BspSettings;
use crate::train::lasso::GroupPenalty;
use crate::train::params::Trainable;

/// The group-lasso penalty over every target matrix, reweighted at each evaluation point.
pub struct LassoPenalty<'a> {
    settings: &'a BspSettings,
    /// Steps between refreshes of γ (the evaluation interval of the phase).
    every: usize,
    /// (parameter index, penalty), built at the first step.
    terms: RefCell<Vec<(usize, GroupPenalty)>>,
}

impl<'a> LassoPenalty<'a> {
    /// The penalty of a lasso phase over `examples` training examples.
    pub fn new(settings: &'a BspSettings, examples: usize, batch_size: usize) -> Self {
        let total = examples.div_ceil(batch_size) * settings.lasso.epochs;
        LassoPenalty {
            settings,
            every: total.div_ceil(settings.lasso.evaluations.max(1)),
            terms: RefCell::new(Vec::new()),
        }
    }

    /// The penalty at `step`; γ is refreshed at the first call and every evaluation interval.
    pub fn value(&self, t: &Trainable, step: usize) -> Result<Tensor> {
        let mut terms = self.terms.borrow_mut();
        if terms.is_empty() || step.is_multiple_of(self.every) {
            *terms = self.reweighted(t)?;
        }
        let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        for (i, p) in terms.iter() {
            total = (total + p.value(t.params[*i].var.as_tensor())?)?;
        }
        Ok(total)
    }

    fn reweighted(&self, t: &Trainable) -> Result<Vec<(usize, GroupPenalty)>> {
        let s = self.settings;
        let wanted: Vec<String> = (0..t.model.num_layers())
            .flat_map(|l| s.matrices.iter().map(move |m| m.param(l)))
            .collect();
        t.params
            .iter()
            .enumerate()
            .filter(|(_, p)| wanted.contains(&p.name))
            .map(|(i, p)| {
                Ok((
                    i,
                    GroupPenalty::new(p.var.as_tensor(), s.grouping, s.lambda)?,
                ))
            })
            .collect()
    }
}
