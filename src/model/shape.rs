//! Reshaping a model into a smaller *uniform* one of its family: fewer layers, the same smaller
//! number of heads and FFN neurons in every layer, and a narrower hidden size (the CoFi-style
//! hidden dimension, Xia et al. 2022). The result is an ordinary checkpoint: its config is a
//! stock one (stock transformers loads it) and every axcompress pass runs on it.
//!
//! Slicing the hidden size cuts the chosen dimensions out of every matrix that reads or writes
//! the residual stream: the embedding tables, every LayerNorm, the query/key/value and FFN input
//! columns, the attention and FFN output rows, and the head's dense layer on both sides.
//! LayerNorm then normalises over the kept dimensions only, so the result is an approximation to
//! be recovered by distillation, except in one case the tests use: keeping every dimension in
//! another order is exact, as LayerNorm does not depend on the order of its inputs.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};

use super::config::{Family, ModelConfig};
use super::linear::Weight;
use super::nn::LayerNorm;
use super::slice::LayerKeep;
use super::Model;

/// What a reshaped model keeps, as positions in the model it is applied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Layers kept, ascending.
    pub layers: Vec<usize>,
    /// For each kept layer, its heads kept (original head indices, ascending); the same count in
    /// every layer.
    pub heads: Vec<Vec<usize>>,
    /// For each kept layer, its FFN neurons kept (ascending positions); the same count in every
    /// layer.
    pub neurons: Vec<Vec<usize>>,
    /// Hidden dimensions kept, in the order the new model stores them.
    pub hidden: Vec<usize>,
}

impl Model {
    /// Checks that the model is a plain float model every one of whose layers has both blocks
    /// and dense attention: the input a reshape needs.
    pub fn check_reshapable(&self) -> Result<()> {
        // Every matrix, the word embeddings included, must be dense.
        if self.has_block_sparse() || self.is_quantized() {
            bail!("reshape needs float dense weights: run it before quantize and bsp stages");
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let (Some(att), Some(_)) = (&layer.attention, &layer.ffn) else {
                bail!("reshape needs both blocks in every layer, and layer {l} has lost one: run it before a prune stage");
            };
            if att.approx.is_some() {
                bail!("layer {l} runs approximate attention: reshape before an attention stage");
            }
        }
        Ok(())
    }

    /// The uniform model that keeps what `shape` names (see the module's text).
    pub fn reshape(&self, shape: &Shape) -> Result<Model> {
        self.check_reshapable()?;
        let head_size = self.config.structure.head_size;
        let (heads, width) = check_shape(self, shape)?;
        let mut keep = self.keep_all();
        for ((&l, h), n) in shape.layers.iter().zip(&shape.heads).zip(&shape.neurons) {
            keep[l] = LayerKeep {
                heads: Some(h.clone()),
                neurons: Some(n.clone()),
            };
        }
        let mut out = self.slice(&keep)?;
        out.layers = shape
            .layers
            .iter()
            .map(|&l| out.layers[l].clone())
            .collect();
        for layer in &mut out.layers {
            if let Some(att) = &mut layer.attention {
                att.heads = (0..heads).collect();
            }
        }
        slice_hidden(&mut out, &shape.hidden)?;
        let raw = uniform_config(
            &self.config,
            shape.layers.len(),
            heads,
            width,
            shape.hidden.len(),
        );
        out.config = ModelConfig::from_json(raw, "the reshaped config")?;
        if out.config.structure.head_size != head_size {
            bail!(
                "the reshaped config implies heads of {} dimensions, not {head_size}",
                out.config.structure.head_size
            );
        }
        Ok(out)
    }
}

/// Checks `shape` against `model`; the uniform head count and FFN width it keeps.
fn check_shape(model: &Model, shape: &Shape) -> Result<(usize, usize)> {
    let n = model.num_layers();
    let ascending = |v: &[usize], below: usize| {
        v.windows(2).all(|w| w[0] < w[1]) && v.iter().all(|&x| x < below)
    };
    if shape.layers.is_empty() || !ascending(&shape.layers, n) {
        bail!(
            "reshape: layers {:?} must be ascending, at least one, below {n}",
            shape.layers
        );
    }
    if shape.heads.len() != shape.layers.len() || shape.neurons.len() != shape.layers.len() {
        bail!("reshape: one list of heads and of neurons per kept layer");
    }
    let heads = shape.heads[0].len();
    let width = shape.neurons[0].len();
    if heads == 0 || width == 0 {
        bail!("reshape: keep at least one head and one FFN neuron per layer");
    }
    if shape.heads.iter().any(|h| h.len() != heads)
        || shape.neurons.iter().any(|f| f.len() != width)
    {
        bail!("reshape: every layer keeps the same number of heads and of FFN neurons");
    }
    let hidden = model.config.hidden_size;
    let mut sorted = shape.hidden.clone();
    sorted.sort_unstable();
    if sorted.is_empty() || !ascending(&sorted, hidden) {
        bail!("reshape: hidden dimensions must be distinct, at least one, below {hidden}");
    }
    let head_size = model.config.structure.head_size;
    if shape.hidden.len() != heads * head_size {
        bail!(
            "reshape: a hidden size of {} with {heads} heads of {head_size} is not a stock shape; keep {} hidden dimensions",
            shape.hidden.len(),
            heads * head_size
        );
    }
    Ok((heads, width))
}

