//! First-order (Taylor) significance: the gradient of the task loss with respect to every gate
//! at gate = 1, from one forward and backward pass over the analysis data. Removing an element
//! sets its gates from 1 to 0, so the first-order estimate of the loss change is `−Σ ∂L/∂g`.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use indicatif::ProgressBar;

use super::elements::Element;
use crate::evaluate::finite_rows;
use crate::kernels::Ops;
use crate::model::encoder::{Gates, LayerGates, RunOptions};
use crate::model::Model;
use crate::scoring::batch::ScoringBatch;

/// `∂L/∂g` for every gate of a model (L = mean loss over the analysis data).
#[derive(Debug, Clone, PartialEq)]
pub struct GateGradients {
    /// Attention-block gate of each layer (`None` when the block is absent).
    pub attention: Vec<Option<f64>>,
    /// Head gates of each layer, in the order of the layer's kept heads.
    pub heads: Vec<Vec<f64>>,
    /// FFN-block gate of each layer (`None` when the block is absent).
    pub ffn: Vec<Option<f64>>,
    /// Neuron gates of each layer.
    pub neurons: Vec<Vec<f64>>,
}

impl GateGradients {
    /// First-order estimate of `L(M∖e) − L(M)`: `−Σ ∂L/∂g` over the element's gates.
    pub fn estimate(&self, model: &Model, e: &Element) -> f64 {
        let l = e.layer();
        match e {
            Element::AttentionBlock { .. } => -self.attention[l].unwrap_or(0.0),
            Element::FfnBlock { .. } => -self.ffn[l].unwrap_or(0.0),
            Element::Head { head, .. } => {
                let heads = model.layers[l]
                    .attention
                    .as_ref()
                    .map_or(&[][..], |a| &a.heads[..]);
                let p = heads
                    .iter()
                    .position(|h| h == head)
                    .expect("head of the model");
                -self.heads[l][p]
            }
            Element::Group { neurons, .. } => {
                -neurons.iter().map(|&n| self.neurons[l][n]).sum::<f64>()
            }
        }
    }

    /// Per-neuron first-order estimates `−∂L/∂g` of each layer (empty for absent FFN blocks).
    pub fn neuron_estimates(&self) -> Vec<Vec<f64>> {
        self.neurons
            .iter()
            .map(|v| v.iter().map(|g| -g).collect())
            .collect()
    }
}

/// Sum over the batch of the per-example loss (cross-entropy, or squared error for regression).
pub fn batch_loss_sum(logits: &Tensor, batch: &ScoringBatch) -> Result<Tensor> {
    Ok(if batch.regression {
        (logits.squeeze(1)? - &batch.loss_targets)?
            .sqr()?
            .sum_all()?
    } else {
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        log_probs
            .gather(&batch.loss_targets.unsqueeze(1)?, 1)?
            .sum_all()?
            .neg()?
    })
}

