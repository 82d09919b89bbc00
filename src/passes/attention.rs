//! Approximate attention chosen per layer (Nagarajan et al. v1: sign matching; AxFormer:
//! selective hard top-k attention). Each layer's attention is switched to the method at every K
//! of a small grid; the significance of a layer is the selection loss change when it is switched
//! at the smallest K, measured on the selection engine's cached hidden states (the states entering
//! the layer are computed once). Layers are then tried greedily from the least significant, each
//! with the grid's K from smallest to largest: the first K the engine accepts is kept.
//!
//! - `accuracy`: a switch is kept only if the selection metric does not drop (ties: loss must
//!   not rise);
//! - `size` / `speed`: switch as many layers as `--max-drop` allows. Attention holds no
//!   parameters, so both modes make the same decisions; what the switch buys is time, shown by
//!   `bench` (only at sequence lengths where the kernel pays: see the README).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::journal::{Journal, TrialRecord};
use super::select::{Engine, Trial};
use super::{Pass, PassOutput, StageContext};
use crate::kernels::attention_mode::{ApproxAttention, Keep, KeySelector};
use crate::model::Model;
use crate::progress;
use crate::scoring::goal::Mode;
use crate::scoring::score::Score;

/// The K tried per layer when none are given: fractions of each sequence's length.
pub const DEFAULT_GRID: [Keep; 3] = [
    Keep::Fraction(0.125),
    Keep::Fraction(0.25),
    Keep::Fraction(0.5),
];

crate::settings! {
    /// Settings of the attention pass: `[[stages]]` keys of a config, and flags.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct AttentionSettings;
    /// Settings of an attention stage as flags. Unset flags take their defaults.
    pub struct AttentionFlags;
    {
        /// How each query's kept keys are chosen: sign-match (most matching signs, on packed
        /// sign bits) or hard-topk (largest scores).
        #[flag(long, value_enum)]
        method: KeySelector = KeySelector::SignMatch, "sign-match";
        /// Keys kept per query, tried per layer from fewest to most, comma-separated: a number
        /// (`4`) or a fraction of the unpadded length (`0.25`); an empty list is refused.
        #[flag_opt(long, value_parser = Keep::parse, value_delimiter = ',')]
        k: Vec<Keep> = None, "0.125,0.25,0.5";
        /// accuracy: keep a switch only if the selection metric does not drop; size / speed:
        /// switch as many layers as --max-drop allows (the same decisions: attention holds no
        /// parameters).
        #[flag(long, value_enum)]
        mode: Mode = Mode::Accuracy, "accuracy";
    }
}

/// The loss change of switching one layer's attention, at the grid's smallest K.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSignificance {
    /// Encoder layer.
    pub layer: usize,
    /// Selection loss with the switch minus without.
    pub loss_delta: f64,
    /// Selection metric with the switch minus without.
    pub metric_delta: f64,
}

/// The attention pass.
pub struct AttentionPass {
    settings: AttentionSettings,
}

impl AttentionPass {
    /// Checks the settings.
    pub fn new(settings: AttentionSettings) -> Result<Self> {
        let grid = settings.k.as_deref().unwrap_or_default();
        if let Some(bad) = grid.iter().find(|k| !k.is_valid()) {
            bail!("attention: k = {bad} must be a number of keys ≥ 1 or a fraction in (0, 1]");
        }
        if settings.k.as_ref().is_some_and(Vec::is_empty) {
            bail!("attention: k = [] tries nothing; list at least one K (a number of keys ≥ 1 or a fraction in (0, 1]), or leave k out for the default 0.125, 0.25, 0.5");
        }
        Ok(AttentionPass { settings })
    }

    /// The approximations tried per layer, fewest kept keys first at the selection data's median
    /// length.
    fn grid(&self, ctx: &StageContext) -> Vec<ApproxAttention> {
        let mut lengths: Vec<usize> = ctx
            .selection
            .set
            .sequences
            .iter()
            .map(|s| s.ids.len())
            .collect();
        lengths.sort_unstable();
        let median = lengths.get(lengths.len() / 2).copied().unwrap_or(1);
        let mut grid = match &self.settings.k {
            None => DEFAULT_GRID.to_vec(),
            Some(k) => k.clone(),
        };
        grid.sort_by_key(|k| k.keys(median));
        grid.into_iter()
            .map(|k| ApproxAttention {
                method: self.settings.method,
                k,
            })
            .collect()
    }
}

