//! The trainable parameters of a model: every encoder and head tensor made a candle `Var` (a
//! copy, so the input model is never changed), named as in checkpoints, with the flag that says
//! whether weight decay applies (matrices yes; biases and LayerNorm no, as in BERT fine-tuning).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

use crate::model::linear::{Linear, Weight};
use crate::model::nn::LayerNorm;
use crate::model::Model;

/// One trainable tensor.
#[derive(Debug, Clone)]
pub struct Param {
    /// Checkpoint name, e.g. `layer.3.ffn.output.weight`.
    pub name: String,
    /// The variable the model's forward pass reads.
    pub var: Var,
    /// Whether decoupled weight decay applies.
    pub decay: bool,
    /// Entries held at zero (0) and trained (1), when some are removed.
    pub mask: Option<Tensor>,
}

/// A copy of a model whose encoder and head tensors are variables.
pub struct Trainable {
    /// The model; its forward pass records gradients for every parameter.
    pub model: Model,
    /// The parameters, in a fixed order (layers, then head).
    pub params: Vec<Param>,
}

impl Trainable {
    /// Makes every encoder-layer and head tensor of `model` a variable (the embeddings stay
    /// fixed: most of a small model's parameters are there, and recovery does not need them).
    /// Refuses quantized matrices: train before quantizing.
    pub fn new(model: &Model) -> Result<Self> {
        let mut params = Vec::new();
        let model = map_tensors(model, &mut |name, t, decay| {
            if t.elem_count() == 0 {
                return Ok(t.clone());
            }
            let var = Var::from_tensor(&t.copy()?)?;
            let tensor = var.as_tensor().clone();
            params.push(Param {
                name: name.to_string(),
                var,
                decay,
                mask: None,
            });
            Ok(tensor)
        })?;
        Ok(Trainable { model, params })
    }

    /// Holds the entries masked out in `masks` (by parameter name) at zero from now on.
    pub fn set_masks(&mut self, masks: &BTreeMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            if let Some(m) = masks.get(&p.name) {
                p.var.set(&(p.var.as_tensor().detach() * m)?)?;
                p.mask = Some(m.clone());
            }
        }
        Ok(())
    }

    /// Refuses a model that cannot be trained (quantized matrices).
    pub fn check(model: &Model) -> Result<()> {
        map_tensors(model, &mut |_, t, _| Ok(t.clone())).map(|_| ())
    }

    /// The trained model, its tensors detached from the variables (plain, fast inference).
    pub fn finish(&self) -> Result<Model> {
        map_tensors(&self.model, &mut |_, t, _| Ok(t.detach().copy()?))
    }

    /// A copy of every parameter's current value, in order (a snapshot to return to).
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        self.params
            .iter()
            .map(|p| Ok(p.var.as_tensor().copy()?))
            .collect()
    }

    /// Sets every parameter from `values` (a [`Self::snapshot`] or a checkpoint), in order.
    pub fn restore(&self, values: &[Tensor]) -> Result<()> {
        if values.len() != self.params.len() {
            bail!(
                "{} saved tensors for {} parameters",
                values.len(),
                self.params.len()
            );
        }
        for (p, v) in self.params.iter().zip(values) {
            p.var.set(v)?;
        }
        Ok(())
    }
}

/// A copy of `model` with `f(name, tensor, decays)` applied to every encoder-layer and head
/// tensor, in the order of [`Trainable::params`]. Refuses quantized matrices.
fn map_tensors(
    model: &Model,
    f: &mut impl FnMut(&str, &Tensor, bool) -> Result<Tensor>,
) -> Result<Model> {
    let mut out = model.clone();
    for (i, layer) in out.layers.iter_mut().enumerate() {
        if let Some(a) = layer.attention.as_mut() {
            map_linear(&format!("layer.{i}.attention.qkv"), &mut a.qkv, f)?;
            map_linear(&format!("layer.{i}.attention.output"), &mut a.output, f)?;
            map_norm(&format!("layer.{i}.attention.norm"), &mut a.norm, f)?;
        }
        if let Some(ffn) = layer.ffn.as_mut() {
            map_linear(
                &format!("layer.{i}.ffn.intermediate"),
                &mut ffn.intermediate,
                f,
            )?;
            map_linear(&format!("layer.{i}.ffn.output"), &mut ffn.output, f)?;
            map_norm(&format!("layer.{i}.ffn.norm"), &mut ffn.norm, f)?;
        }
    }
    map_linear("head.dense", &mut out.head.dense, f)?;
    map_linear("head.out", &mut out.head.out, f)?;
    Ok(out)
}

fn map_linear(
    name: &str,
    linear: &mut Linear,
    f: &mut impl FnMut(&str, &Tensor, bool) -> Result<Tensor>,
) -> Result<()> {
    let Weight::Dense(w) = &linear.weight else {
        bail!("{name} is quantized: recovery training needs float weights, so quantize after it");
    };
    linear.weight = Weight::Dense(f(&format!("{name}.weight"), w, true)?);
    linear.bias = f(&format!("{name}.bias"), &linear.bias, false)?;
    Ok(())
}

fn map_norm(
    name: &str,
    norm: &mut LayerNorm,
    f: &mut impl FnMut(&str, &Tensor, bool) -> Result<Tensor>,
) -> Result<()> {
    norm.weight = f(&format!("{name}.weight"), &norm.weight, false)?;
    norm.bias = f(&format!("{name}.bias"), &norm.bias, false)?;
    Ok(())
}
