//! The trainable parameters of a model: every encoder and head tensor made a candle `Var` (a
//! copy, so the input model is never changed), named as in checkpoints, with the flag that says
//! whether weight decay applies (matrices yes; biases and LayerNorm no, as in BERT fine-tuning).
//!
//! A quantized matrix is trained **quantization-aware**: its variable is a float master (the
//! dequantized codes to start with); each training forward multiplies by the master quantized
//! again with the same quantizer ([`Codes::quantize`]), and the gradient passes the rounding
//! straight through to the master (`w + (q(w) − w).detach()`). The trained model holds the
//! master's codes, so what was trained is what is exported.

use std::borrow::Cow;
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

use crate::formats::quant::{Bits, Codes, Execution, QuantMatrix};
use crate::model::linear::{Linear, Stack, Weight};
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
    /// The precision a quantized matrix keeps: trained through its quantizer (module docs).
    pub quantized: Option<Quantized>,
}

/// How a quantized matrix is held: whole, or as parts stacked along its rows (a fused
/// query/key/value projection), each with its precision, or float.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantized {
    /// The parts, top to bottom.
    pub parts: Vec<Part>,
}

/// Some rows of a quantized matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// How many rows.
    pub rows: usize,
    /// Their precision and how they run; `None` for float rows.
    pub precision: Option<(Bits, Execution)>,
}

impl Quantized {
    /// The float value of `weight` (dequantized) and its precision (`None` for a dense matrix);
    /// an error for what cannot be trained (striped matrices, nested stacks).
    fn of(name: &str, weight: &Weight) -> Result<(Tensor, Option<Quantized>)> {
        let part = |w: &Weight| -> Result<(Part, Tensor)> {
            match w {
                Weight::Dense(t) => Ok((
                    Part {
                        rows: t.dims()[0],
                        precision: None,
                    },
                    t.clone(),
                )),
                Weight::Quantized(q) => Ok((
                    Part {
                        rows: q.dims().0,
                        precision: Some((q.bits(), q.execution)),
                    },
                    q.dequantize()?,
                )),
                _ => bail!(
                    "{name} is striped: training needs float or quantized matrices, so train before block-structured pruning"
                ),
            }
        };
        let (parts, values): (Vec<Part>, Vec<Tensor>) = match weight {
            Weight::Dense(t) => return Ok((t.clone(), None)),
            Weight::Stacked(stack) => stack.parts.iter().map(part).collect::<Result<_>>()?,
            other => vec![part(other)?].into_iter().unzip(),
        };
        Ok((Tensor::cat(&values, 0)?, Some(Quantized { parts })))
    }

    /// Each part's rows of `w`, with the part.
    fn split<'a>(&'a self, w: &'a Tensor) -> impl Iterator<Item = Result<(Part, Tensor)>> + 'a {
        let starts = self.parts.iter().scan(0, |at, p| {
            *at += p.rows;
            Some(*at - p.rows)
        });
        self.parts
            .iter()
            .zip(starts)
            .map(move |(p, start)| Ok((*p, w.narrow(0, start, p.rows)?)))
    }

    /// `w` quantized and dequantized in the forward pass, part by part, the identity in the
    /// backward pass (straight-through): `w + (q(w) − w).detach()`, where `q(w)` is what
    /// [`Self::weight`] holds.
    fn fake(&self, w: &Tensor) -> Result<Tensor> {
        let q = self.weight(w)?.to_dense()?;
        Ok((w + (q - w.detach())?.detach())?)
    }

    /// The master `w` as the matrix the trained model holds: each part's codes (or float rows),
    /// stacked as they were.
    fn weight(&self, w: &Tensor) -> Result<Weight> {
        let mut parts: Vec<Weight> = self
            .split(w)
            .map(|part| {
                let (part, rows) = part?;
                Ok(match part.precision {
                    Some((bits, execution)) => {
                        let codes = Codes::from_tensor(&rows.detach(), bits)?;
                        Weight::Quantized(QuantMatrix::with_execution(codes, execution)?)
                    }
                    None => Weight::Dense(rows.detach().copy()?),
                })
            })
            .collect::<Result<_>>()?;
        Ok(match parts.len() {
            1 => parts.remove(0),
            _ => Weight::Stacked(Stack::new(parts)?),
        })
    }
}

