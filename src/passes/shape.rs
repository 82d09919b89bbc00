//! The shape pass: cut the model down to a smaller *uniform* model of its family — fewer layers,
//! the same smaller number of heads and FFN neurons in every layer, a narrower hidden size —
//! keeping the most significant of each ([`Model::reshape`]). The output is a stock checkpoint
//! (stock transformers loads it), which per-layer pruning cannot give. It takes no accept /
//! reject decisions: it goes where its settings say, so a `recover` stage (distillation from the
//! input model) follows it, and the run's checks judge the result.
//!
//! What "most significant" means:
//! - layers: removed one at a time, each time the one whose removal raises the loss on all the
//!   selection sentences least (exact: the model is run without it);
//! - heads and FFN neurons, on the first `examples` selection sentences: the magnitude of the
//!   first-order (Taylor) estimate of the loss change when each is removed (Michel et al. 2019
//!   for heads), on the model with its layers cut;
//! - hidden dimensions, on the same sentences: the mean magnitude of the residual stream in that
//!   dimension over every token, at the embeddings' output and after every kept layer
//!   (Minitron's activation-based width importance).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::journal::Journal;
use super::{Pass, PassOutput, StageContext};
use crate::analyze::taylor::gate_gradients;
use crate::kernels::Ops;
use crate::model::encoder::{run_layers, EncoderLayer, RunOptions};
use crate::model::shape::{top_dimensions, Shape};
use crate::model::Model;
use crate::scoring::batch::ScoringBatch;

crate::settings! {
    /// The `[[stages]]` keys of a `shape` stage: the sizes to cut to (unset: keep the model's).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct ShapeSettings;
    {
        /// Encoder layers to keep.
        layers: Option<usize> = None, "the model's";
        /// Hidden size to keep; the heads follow, `hidden / head size` in every layer.
        hidden: Option<usize> = None, "the model's";
        /// FFN width of every layer.
        ffn: Option<usize> = None, "the model's";
        /// Selection sentences the heads, neurons and hidden dimensions are ranked on (layers
        /// are ranked on all of them).
        examples: Option<usize> = None, "512";
    }
}

/// Selection sentences the significance is measured on, unless set.
const DEFAULT_EXAMPLES: usize = 512;

/// The shape pass.
pub struct ShapePass {
    settings: ShapeSettings,
}

impl ShapePass {
    /// Checks the settings.
    pub fn new(settings: ShapeSettings) -> Result<Self> {
        let sizes = [
            settings.layers,
            settings.hidden,
            settings.ffn,
            settings.examples,
        ];
        let zero = sizes.contains(&Some(0));
        if zero {
            bail!("shape: layers, hidden, ffn and examples must be at least 1 when set");
        }
        Ok(ShapePass { settings })
    }

    /// The target sizes for `model`: (layers, heads, ffn, hidden).
    fn targets(&self, model: &Model) -> Result<(usize, usize, usize, usize)> {
        let s = &self.settings;
        let head_size = model.config.structure.head_size;
        let hidden = s.hidden.unwrap_or(model.config.hidden_size);
        let layers = s.layers.unwrap_or(model.num_layers());
        let width = model.layers[0].ffn.as_ref().map_or(0, |f| f.width());
        let ffn = s.ffn.unwrap_or(width);
        if !hidden.is_multiple_of(head_size) {
            bail!("shape: hidden = {hidden} is not a multiple of the head size {head_size}; use e.g. {}", hidden / head_size * head_size.max(1));
        }
        for (name, want, have) in [
            ("layers", layers, model.num_layers()),
            ("hidden", hidden, model.config.hidden_size),
            ("ffn", ffn, width),
        ] {
            if want > have {
                bail!("shape: {name} = {want} is more than the model has ({have})");
            }
        }
        let heads = hidden / head_size;
        let have_heads = model.layers[0]
            .attention
            .as_ref()
            .map_or(0, |a| a.heads.len());
        if heads > have_heads {
            bail!("shape: hidden = {hidden} needs {heads} heads of {head_size} and the model has {have_heads}");
        }
        Ok((layers, heads, ffn, hidden))
    }
}

/// What a shape run reports.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeReport {
    /// Layers kept.
    pub layers: Vec<usize>,
    /// Selection loss after each layer removal, in order.
    pub layer_loss_after_removal: Vec<f64>,
    /// Heads per layer.
    pub heads: usize,
    /// FFN width.
    pub ffn: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Heads kept in each kept layer (original indices).
    pub kept_heads: Vec<Vec<usize>>,
    /// Selection sentences the significance was measured on.
    pub examples: usize,
}

impl Pass for ShapePass {
    type Settings = ShapeSettings;
    type Report = ShapeReport;

