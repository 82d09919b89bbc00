//! Significance-guided mixed-precision quantization. Every weight matrix (the word embeddings,
//! the six projections of each layer, the head's two) gets int4, int8 or stays float:
//!
//! - `bits = "8"` / `"4"`: every matrix at that precision (uniform);
//! - `bits = "mixed"`: matrices are visited from least to most significant per parameter and
//!   each is lowered to int4 if the selection engine accepts it, else to int8, else kept float.
//!   A layer matrix takes the significance of its block (attention or FFN, by ablation on the
//!   selection split, or from a `--significance` report); the word embeddings are visited first
//!   (a lookup table: each row's rounding error stays in its own token) and the head last (every
//!   prediction passes through it).
//!
//! For `mixed`, the pass also builds the models it should beat: uniform int8, uniform int4 and a
//! uniform mix of the same size (the same numbers of parameters at int4 and int8, on matrices
//! drawn in a seeded random order instead of by significance). The pipeline evaluates them beside
//! the result.
//!
//! Precision is per matrix, not per head slice or FFN group inside one: compressed-tensors gives
//! every module one scheme, so a matrix with mixed rows could not be exported in that format.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::journal::{Journal, TrialRecord};
use super::select::{Engine, Trial};
use super::{significance, Alternative, Pass, PassOutput, StageContext};
use crate::analyze::elements::{Element, Level};
use crate::analyze::report::{ElementSignificance, Report};
use crate::formats::quant::{scale_out_of_range, unquantizable, Bits, Precision, QuantMatrix};
use crate::model::linear::Weight;
use crate::model::matrices::Matrix;
use crate::model::Model;
use crate::progress;
use crate::scoring::score::Rule;

/// Which precisions the pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum BitsChoice {
    /// Every matrix int8.
    #[serde(rename = "8")]
    #[value(name = "8")]
    Eight,
    /// Every matrix int4.
    #[serde(rename = "4")]
    #[value(name = "4")]
    Four,
    /// int4, int8 or float per matrix, chosen by significance within the tolerance.
    #[serde(rename = "mixed")]
    Mixed,
}

/// What a lowered precision must preserve (`bits = "mixed"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum QuantMode {
    /// Keep a change only if the selection metric does not drop (ties: loss must not rise).
    Accuracy,
    /// Lower as many bytes as `--max-drop` allows.
    Size,
}

crate::settings! {
    /// Settings of the quantize pass: `[[stages]]` keys of a config, most of them also flags.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct QuantizeSettings;
    /// Settings of a quantize stage as flags. Unset flags take their defaults, or a config's
    /// values.
    pub struct QuantizeFlags;
    {
        /// 8: every matrix int8; 4: every matrix int4; mixed: int4, int8 or float per matrix,
        /// chosen by significance within --max-drop.
        #[flag(long, value_enum)]
        bits: BitsChoice = BitsChoice::Eight, "8";
        /// With --bits mixed: accuracy keeps a lower precision only if the selection metric does
        /// not drop; size lowers as much as --max-drop allows.
        #[flag(long = "mode", value_enum)]
        mode: QuantMode = QuantMode::Size, "size";
        /// Quantize the word embeddings too.
        #[switch_off(float_embeddings, "Keep the word embeddings float.")]
        embeddings: bool = true, "true";
        /// Read block significance from this report (of the same model) instead of computing it.
        #[flag_opt(long)]
        significance: PathBuf = None, "compute";
        /// With --bits mixed: build the uniform int8 / int4 and equal-size baselines next to the
        /// result.
        #[switch_off(no_compare, "With --bits mixed: skip the uniform int8 / int4 / equal-size comparison.")]
        compare: bool = true, "true";
        /// Seed of the equal-size mix's random order.
        seed: u64 = 0, "0";
    }
}

/// The precision one matrix ended with.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixOutcome {
    /// The matrix.
    #[serde(flatten)]
    pub matrix: Matrix,
    /// Its Hugging Face name.
    pub name: String,
    /// Parameters.
    pub params: usize,
    /// Final precision.
    pub precision: Precision,
    /// Why it stayed float although it was a candidate (not quantizable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_float: Option<String>,
}

/// The quantize pass.
pub struct Quantize {
    settings: QuantizeSettings,
    significance: Option<Report>,
}

impl Quantize {
    /// Checks the settings and reads the significance report, if any.
    pub fn new(settings: QuantizeSettings) -> Result<Self> {
        let significance = settings
            .significance
            .as_deref()
            .map(Report::load)
            .transpose()?;
        Ok(Quantize {
            settings,
            significance,
        })
    }

    /// The matrices this pass may quantize.
    fn targets(&self, model: &Model) -> Vec<Matrix> {
        let mut all = model.matrices();
        if !self.settings.embeddings {
            all.retain(|m| *m != Matrix::WordEmbeddings);
        }
        all
    }