/// Computes `∂L/∂g` for every gate with the differentiable forward path.
pub fn gate_gradients(
    model: &Model,
    batches: &[ScoringBatch],
    progress: &ProgressBar,
) -> Result<GateGradients> {
    let total: usize = batches.iter().map(|b| b.examples.len()).sum();
    let dev = &Device::Cpu;
    let ones = |n: usize| Var::ones(n, DType::F32, dev);
    let scalar = || Var::new(1f32, dev);
    let mut vars = Vec::with_capacity(model.num_layers());
    for layer in &model.layers {
        vars.push((
            layer.attention.as_ref().map(|_| scalar()).transpose()?,
            layer
                .attention
                .as_ref()
                .map(|a| ones(a.heads.len()))
                .transpose()?,
            layer.ffn.as_ref().map(|_| scalar()).transpose()?,
            layer.ffn.as_ref().map(|f| ones(f.width())).transpose()?,
        ));
    }
    let gates = Gates {
        layers: vars
            .iter()
            .map(|(a, h, f, n)| LayerGates {
                attention: a.as_ref().map(|v| v.as_tensor().clone()),
                heads: h.as_ref().map(|v| v.as_tensor().clone()),
                ffn: f.as_ref().map(|v| v.as_tensor().clone()),
                neurons: n.as_ref().map(|v| v.as_tensor().clone()),
            })
            .collect(),
    };
    let mut sums = GateGradients {
        attention: vars.iter().map(|v| v.0.as_ref().map(|_| 0.0)).collect(),
        heads: vars
            .iter()
            .map(|v| vec![0.0; v.1.as_ref().map_or(0, |t| t.elem_count())])
            .collect(),
        ffn: vars.iter().map(|v| v.2.as_ref().map(|_| 0.0)).collect(),
        neurons: vars
            .iter()
            .map(|v| vec![0.0; v.3.as_ref().map_or(0, |t| t.elem_count())])
            .collect(),
    };
    let opts = RunOptions {
        gates: Some(&gates),
        ops: Ops::Differentiable,
    };
    for (number, batch) in batches.iter().enumerate() {
        let logits = model.forward(&batch.inputs, opts)?;
        finite_rows(&logits, "analysis (gradients)", number)?;
        let loss = (batch_loss_sum(&logits, batch)? / total as f64)?;
        let grads = loss.backward().context("backward pass failed")?;
        // A block with no heads or no neurons left has an empty element gate, which no gradient
        // reaches (there is nothing to scale): its gradients are the empty list.
        let read = |v: &Var, empty_block: bool| -> Result<Vec<f64>> {
            let Some(g) = grads.get(v.as_tensor()) else {
                if empty_block || v.elem_count() == 0 {
                    return Ok(vec![0.0; v.elem_count()]);
                }
                anyhow::bail!("a gate received no gradient");
            };
            Ok(g.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        for (l, (a, h, f, n)) in vars.iter().enumerate() {
            let layer = &model.layers[l];
            let no_heads = layer.attention.as_ref().is_some_and(|a| a.heads.is_empty());
            let no_neurons = layer.ffn.as_ref().is_some_and(|f| f.width() == 0);
            if let Some(a) = a {
                *sums.attention[l].as_mut().expect("present") += read(a, no_heads)?[0];
            }
            if let Some(f) = f {
                *sums.ffn[l].as_mut().expect("present") += read(f, no_neurons)?[0];
            }
            let parts = [
                (&mut sums.heads[l], h, no_heads),
                (&mut sums.neurons[l], n, no_neurons),
            ];
            for (acc, g, empty_block) in parts {
                if let Some(v) = g {
                    for (s, x) in acc.iter_mut().zip(read(v, empty_block)?) {
                        *s += x;
                    }
                }
            }
        }
        progress.inc(batch.examples.len() as u64);
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::inputs::Inputs;
    use crate::testing::random_model;
    use crate::text::tokenizer::Sequence;

    fn batch(model: &Model) -> ScoringBatch {
        let seqs = [
            Sequence {
                ids: vec![2, 7, 9, 3],
                type_ids: vec![0; 4],
            },
            Sequence {
                ids: vec![2, 11, 3],
                type_ids: vec![0; 3],
            },
        ];
        let refs: Vec<&Sequence> = seqs.iter().collect();
        ScoringBatch {
            inputs: Inputs::from_sequences(&model.config, &refs).unwrap(),
            examples: vec![0, 1],
            loss_targets: Tensor::new(&[0u32, 2], &Device::Cpu).unwrap(),
            regression: false,
        }
    }

    #[test]
    fn a_layer_with_every_head_pruned_still_gets_its_gate_gradients() {
        // Before: "a gate received no gradient", so the groups level after a heads level that
        // emptied a layer failed.
        let full = random_model("bert", 2, 2, 4, 8);
        let mut keep = full.keep_all();
        keep[0].heads = Some(Vec::new());
        keep[1].neurons = Some(Vec::new());
        let model = full.slice(&keep).unwrap();
        let g = gate_gradients(&model, &[batch(&model)], &ProgressBar::hidden()).unwrap();
        // The emptied blocks' gates still scale their output bias; their element gates are empty.
        assert!(g.attention[0].is_some() && g.heads[0].is_empty(), "{g:?}");
        assert!(g.ffn[1].is_some() && g.neurons[1].is_empty(), "{g:?}");
        // The other elements still get their gradients.
        assert!(g.heads[1].iter().any(|&v| v != 0.0), "{g:?}");
        assert!(g.neurons[0].iter().any(|&v| v != 0.0), "{g:?}");
    }
}