/// Layers with attention heads still dense.
fn dense_layers(model: &Model) -> Vec<usize> {
    let layers = model.layers.iter().enumerate();
    layers
        .filter(|(_, l)| {
            l.attention
                .as_ref()
                .is_some_and(|a| !a.heads.is_empty() && a.approx.is_none())
        })
        .map(|(i, _)| i)
        .collect()
}

/// The trial switching `layer` of the accepted model to `mode`.
fn switch(engine: &Engine, layer: usize, mode: ApproxAttention) -> Result<Trial> {
    Ok(Trial {
        layer: Some(layer),
        model: Some(engine.model().with_attention_mode(layer, Some(mode))?),
        gates: None,
        label: format!("L{layer} {mode}"),
    })
}

/// Every dense layer's significance at `mode`, least significant (lowest loss change) first.
fn rank(engine: &mut Engine, mode: ApproxAttention, quiet: bool) -> Result<Vec<LayerSignificance>> {
    let layers = dense_layers(engine.model());
    let bar = progress::bar(layers.len() as u64, "attention significance", quiet);
    let base = engine.score();
    let mut out = Vec::new();
    for layer in layers {
        let trial = switch(engine, layer, mode)?;
        let score = engine.measure(&trial)?;
        out.push(LayerSignificance {
            layer,
            loss_delta: score.loss - base.loss,
            metric_delta: score.metric - base.metric,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    out.sort_by(|a, b| {
        a.loss_delta
            .total_cmp(&b.loss_delta)
            .then(a.layer.cmp(&b.layer))
    });
    Ok(out)
}

/// A layer switched to approximate attention.
#[derive(Debug, Clone, Serialize)]
pub struct Switched {
    /// Encoder layer.
    pub layer: usize,
    /// Its attention.
    #[serde(flatten)]
    pub mode: ApproxAttention,
    /// The selection score after the switch.
    pub after: Score,
}

/// What an attention run reports.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionReport {
    /// The K tried per layer, smallest first.
    pub grid: Vec<Keep>,
    /// The layers in the order they were tried, with their significance.
    pub significance: Vec<LayerSignificance>,
    /// Every decision.
    pub trials: Vec<TrialRecord>,
    /// The layers switched, with their K and the selection score after.
    pub switched: Vec<Switched>,
}

impl Pass for AttentionPass {
    type Settings = AttentionSettings;
    type Report = AttentionReport;

    fn name(&self) -> &'static str {
        "attention"
    }

    fn settings(&self) -> &AttentionSettings {
        &self.settings
    }

    fn run(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<PassOutput<AttentionReport>> {
        let rule = self.settings.mode.rule("attention", ctx.floor)?;
        let grid = self.grid(ctx);
        let mut engine = Engine::new(model, ctx.batches)?;
        let before = engine.score();
        let step = format!("stage {} attention significance", ctx.stage);
        let order = journal.begin_step(&step, || rank(&mut engine, grid[0], ctx.quiet))?;
        let bar = progress::bar(order.len() as u64, "attention", ctx.quiet);
        let (mut trials, mut switched) = (Vec::new(), Vec::new());
        for significance in &order {
            bar.inc(1);
            for &mode in &grid {
                let trial = switch(&engine, significance.layer, mode)?;
                let label = trial.label.clone();
                let verdict = engine.decide(trial, rule, journal)?;
                trials.push(TrialRecord {
                    label,
                    accepted: verdict.accepted,
                    score: verdict.score,
                });
                if let (true, Some(after)) = (verdict.accepted, verdict.score) {
                    let layer = significance.layer;
                    switched.push(Switched { layer, mode, after });
                    break;
                }
            }
        }
        bar.finish_and_clear();
        let names: Vec<String> = switched
            .iter()
            .map(|s| format!("L{} k={}", s.layer, s.mode.k))
            .collect();
        ctx.log(&format!(
            "attention: {} of {} layers switched to {} [{}], selection {:.4} → {:.4}",
            switched.len(),
            order.len(),
            self.settings.method.name(),
            names.join(", "),
            before.metric,
            engine.score().metric
        ));
        Ok(PassOutput {
            model: engine.into_parts().0,
            details: AttentionReport {
                grid: grid.iter().map(|m| m.k).collect(),
                significance: order,
                trials,
                switched,
            },
            alternatives: Vec::new(),
            files: Vec::new(),
        })
    }
}