    fn rule(&self, floor: Option<f64>) -> Result<Rule> {
        match (self.settings.mode, floor) {
            (QuantMode::Accuracy, _) => Ok(Rule::NotWorse),
            (QuantMode::Size, Some(floor)) => Ok(Rule::AtLeast(floor)),
            (QuantMode::Size, None) => bail!(
                "quantize --bits mixed in size mode needs --max-drop (e.g. 0.5 for half a metric point)"
            ),
        }
    }

    /// The targets in visiting order for a mixed run.
    fn order(&self, model: &Model, ctx: &StageContext) -> Result<Vec<Matrix>> {
        let blocks = match &self.significance {
            Some(r) => r.elements.clone(),
            None => {
                ctx.log("significance of blocks");
                significance(model, Level::Blocks, 32, None, ctx)?
            }
        };
        Ok(visiting_order(model, &self.targets(model), &blocks))
    }

    /// Every target at `bits` (those that cannot be quantized stay float).
    fn uniform(&self, model: &Model, bits: Bits) -> Result<Model> {
        let mut out = model.clone();
        for m in self.targets(model) {
            if let Some(w) = quantized(model, m, bits)? {
                out = out.with_weight(m, w)?;
            }
        }
        Ok(out)
    }

    /// The mixed search on the selection engine; returns the model and every decision in order.
    fn guided(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<(Model, Vec<TrialRecord>)> {
        let rule = self.rule(ctx.floor)?;
        let step = format!("stage {} quantize order", ctx.stage);
        let order = journal.begin_step(&step, || self.order(&model, ctx))?;
        let mut engine = Engine::new(model, ctx.batches)?;
        let bar = progress::bar(order.len() as u64, "quantize", ctx.quiet);
        let mut trials = Vec::new();
        for &m in &order {
            bar.inc(1);
            for bits in [Bits::Int4, Bits::Int8] {
                let Some(weight) = quantized(engine.model(), m, bits)? else {
                    continue;
                };
                let label = format!("{} {}", m.label(), Precision::from(bits).name());
                let trial = Trial {
                    layer: m.first_layer(engine.model()),
                    model: Some(engine.model().with_weight(m, weight)?),
                    gates: None,
                    label: label.clone(),
                };
                let verdict = engine.decide(trial, rule, journal)?;
                trials.push(TrialRecord {
                    label,
                    accepted: verdict.accepted,
                    score: verdict.score,
                });
                if verdict.accepted {
                    break;
                }
            }
        }
        bar.finish_and_clear();
        Ok((engine.into_parts().0, trials))
    }

    /// Uniform int8, uniform int4 and the equal-size random mix of `chosen`.
    fn alternatives(&self, original: &Model, chosen: &Model) -> Result<Vec<Alternative>> {
        let mut order = self.targets(original);
        shuffle(&mut order, self.settings.seed);
        let count = |bits| -> Result<usize> {
            let mut n = 0;
            for m in self.targets(chosen) {
                let w = chosen.weight(m)?;
                if w.precision() == Precision::from(bits) {
                    n += w.elem_count();
                }
            }
            Ok(n)
        };
        let mut mix = original.clone();
        let mut budget = [
            (Bits::Int4, count(Bits::Int4)?),
            (Bits::Int8, count(Bits::Int8)?),
        ];
        for m in order {
            let Some((bits, left)) = budget.iter_mut().find(|(_, left)| *left > 0) else {
                break;
            };
            if let Some(w) = quantized(original, m, *bits)? {
                *left = left.saturating_sub(w.elem_count());
                mix = mix.with_weight(m, w)?;
            }
        }
        Ok(vec![
            Alternative::new("uniform int8", self.uniform(original, Bits::Int8)?),
            Alternative::new("uniform int4", self.uniform(original, Bits::Int4)?),
            Alternative::new("equal-size random mix", mix),
        ])
    }

    /// What became of each matrix; `bits` is the precision a float target was offered last.
    fn outcomes(&self, model: &Model, bits: Bits) -> Result<Vec<MatrixOutcome>> {
        let targets = self.targets(model);
        model
            .matrices()
            .into_iter()
            .map(|m| {
                let w = model.weight(m)?;
                let kept_float = match targets.contains(&m) && w.precision() == Precision::Float {
                    true => why_float(&w.to_dense()?, bits)?,
                    false => None,
                };
                Ok(MatrixOutcome {
                    matrix: m,
                    name: m.hf_name(model),
                    params: w.elem_count(),
                    precision: w.precision(),
                    kept_float,
                })
            })
            .collect()
    }
}

/// What a quantize run reports: every matrix's precision, and the mixed search's trials.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// Every candidate matrix and the precision it ended with.
    pub matrices: Vec<MatrixOutcome>,
    /// The decisions of `bits = "mixed"` (none under uniform bits).
    pub trials: Vec<TrialRecord>,
}