/// Cuts every tensor on the residual stream down to the hidden dimensions `dims`; nothing to do
/// (no copy) when they are all of them in order.
fn slice_hidden(model: &mut Model, dims: &[usize]) -> Result<()> {
    if dims.iter().copied().eq(0..model.config.hidden_size) {
        return Ok(());
    }
    let columns = |t: &Tensor| select(t, 1, dims);
    let e = &mut model.embeddings;
    e.word = Weight::Dense(columns(&e.word.to_dense()?)?);
    e.position = columns(&e.position)?;
    e.token_type = e.token_type.as_ref().map(columns).transpose()?;
    e.norm = norm(&e.norm, dims)?;
    for layer in &mut model.layers {
        if let Some(att) = &mut layer.attention {
            att.qkv = att.qkv.select_inputs(dims)?;
            att.output = att.output.select_outputs(dims)?;
            att.norm = norm(&att.norm, dims)?;
        }
        if let Some(ffn) = &mut layer.ffn {
            ffn.intermediate = ffn.intermediate.select_inputs(dims)?;
            ffn.output = ffn.output.select_outputs(dims)?;
            ffn.norm = norm(&ffn.norm, dims)?;
        }
    }
    let head = &mut model.head;
    head.dense = head.dense.select_inputs(dims)?.select_outputs(dims)?;
    head.out = head.out.select_inputs(dims)?;
    Ok(())
}

fn norm(n: &LayerNorm, dims: &[usize]) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: select(&n.weight, 0, dims)?,
        bias: select(&n.bias, 0, dims)?,
        eps: n.eps,
    })
}

fn select(t: &Tensor, dim: usize, idx: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let idx = Tensor::new(idx, t.device())?;
    Ok(t.index_select(&idx, dim)?.contiguous()?)
}

/// The stock config of the reshaped model: `config`'s own fields with the new sizes, and no
/// per-layer structure (every layer is the same).
fn uniform_config(
    config: &ModelConfig,
    layers: usize,
    heads: usize,
    width: usize,
    hidden: usize,
) -> Value {
    let mut raw = config.raw.clone();
    let keys = match config.family {
        Family::DistilBert => ["n_layers", "n_heads", "hidden_dim", "dim"],
        _ => [
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_size",
        ],
    };
    if let Some(obj) = raw.as_object_mut() {
        for (key, value) in keys.iter().zip([layers, heads, width, hidden]) {
            obj.insert((*key).to_string(), json!(value));
        }
        obj.remove("axcompress");
        obj.remove("pruned_heads");
    }
    raw
}

