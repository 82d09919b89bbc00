//! Physical slicing (removed heads and FFN neurons are cut out of the weight matrices) and the
//! equivalent gates, so that masking and slicing can be checked against each other.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::encoder::Gates;
use super::linear::Linear;
use super::Model;

/// What one layer keeps, relative to the model's current shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerKeep {
    /// Heads to keep, as original head indices (a subset of the layer's current heads);
    /// `None` removes the attention block.
    pub heads: Option<Vec<usize>>,
    /// FFN neurons to keep, as positions in the layer's current FFN; `None` removes the FFN block.
    pub neurons: Option<Vec<usize>>,
}

impl Model {
    /// A plan that keeps everything the model currently has.
    pub fn keep_all(&self) -> Vec<LayerKeep> {
        self.layers
            .iter()
            .map(|l| LayerKeep {
                heads: l.attention.as_ref().map(|a| a.heads.clone()),
                neurons: l.ffn.as_ref().map(|f| (0..f.width()).collect()),
            })
            .collect()
    }

    /// Returns a new model with only the kept heads, neurons and blocks, physically sliced.
    pub fn slice(&self, keep: &[LayerKeep]) -> Result<Model> {
        self.check_keep(keep)?;
        let mut out = self.clone();
        for (l, (layer, k)) in out.layers.iter_mut().zip(keep).enumerate() {
            match (&mut layer.attention, &k.heads) {
                (_, None) => layer.attention = None,
                (Some(att), Some(heads)) => {
                    let d = att.head_size;
                    let n = att.heads.len();
                    let pos = positions(&att.heads, heads);
                    let rows: Vec<usize> = (0..3)
                        .flat_map(|part| {
                            pos.iter()
                                .flat_map(move |&p| (part * n + p) * d..(part * n + p + 1) * d)
                        })
                        .collect();
                    let cols: Vec<usize> = pos.iter().flat_map(|&p| p * d..(p + 1) * d).collect();
                    att.qkv = att.qkv.select_outputs(&rows)?;
                    att.output = att.output.select_inputs(&cols)?;
                    if heads.is_empty() {
                        att.qkv = Linear::empty(0, att.output.out_features(), None)?;
                    }
                    att.heads = heads.clone();
                }
                (None, Some(_)) => unreachable!("checked by check_keep"),
            }
            match (&mut layer.ffn, &k.neurons) {
                (_, None) => layer.ffn = None,
                (Some(ffn), Some(neurons)) => {
                    ffn.intermediate = ffn.intermediate.select_outputs(neurons)?;
                    ffn.output = ffn.output.select_inputs(neurons)?;
                    if neurons.is_empty() {
                        ffn.intermediate = Linear::empty(0, ffn.output.out_features(), None)?;
                    }
                }
                (None, Some(_)) => unreachable!("checked by check_keep"),
            }
            let shape = &mut out.config.structure.layers[l];
            shape.heads = k.heads.clone();
            shape.ffn_width = k.neurons.as_ref().map(Vec::len);
            if shape.head_count() == 0 {
                // No heads left to approximate.
                shape.attention_mode = None;
            }
        }
        Ok(out)
    }

    /// Gates that make the current model compute what `self.slice(keep)` computes.
    pub fn gates_for(&self, keep: &[LayerKeep]) -> Result<Gates> {
        self.check_keep(keep)?;
        let dev = &Device::Cpu;
        let scalar = |on: bool| Tensor::new(if on { 1f32 } else { 0f32 }, dev);
        let mut gates = Gates::open(self.num_layers());
        for ((g, layer), k) in gates.layers.iter_mut().zip(&self.layers).zip(keep) {
            if let Some(att) = &layer.attention {
                g.attention = Some(scalar(k.heads.is_some())?);
                let kept = k.heads.as_deref().unwrap_or(&[]);
                let v: Vec<f32> = att
                    .heads
                    .iter()
                    .map(|h| f32::from(u8::from(kept.contains(h))))
                    .collect();
                g.heads = Some(Tensor::new(v, dev)?);
            }
            if let Some(ffn) = &layer.ffn {
                g.ffn = Some(scalar(k.neurons.is_some())?);
                let mut v = vec![0f32; ffn.width()];
                for &n in k.neurons.as_deref().unwrap_or(&[]) {
                    v[n] = 1.0;
                }
                g.neurons = Some(Tensor::new(v, dev)?);
            }
        }
        Ok(gates)
    }

    fn check_keep(&self, keep: &[LayerKeep]) -> Result<()> {
        if keep.len() != self.num_layers() {
            bail!(
                "the plan has {} layers but the model has {}",
                keep.len(),
                self.num_layers()
            );
        }
        for (l, (layer, k)) in self.layers.iter().zip(keep).enumerate() {
            if let Some(heads) = &k.heads {
                let Some(att) = &layer.attention else {
                    bail!("layer {l}: cannot keep heads of a removed attention block");
                };
                if heads.windows(2).any(|w| w[0] >= w[1])
                    || heads.iter().any(|h| !att.heads.contains(h))
                {
                    bail!("layer {l}: heads {heads:?} must be ascending and among the current heads {:?}", att.heads);
                }
            }
            if let Some(neurons) = &k.neurons {
                let Some(ffn) = &layer.ffn else {
                    bail!("layer {l}: cannot keep neurons of a removed FFN block");
                };
                if neurons.windows(2).any(|w| w[0] >= w[1])
                    || neurons.iter().any(|&n| n >= ffn.width())
                {
                    bail!(
                        "layer {l}: neurons must be ascending positions below {}",
                        ffn.width()
                    );
                }
            }
        }
        Ok(())
    }
}

fn positions(current: &[usize], kept: &[usize]) -> Vec<usize> {
    kept.iter()
        .map(|h| {
            current
                .iter()
                .position(|c| c == h)
                .expect("checked by check_keep")
        })
        .collect()
}