impl Pass for Quantize {
    type Settings = QuantizeSettings;
    type Report = QuantizeReport;

    fn name(&self) -> &'static str {
        "quantize"
    }

    fn settings(&self) -> &QuantizeSettings {
        &self.settings
    }

    fn check_input(&self, model: &Model) -> Result<()> {
        if model.is_quantized() {
            bail!("quantize: the input is already quantized; quantize the float model once");
        }
        match (&self.significance, &self.settings.significance) {
            (Some(report), Some(path)) => report.check_model(model, path),
            _ => Ok(()),
        }
    }

    fn run(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<PassOutput<QuantizeReport>> {
        self.check_input(&model)?;
        let (out, trials, alternatives) = match self.settings.bits {
            BitsChoice::Eight => (self.uniform(&model, Bits::Int8)?, Vec::new(), Vec::new()),
            BitsChoice::Four => (self.uniform(&model, Bits::Int4)?, Vec::new(), Vec::new()),
            BitsChoice::Mixed => {
                let (chosen, trials) = self.guided(model.clone(), ctx, journal)?;
                let alternatives = match self.settings.compare {
                    true => self.alternatives(&model, &chosen)?,
                    false => Vec::new(),
                };
                (chosen, trials, alternatives)
            }
        };
        let last_offered = match self.settings.bits {
            BitsChoice::Four => Bits::Int4,
            BitsChoice::Eight | BitsChoice::Mixed => Bits::Int8,
        };
        let outcomes = self.outcomes(&out, last_offered)?;
        for o in &outcomes {
            if let Some(why) = &o.kept_float {
                ctx.log(&format!("quantize: {} stays float: {why}", o.name));
            }
        }
        let lowered = |p: Precision| outcomes.iter().filter(|o| o.precision == p).count();
        ctx.log(&format!(
            "quantize: {} matrices int4, {} int8, {} float",
            lowered(Precision::Int4),
            lowered(Precision::Int8),
            lowered(Precision::Float)
        ));
        Ok(PassOutput {
            model: out,
            details: QuantizeReport {
                matrices: outcomes,
                trials,
            },
            alternatives,
            files: Vec::new(),
        })
    }
}

/// `m` of `model` quantized to `bits`; `None` when it stays float ([`why_float`]).
fn quantized(model: &Model, m: Matrix, bits: Bits) -> Result<Option<Weight>> {
    let dense = model.weight(m)?.to_dense()?;
    if why_float(&dense, bits)?.is_some() {
        return Ok(None);
    }
    Ok(Some(Weight::Quantized(QuantMatrix::quantize(
        &dense,
        bits,
        model.runtime.execution,
    )?)))
}

/// Why the dense matrix `w` cannot be quantized to `bits`, if it cannot: its inner dimension
/// cannot be grouped, or a scale would fall outside fp16's range.
fn why_float(w: &candle_core::Tensor, bits: Bits) -> Result<Option<String>> {
    let cols = w.dims2()?.1;
    if let Some(why) = unquantizable(cols) {
        return Ok(Some(why));
    }
    let values = w.flatten_all()?.to_vec1::<f32>()?;
    Ok(scale_out_of_range(&values, cols, bits))
}

/// Targets from least to most significant per parameter: the embeddings first, then layer
/// matrices by their block's `loss_delta` divided by the matrix's parameters, the head last.
pub fn visiting_order(
    model: &Model,
    targets: &[Matrix],
    blocks: &[ElementSignificance],
) -> Vec<Matrix> {
    let block_delta = |m: Matrix| -> f64 {
        let Matrix::Layer { layer, projection } = m else {
            return 0.0;
        };
        let wanted = if projection.is_attention() {
            Element::AttentionBlock { layer }
        } else {
            Element::FfnBlock { layer }
        };
        blocks
            .iter()
            .find(|r| r.element == wanted)
            .map_or(f64::INFINITY, |r| r.loss_delta)
    };
    let key = |m: Matrix| -> f64 {
        match m {
            Matrix::WordEmbeddings => f64::NEG_INFINITY,
            Matrix::HeadDense | Matrix::HeadOut => f64::INFINITY,
            Matrix::Layer { .. } => {
                let params = model.weight(m).map_or(1, |w| w.elem_count()).max(1);
                block_delta(m) / params as f64
            }
        }
    };
    let mut order = targets.to_vec();
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    order
}

/// A seeded Fisher–Yates shuffle (xorshift64*), the same on every platform.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    for i in (1..items.len()).rev() {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        items.swap(i, (r % (i as u64 + 1)) as usize);
    }
}