/// The hidden dimensions of `model` ranked by `importance` (most important first), the first
/// `keep` of them in ascending order.
pub fn top_dimensions(importance: &[f64], keep: usize) -> Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..importance.len()).collect();
    if importance.iter().any(|x| !x.is_finite()) {
        bail!("reshape: a non-finite importance; the model's activations overflow");
    }
    order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(keep).collect();
    kept.sort_unstable();
    (kept.len() == keep)
        .then_some(kept)
        .context("reshape: asked to keep more than there is")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::compatibility;
    use crate::kernels::Ops;
    use crate::model::encoder::RunOptions;
    use crate::model::inputs::Inputs;
    use crate::testing::random_model;

    fn logits(model: &Model, opts: RunOptions) -> Vec<f32> {
        let (ids, mask) = (
            vec![2, 7, 9, 11, 3, 2, 13, 3, 1, 1],
            vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        );
        let inputs = Inputs::from_padded(&model.config, 2, 5, ids, mask, vec![0; 10]).unwrap();
        let out = model.forward(&inputs, opts).unwrap();
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The logits of `model` with only what `keep` keeps, by gates.
    fn gated_logits(model: &Model, keep: &[LayerKeep]) -> Vec<f32> {
        let gates = model.gates_for(keep).unwrap();
        let opts = RunOptions {
            gates: Some(&gates),
            ops: Ops::Inference,
        };
        logits(model, opts)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn everything(model: &Model) -> Shape {
        let n = model.num_layers();
        Shape {
            layers: (0..n).collect(),
            heads: vec![(0..model.config.structure.original_heads).collect(); n],
            neurons: vec![(0..model.layers[0].ffn.as_ref().unwrap().width()).collect(); n],
            hidden: (0..model.config.hidden_size).collect(),
        }
    }

    #[test]
    fn keeping_everything_is_exact_and_a_permuted_hidden_size_too() {
        for family in ["bert", "roberta", "distilbert"] {
            let model = random_model(family, 3, 4, 4, 24);
            let dense = logits(&model, RunOptions::default());
            let same = model.reshape(&everything(&model)).unwrap();
            assert_eq!(logits(&same, RunOptions::default()), dense, "{family}");
            let mut permuted = everything(&model);
            permuted.hidden.reverse();
            let turned = model.reshape(&permuted).unwrap();
            let d = max_diff(&logits(&turned, RunOptions::default()), &dense);
            assert!(d < 1e-5, "{family}: {d}");
        }
    }

    #[test]
    fn dropped_layers_and_uniform_heads_and_neurons_equal_the_gated_model() {
        let model = random_model("bert", 3, 4, 4, 24);
        let shape = Shape {
            layers: vec![0, 2],
            heads: vec![vec![0, 3], vec![1, 2]],
            neurons: vec![(0..24).step_by(2).collect(), (0..12).collect()],
            hidden: (0..16).collect(),
        };
        let mut keep = model.keep_all();
        keep[0] = LayerKeep {
            heads: Some(vec![0, 3]),
            neurons: Some((0..24).step_by(2).collect()),
        };
        keep[1] = LayerKeep {
            heads: None,
            neurons: None,
        };
        keep[2] = LayerKeep {
            heads: Some(vec![1, 2]),
            neurons: Some((0..12).collect()),
        };
        let gated = gated_logits(&model, &keep);
        // Two heads of 4 need a hidden size of 8: keep every dimension by widening the heads.
        let err = model.reshape(&shape).unwrap_err().to_string();
        assert!(err.contains("keep 8 hidden dimensions"), "{err}");
        let mut wide = shape.clone();
        wide.heads = vec![vec![0, 1, 2, 3]; 2];
        keep[0].heads = Some(vec![0, 1, 2, 3]);
        keep[2].heads = Some(vec![0, 1, 2, 3]);
        let gated_wide = gated_logits(&model, &keep);
        let reshaped = model.reshape(&wide).unwrap();
        let d = max_diff(&logits(&reshaped, RunOptions::default()), &gated_wide);
        assert!(d < 1e-5, "{d}");
        assert_ne!(gated, gated_wide);
        assert_eq!(reshaped.num_layers(), 2);
        assert_eq!(reshaped.config.structure.layers[1].ffn_width, Some(12));
        assert!(compatibility(&reshaped).hf_compatible);
    }

    #[test]
    fn a_narrower_model_has_a_stock_config_of_its_sizes() {
        let model = random_model("distilbert", 2, 4, 4, 24);
        let shape = Shape {
            layers: vec![1],
            heads: vec![vec![0, 2]],
            neurons: vec![vec![1, 5, 7]],
            hidden: vec![0, 3, 4, 6, 8, 9, 12, 15],
        };
        let small = model.reshape(&shape).unwrap();
        let raw = &small.config.raw;
        for (key, value) in [
            ("n_layers", 1),
            ("n_heads", 2),
            ("hidden_dim", 3),
            ("dim", 8),
        ] {
            assert_eq!(raw[key], value, "{key}");
        }
        assert_eq!(small.config.hidden_size, 8);
        assert_eq!(small.config.structure.head_size, 4);
        assert!(compatibility(&small).hf_compatible);
        assert!(logits(&small, RunOptions::default())
            .iter()
            .all(|x| x.is_finite()));
        let uneven = Shape {
            heads: vec![vec![0, 1, 2]],
            ..shape
        };
        assert!(model.reshape(&uneven).is_err());
    }

    #[test]
    fn top_dimensions_keeps_the_largest_in_ascending_order() {
        assert_eq!(
            top_dimensions(&[0.1, 3.0, 2.0, 0.5], 2).unwrap(),
            vec![1, 2]
        );
        assert!(top_dimensions(&[1.0, f64::NAN], 1).is_err());
        assert!(top_dimensions(&[1.0], 2).is_err());
    }
}