/// What [`map_tensors`] tells its function about a tensor.
#[derive(Debug, Clone, Copy)]
struct Slot<'a> {
    /// Checkpoint name.
    name: &'a str,
    /// A matrix (weight decay applies) or a bias or LayerNorm vector.
    matrix: bool,
    /// The precision of a quantized matrix, which the tensor stands for dequantized.
    quantized: Option<&'a Quantized>,
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
    /// fixed: most of a small model's parameters are there, and recovery does not need them). A
    /// quantized matrix (or stack of parts, each with its precision) becomes its dequantized
    /// float master, trained through its quantizer (module docs); striped matrices are refused.
    pub fn new(model: &Model) -> Result<Self> {
        let mut params = Vec::new();
        let model = map_tensors(model, &mut |slot, t| {
            if t.elem_count() == 0 {
                return Ok(t.clone());
            }
            let var = Var::from_tensor(&t.copy()?)?;
            let tensor = var.as_tensor().clone();
            params.push(Param {
                name: slot.name.to_string(),
                var,
                decay: slot.matrix,
                mask: None,
                quantized: slot.quantized.cloned(),
            });
            Ok(tensor)
        })?;
        Ok(Trainable { model, params })
    }

    /// The values [`Self::new`] starts the variables of `model` from, in the order of
    /// [`Self::params`], without copying them: `model`'s own tensors (a quantized matrix's
    /// dequantized master).
    pub fn values_of(model: &Model) -> Result<Vec<Tensor>> {
        let mut values = Vec::new();
        map_tensors(model, &mut |_, t| {
            if t.elem_count() > 0 {
                values.push(t.clone());
            }
            Ok(t.clone())
        })?;
        Ok(values)
    }

    /// The model a training step runs: the variables themselves, but every quantized matrix's
    /// master quantized on the way forward, with a straight-through gradient (module docs).
    pub fn training_model(&self) -> Result<Cow<'_, Model>> {
        let masters = self.quantized_masters();
        if masters.is_empty() {
            return Ok(Cow::Borrowed(&self.model));
        }
        let model = map_linears(&self.model, &mut |name, linear| {
            if let Some((q, w)) = masters.get(&format!("{name}.weight")) {
                linear.weight = Weight::Dense(q.fake(w)?);
            }
            Ok(())
        })?;
        Ok(Cow::Owned(model))
    }

    /// The float master of every quantized matrix, with its precision, by parameter name.
    fn quantized_masters(&self) -> BTreeMap<String, (&Quantized, &Tensor)> {
        self.params
            .iter()
            .filter_map(|p| {
                let q = p.quantized.as_ref()?;
                Some((p.name.clone(), (q, p.var.as_tensor())))
            })
            .collect()
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

    /// Refuses a model that cannot be trained (stacked parts of different precisions, striped
    /// matrices).
    pub fn check(model: &Model) -> Result<()> {
        map_tensors(model, &mut |_, t| Ok(t.clone())).map(|_| ())
    }

    /// The trained model, its tensors detached from the variables (plain, fast inference), each
    /// quantized matrix holding its master's codes.
    pub fn finish(&self) -> Result<Model> {
        self.detached(true)
    }

    /// The model as it stands for an evaluation, its float tensors views of the variables rather
    /// than copies (a training step changes them in place: drop it before the next step).
    pub fn current(&self) -> Result<Model> {
        self.detached(false)
    }

    /// [`Self::finish`], copying the float tensors when `copy`.
    fn detached(&self, copy: bool) -> Result<Model> {
        let plain = map_tensors(&self.model, &mut |_, t| match copy {
            true => Ok(t.detach().copy()?),
            false => Ok(t.detach()),
        })?;
        let masters = self.quantized_masters();
        if masters.is_empty() {
            return Ok(plain);
        }
        map_linears(&plain, &mut |name, linear| {
            if let Some((q, w)) = masters.get(&format!("{name}.weight")) {
                linear.weight = q.weight(w)?;
            }
            Ok(())
        })
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

/// A copy of `model` with `f(name, linear)` applied to every encoder-layer and head linear layer,
/// in the order of [`Trainable::params`].
fn map_linears(
    model: &Model,
    f: &mut impl FnMut(&str, &mut Linear) -> Result<()>,
) -> Result<Model> {
    let mut out = model.clone();
    for (i, layer) in out.layers.iter_mut().enumerate() {
        if let Some(a) = layer.attention.as_mut() {
            f(&format!("layer.{i}.attention.qkv"), &mut a.qkv)?;
            f(&format!("layer.{i}.attention.output"), &mut a.output)?;
        }
        if let Some(ffn) = layer.ffn.as_mut() {
            f(
                &format!("layer.{i}.ffn.intermediate"),
                &mut ffn.intermediate,
            )?;
            f(&format!("layer.{i}.ffn.output"), &mut ffn.output)?;
        }
    }
    f("head.dense", &mut out.head.dense)?;
    f("head.out", &mut out.head.out)?;
    Ok(out)
}

/// A copy of `model` with `f(slot, tensor)` applied to every encoder-layer and head tensor, in
/// the order of [`Trainable::params`]; a quantized matrix is passed dequantized and comes back a
/// dense one.
fn map_tensors(
    model: &Model,
    f: &mut impl FnMut(Slot, &Tensor) -> Result<Tensor>,
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
    f: &mut impl FnMut(Slot, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    let (w, quantized) = Quantized::of(name, &linear.weight)?;
    let weight = Slot {
        name: &format!("{name}.weight"),
        matrix: true,
        quantized: quantized.as_ref(),
    };
    linear.weight = Weight::Dense(f(weight, &w)?);
    let bias = Slot {
        name: &format!("{name}.bias"),
        matrix: false,
        quantized: None,
    };
    linear.bias = f(bias, &linear.bias)?;
    Ok(())
}

fn map_norm(
    name: &str,
    norm: &mut LayerNorm,
    f: &mut impl FnMut(Slot, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    for (part, tensor) in [("weight", &mut norm.weight), ("bias", &mut norm.bias)] {
        let slot = Slot {
            name: &format!("{name}.{part}"),
            matrix: false,
            quantized: None,
        };
        *tensor = f(slot, tensor)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Ops;
    use crate::model::encoder::RunOptions;
    use crate::model::inputs::Inputs;
    use crate::testing::random_model;
    use crate::train::loss::distillation;
    use crate::train::optimizer::{AdamSettings, AdamW};

    /// A random float model (hidden 32, FFN 64) and the same model with every matrix int4.
    fn float_and_int4() -> (Model, Model) {
        let float = random_model("bert", 2, 2, 16, 64);
        let mut quantized = float.clone();
        for m in float.matrices() {
            let dense = float.weight(m).unwrap().to_dense().unwrap();
            let q = QuantMatrix::quantize(&dense, Bits::Int4, Execution::Kernel).unwrap();
            quantized = quantized.with_weight(m, Weight::Quantized(q)).unwrap();
        }
        (float, quantized)
    }

    fn inputs(model: &Model) -> Inputs {
        let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 50).collect();
        let mask = vec![1u32; 24];
        Inputs::from_padded(&model.config, 4, 6, ids, mask, vec![0; 24]).unwrap()
    }

    /// The codes of every quantized matrix of `model`, by matrix.
    fn codes(model: &Model) -> Vec<(String, Codes)> {
        let mut out = Vec::new();
        for m in model.matrices() {
            let parts = match model.weight(m).unwrap() {
                Weight::Quantized(q) => vec![q],
                Weight::Stacked(s) => s
                    .parts
                    .iter()
                    .map(|p| match p {
                        Weight::Quantized(q) => q.clone(),
                        other => panic!("{} has a float part: {other:?}", m.label()),
                    })
                    .collect(),
                other => panic!("{} is not quantized: {other:?}", m.label()),
            };
            out.extend(parts.iter().map(|q| (m.label(), (*q.codes).clone())));
        }
        out
    }

    #[test]
    fn an_untrained_quantized_model_finishes_with_its_own_codes() {
        let (_, int4) = float_and_int4();
        let trainable = Trainable::new(&int4).unwrap();
        assert!(trainable.params.iter().any(|p| p.quantized.is_some()));
        let (got, want) = (codes(&trainable.finish().unwrap()), codes(&int4));
        assert_eq!(got.len(), want.len());
        for ((label, a), (_, b)) in got.iter().zip(&want) {
            let diff = a.codes.iter().zip(&b.codes).position(|(x, y)| x != y);
            let scales = a.scales.iter().zip(&b.scales).position(|(x, y)| x != y);
            assert!(
                diff.is_none() && scales.is_none(),
                "{label}: code {diff:?} scale {scales:?}"
            );
        }
    }

    /// Distilling the float model into its int4 copy through the quantizer: the distillation
    /// loss of the finished (quantized) model falls, and each matrix holds exactly the codes the
    /// quantizer gives its trained master.
    #[test]
    fn quantization_aware_training_lowers_the_loss_and_exports_the_quantizers_codes() {
        let (float, int4) = float_and_int4();
        let batch = inputs(&float);
        let teacher = float.forward(&batch, RunOptions::default()).unwrap();
        let loss_of = |model: &Model, ops: Ops| {
            let options = RunOptions { gates: None, ops };
            let logits = model.forward(&batch, options).unwrap();
            distillation(&logits, &teacher, 1.0, false).unwrap()
        };
        let trainable = Trainable::new(&int4).unwrap();
        let before = loss_of(&trainable.finish().unwrap(), Ops::Inference);
        let settings = AdamSettings {
            weight_decay: 0.0,
            ..AdamSettings::default()
        };
        let mut adam = AdamW::new(&trainable.params, settings).unwrap();
        for _ in 0..30 {
            let loss = loss_of(&trainable.training_model().unwrap(), Ops::Differentiable);
            let grads = loss.backward().unwrap();
            adam.step(&trainable.params, &grads, 3e-3).unwrap();
        }
        let trained = trainable.finish().unwrap();
        let after = loss_of(&trained, Ops::Inference);
        let (before, after) = (
            before.to_scalar::<f32>().unwrap(),
            after.to_scalar::<f32>().unwrap(),
        );
        assert!(after < 0.8 * before, "loss {before} -> {after}");
        // Every matrix holds its master's codes, part by part.
        let mut expected = Vec::new();
        for p in trainable.params.iter().filter(|p| p.quantized.is_some()) {
            let q = p.quantized.as_ref().unwrap();
            for part in q.split(p.var.as_tensor()) {
                let (part, rows) = part.unwrap();
                let bits = part.precision.unwrap().0;
                expected.push(Codes::from_tensor(&rows, bits).unwrap());
            }
        }
        let got: Vec<Codes> = codes(&trained)
            .into_iter()
            .filter(|(label, _)| !label.starts_with("embeddings"))
            .map(|(_, c)| c)
            .collect();
        assert_eq!(got, expected);
        assert_ne!(codes(&trained), codes(&int4), "training changed some codes");
    }
}