    fn name(&self) -> &'static str {
        "shape"
    }

    fn settings(&self) -> &ShapeSettings {
        &self.settings
    }

    fn check_input(&self, model: &Model) -> Result<()> {
        model.check_reshapable()?;
        let sizes = |l: &EncoderLayer| {
            let heads = l.attention.as_ref().map(|a| a.heads.len());
            (heads, l.ffn.as_ref().map(|f| f.width()))
        };
        let first = model.layers.first().map(sizes);
        if model.layers.iter().any(|l| Some(sizes(l)) != first) {
            bail!("shape needs a uniform model (the same heads and FFN width in every layer): run it before a prune stage");
        }
        self.targets(model).map(|_| ())
    }

    fn run(
        &self,
        model: Model,
        ctx: &StageContext,
        _journal: &mut Journal,
    ) -> Result<PassOutput<ShapeReport>> {
        let (layers, heads, ffn, hidden) = self.targets(&model)?;
        let examples = self.settings.examples.unwrap_or(DEFAULT_EXAMPLES);
        let batches = first_examples(&ctx.batches.batches, examples);
        let (kept_layers, layer_losses) = choose_layers(&model, layers, ctx)?;
        ctx.log(&format!(
            "shape: keeping layers {kept_layers:?} of {}",
            model.num_layers()
        ));
        let cut = model.reshape(&keep_everything_in(&model, &kept_layers))?;
        let gradients = gate_gradients(&cut, batches, &ProgressBar::hidden())?;
        let top = |scores: &[f64], k: usize| top_dimensions(&magnitudes(scores), k);
        let head_picks: Vec<Vec<usize>> = gradients
            .heads
            .iter()
            .map(|g| top(g, heads))
            .collect::<Result<_>>()?;
        let neuron_picks: Vec<Vec<usize>> = gradients
            .neurons
            .iter()
            .map(|g| top(g, ffn))
            .collect::<Result<_>>()?;
        let width = hidden_importance(&cut, batches)?;
        let shape = Shape {
            layers: (0..kept_layers.len()).collect(),
            heads: head_picks,
            neurons: neuron_picks,
            hidden: top_dimensions(&width, hidden)?,
        };
        let out = cut.reshape(&shape)?;
        ctx.log(&format!(
            "shape: {} layers, {heads} heads, FFN {ffn}, hidden {hidden}: {} → {} parameters",
            kept_layers.len(),
            model.parameter_count(),
            out.parameter_count()
        ));
        let details = ShapeReport {
            layers: kept_layers,
            layer_loss_after_removal: layer_losses,
            heads,
            ffn,
            hidden,
            kept_heads: shape.heads,
            examples: batches.iter().map(|b| b.examples.len()).sum::<usize>(),
        };
        Ok(PassOutput {
            model: out,
            details,
            alternatives: Vec::new(),
            files: Vec::new(),
        })
    }
}

/// The batches that hold the first `examples` selection sentences (whole batches).
fn first_examples(batches: &[ScoringBatch], examples: usize) -> &[ScoringBatch] {
    let mut seen = 0;
    let end = batches
        .iter()
        .position(|b| {
            seen += b.examples.len();
            seen >= examples
        })
        .map_or(batches.len(), |i| i + 1);
    &batches[..end]
}

/// A shape of `model` that keeps everything in `layers`.
fn keep_everything_in(model: &Model, layers: &[usize]) -> Shape {
    let kept = |l: usize| &model.layers[l];
    Shape {
        layers: layers.to_vec(),
        heads: layers
            .iter()
            .map(|&l| {
                kept(l)
                    .attention
                    .as_ref()
                    .map_or(Vec::new(), |a| a.heads.clone())
            })
            .collect(),
        neurons: layers
            .iter()
            .map(|&l| (0..kept(l).ffn.as_ref().map_or(0, |f| f.width())).collect())
            .collect(),
        hidden: (0..model.config.hidden_size).collect(),
    }
}

/// Removes layers one at a time down to `keep`, each time the one whose removal raises the
/// selection loss least; the kept layers and the loss after each removal.
fn choose_layers(model: &Model, keep: usize, ctx: &StageContext) -> Result<(Vec<usize>, Vec<f64>)> {
    let mut kept: Vec<usize> = (0..model.num_layers()).collect();
    let mut losses = Vec::new();
    while kept.len() > keep {
        let mut best: Option<(f64, usize)> = None;
        for i in 0..kept.len() {
            let mut without = kept.clone();
            without.remove(i);
            let loss = ctx
                .batches
                .score(&model.reshape(&keep_everything_in(model, &without))?)?
                .loss;
            if best.is_none_or(|(b, _)| loss < b) {
                best = Some((loss, i));
            }
        }
        let (loss, i) = best.expect("at least two layers to choose from");
        kept.remove(i);
        losses.push(loss);
    }
    Ok((kept, losses))
}

/// Absolute values (a removal that would lower the loss matters as much as one that raises it).
fn magnitudes(gradients: &[f64]) -> Vec<f64> {
    gradients.iter().map(|g| g.abs()).collect()
}

/// The mean magnitude of each hidden dimension of the residual stream over the real tokens of
/// `batches`, at the embeddings' output and after every layer.
fn hidden_importance(model: &Model, batches: &[ScoringBatch]) -> Result<Vec<f64>> {
    let mut sum: Option<Tensor> = None;
    let mut tokens = 0f64;
    for batch in batches {
        let inputs = &batch.inputs;
        let (b, _, _, t) = inputs.mask_bias.dims4()?;
        let real = inputs
            .mask_bias
            .eq(0f32)?
            .to_dtype(DType::F32)?
            .reshape((b, t, 1))?;
        tokens += real.sum_all()?.to_scalar::<f32>()? as f64;
        let mut h = model.embeddings.forward(inputs, Ops::Inference)?;
        let mut add = |h: &Tensor| -> Result<()> {
            let s = h.abs()?.broadcast_mul(&real)?.sum((0, 1))?;
            sum = Some(match sum.take() {
                Some(acc) => (acc + s)?,
                None => s,
            });
            Ok(())
        };
        add(&h)?;
        for l in 0..model.num_layers() {
            h = run_layers(
                &model.layers,
                &h,
                &inputs.mask_bias,
                l..l + 1,
                RunOptions::default(),
            )?;
            add(&h)?;
        }
    }
    let Some(sum) = sum else {
        bail!("shape: no selection sentences to measure the hidden dimensions on");
    };
    let per_token = (sum.to_dtype(DType::F64)? / tokens.max(1.0))?;
    Ok(per_token.to_vec1()?)
}
