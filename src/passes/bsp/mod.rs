//! Block-structured pruning (Li et al. 2020, arXiv 2009.08065), in three phases:
//!
//! 1. **Reweighted group lasso**: train with `λ Σ_g γ_g ‖W_g‖₂` added over the groups of the
//!    chosen encoder matrices ([`crate::train::lasso`]); γ is refreshed from the weights at each
//!    evaluation point (so a resumed run refreshes it from the same weights). λ = 0 skips it.
//! 2. **Hard prune**: zero the groups with the smallest norms, a `ratio` of each matrix's groups
//!    (or of all groups against one global threshold). With `hard_prune = "obs"` each matrix
//!    loses as many groups, but the optimal brain surgeon chooses them on calibration sentences
//!    and corrects the weights that stay ([`obs`]).
//! 3. **Masked retraining**: train again with the pruned groups held at zero, keeping the
//!    parameters that score best on the selection split.
//!
//! With `prune_rounds` = n > 1, phases 2 and 3 repeat n times at a growing ratio (the cubic
//! schedule of Zhu & Gupta 2017, reaching `ratio` in the last round): each round prunes from the
//! weights the previous round's retraining left, on its own train sample, and only the last round
//! keeps its best parameters (the earlier ones keep their last).
//!
//! Column stripes are then stored without the removed groups; with whole rows or columns, FFN
//! neurons left without input or output are sliced out (see [`dead_neurons`]).
//!
//! A histogram of the group norms before the lasso, after it and after retraining is written
//! beside the report (`bsp-group-norms.svg`).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

mod dead_neurons;
mod obs;
mod penalty;
pub mod report;
mod storage;
mod surgeon;

use super::journal::Journal;
use super::{Pass, PassOutput, StageContext};
use crate::analyze::plots::histogram;
use crate::data::batch::{encode, EncodedSet};
use crate::measure::median;
use crate::model::encoder::EncoderLayer;
use crate::model::inputs::Inputs;
use crate::model::linear::{Linear, Weight};
use crate::model::Model;
use crate::progress;
use crate::train::checkpoint::{Evaluation, TrainLog};
use crate::train::fit::{fine_tune, Penalty, TrainRun, TrainSettings};
use crate::train::lasso::Grouping;
use crate::train::params::Trainable;
use dead_neurons::slice_dead_neurons;
use penalty::LassoPenalty;
use report::{BspReport, GroupNorms, MatrixKept, RoundReport, Stored};
use storage::store_striped;

/// The encoder matrices BSP may prune.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Matrix {
    /// The fused query/key/value projection (a column is an input of all three).
    Qkv,
    /// The attention output projection.
    AttentionOutput,
    /// The FFN's first projection.
    FfnIn,
    /// The FFN's second projection.
    FfnOut,
}

impl Matrix {
    /// This matrix's layer of `layer`, when the block is present.
    fn linear_mut(self, layer: &mut EncoderLayer) -> Option<&mut Linear> {
        match self {
            Matrix::Qkv => layer.attention.as_mut().map(|a| &mut a.qkv),
            Matrix::AttentionOutput => layer.attention.as_mut().map(|a| &mut a.output),
            Matrix::FfnIn => layer.ffn.as_mut().map(|f| &mut f.intermediate),
            Matrix::FfnOut => layer.ffn.as_mut().map(|f| &mut f.output),
        }
    }

    /// The parameter name of this matrix in layer `layer` (see [`Trainable`]).
    fn param(self, layer: usize) -> String {
        let part = match self {
            Matrix::Qkv => "attention.qkv",
            Matrix::AttentionOutput => "attention.output",
            Matrix::FfnIn => "ffn.intermediate",
            Matrix::FfnOut => "ffn.output",
        };
        format!("layer.{layer}.{part}.weight")
    }
}

/// Where the hard-prune threshold is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Threshold {
    /// The same ratio of every matrix's groups.
    PerMatrix,
    /// One norm threshold over the groups of every matrix.
    Global,
}

/// How the hard prune chooses the groups it removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HardPrune {
    /// The smallest group norms (the authors').
    Magnitude,
    /// As many groups per matrix, chosen and compensated by the optimal brain surgeon on
    /// calibration sentences ([`obs`]).
    Obs,
}

crate::settings! {
    /// Settings of the bsp pass (`[[stages]]` keys; `[stages.lasso]` and `[stages.retrain]` are
    /// the two training phases).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct BspSettings;
    {
        /// How each matrix is cut into groups: `{ stripes = N }`, `{ stripe-width = N }`,
        /// `{ blocks = N }`, `"rows"` or `"columns"`.
        grouping: Grouping = Grouping::Stripes(8), "{ stripes = 8 }";
        /// The matrices pruned, in every layer.
        matrices: Vec<Matrix> = vec![Matrix::Qkv, Matrix::AttentionOutput, Matrix::FfnIn, Matrix::FfnOut],
            "[\"qkv\", \"attention-output\", \"ffn-in\", \"ffn-out\"]";
        /// Lasso strength λ per matrix.
        lambda: f64 = 1e-4, "1e-4";
        /// Fraction of the groups removed.
        ratio: f64 = 0.5, "0.5";
        /// Per matrix or global threshold.
        threshold: Threshold = Threshold::PerMatrix, "per-matrix";
        /// Prune-and-retrain rounds that reach `ratio` gradually (1: one hard prune).
        prune_rounds: usize = 1, "1";
        /// How the hard prune chooses the groups: `magnitude` (smallest group norms) or `obs`
        /// (the optimal brain surgeon on calibration sentences).
        hard_prune: HardPrune = HardPrune::Magnitude, "magnitude";
        /// Train sentences whose inputs the surgeon fits (`hard_prune = "obs"`).
        calibration: usize = 1024, "1024";
        /// Phase 1: training with the penalty (the last parameters are kept); a table of
        /// `recover` keys.
        lasso: TrainSettings = TrainSettings::default(), "the recover defaults";
        /// Phase 3: training with the removed groups masked (the best on selection is kept); a
        /// table of `recover` keys.
        retrain: TrainSettings = TrainSettings::default(), "the recover defaults";
    }
}

/// The bsp pass.
pub struct Bsp {
    settings: BspSettings,
}

impl Bsp {
    /// Checks the settings.
    pub fn new(settings: BspSettings) -> Result<Self> {
        if !(settings.ratio > 0.0 && settings.ratio < 1.0) {
            bail!("bsp: ratio must be in (0, 1), e.g. 0.5");
        }
        if settings.prune_rounds == 0 || settings.calibration == 0 {
            bail!("bsp: prune_rounds and calibration must be at least 1");
        }
        if settings.matrices.is_empty() || settings.lambda.is_nan() || settings.lambda < 0.0 {
            bail!("bsp: name at least one matrix, and a lambda ≥ 0");
        }
        settings.lasso.check("bsp lasso")?;
        settings.retrain.check("bsp retrain")?;
        Ok(Bsp { settings })
    }

    /// The penalised matrices of `model`: (parameter name, weight). Refuses weights that are
    /// not float matrices or that the grouping does not tile.
    fn targets(&self, model: &Model) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let mut model = model.clone();
        for (l, layer) in model.layers.iter_mut().enumerate() {
            for &m in &self.settings.matrices {
                let Some(linear) = m.linear_mut(layer).filter(|x| x.out_features() > 0) else {
                    continue;
                };
                let Weight::Dense(w) = &linear.weight else {
                    bail!(
                        "bsp: {} is quantized or block-sparse; bsp needs float weights",
                        m.param(l)
                    );
                };
                let (o, i) = w.dims2()?;
                self.settings.grouping.grid(o, i)?;
                out.push((m.param(l), w.clone()));
            }
        }
        Ok(out)
    }
}

impl Pass for Bsp {
    type Settings = BspSettings;
    type Report = BspReport;

    fn name(&self) -> &'static str {
        "bsp"
    }

    fn settings(&self) -> &BspSettings {
        &self.settings
    }

    fn check_input(&self, model: &Model) -> Result<()> {
        self.targets(model).map(|_| ())
    }

    fn run(
        &self,
        model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<PassOutput<BspReport>> {
        let g = self.settings.grouping;
        let before = norms(&self.targets(&model)?, g)?;
        // 1. Reweighted group lasso.
        let (lassoed, lasso_evaluations) = self.lasso(&model, ctx, journal)?;
        let lassoed_targets = self.targets(&lassoed)?;
        let after_lasso = norms(&lassoed_targets, g)?;
        // 2 and 3. Hard prune and masked retraining, in one or more rounds.
        let Pruned {
            model: pruned,
            masks,
            log,
            rounds,
        } = self.prune_and_retrain(lassoed, ctx, journal)?;
        let after = norms(&self.targets(&pruned)?, g)?;
        // 4. Storage that skips the removed groups.
        // Whole rows and columns: FFN neurons left with no input or no output are sliced out.
        let (pruned, stored) = match g {
            Grouping::Stripes(_) | Grouping::StripeWidth(_) => {
                let (striped, storage) = store_striped(&pruned, &self.settings.matrices, g)?;
                let stored = Stored {
                    storage,
                    ffn_neurons_sliced: 0,
                };
                (striped, stored)
            }
            Grouping::Rows | Grouping::Columns => {
                let (sliced, ffn_neurons_sliced) = slice_dead_neurons(&pruned)?;
                let stored = Stored {
                    storage: Vec::new(),
                    ffn_neurons_sliced,
                };
                (sliced, stored)
            }
            Grouping::Blocks(_) => (pruned, Stored::default()),
        };
        let stages = [
            ("fine-tuned", flat(&before)),
            ("after group lasso", flat(&after_lasso)),
            ("after prune + retraining", flat(&after)),
        ];
        let trained = Trained {
            log,
            rounds,
            lasso_evaluations,
        };
        let details = self.details(&masks, trained, stored, &stages)?;
        ctx.log(&format!("bsp: {}", details.summary));
        Ok(PassOutput {
            model: pruned,
            details,
            alternatives: Vec::new(),
            files: vec![(
                "bsp-group-norms.svg".into(),
                self.plot(&stages).into_bytes(),
            )],
        })
    }
}

impl Bsp {
    /// Phase 1: training with the group-lasso penalty; the last parameters are kept (its
    /// evaluations go in the report: what the penalty costs before anything is pruned). None
    /// at λ = 0.
    fn lasso(
        &self,
        model: &Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<(Model, Vec<Evaluation>)> {
        let s = &self.settings;
        if s.lambda == 0.0 {
            ctx.log("bsp: λ = 0, no group-lasso phase");
            return Ok((model.clone(), Vec::new()));
        }
        let data = training_data(ctx, &s.lasso)?;
        ctx.log(&format!(
            "bsp: group lasso on {} train examples",
            data.sequences.len()
        ));
        let penalty = LassoPenalty::new(s, data.sequences.len(), ctx.batch_size);
        let penalise = |t: &Trainable, step: usize| penalty.value(t, step);
        let phase = Phase {
            penalty: Some(&penalise),
            masks: None,
            keep_best: false,
        };
        let (lassoed, log) = train_phase(ctx, journal, model, &s.lasso, &data, "lasso", phase)?;
        Ok((lassoed, log.evaluations))
    }

    /// Phases 2 and 3 in `prune_rounds` rounds.
    fn prune_and_retrain(
        &self,
        mut model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<Pruned> {
        let rounds = self.settings.prune_rounds;
        let (mut last, mut summary) = (None, Vec::new());
        for round in 1..=rounds {
            let ratio = scheduled_ratio(self.settings.ratio, round, rounds);
            let masks = self.masks(&self.targets(&model)?, ratio)?;
            let (pruned, masks, fits) = self.hard_prune(model, masks, round, ctx)?;
            let (retrained, log) = self.retrain(&pruned, &masks, round, ctx, journal)?;
            summary.push(RoundReport {
                round,
                ratio,
                surgeon: fits,
                kept: log.best,
            });
            model = retrained;
            last = Some((masks, log));
        }
        let (masks, log) = last.expect("at least one round (checked in `new`)");
        Ok(Pruned {
            model,
            masks,
            log,
            rounds: summary,
        })
    }

    /// Phase 2 of round `round`: the magnitude rule's `masks` as they are, or the surgeon's
    /// groups at the same share per matrix (the model with the groups removed, the masks, and
    /// the surgeon's errors per matrix).
    fn hard_prune(
        &self,
        model: Model,
        masks: BTreeMap<String, Tensor>,
        round: usize,
        ctx: &StageContext,
    ) -> Result<(Model, BTreeMap<String, Tensor>, Vec<obs::MatrixFit>)> {
        if self.settings.hard_prune == HardPrune::Magnitude {
            return Ok((model, masks, Vec::new()));
        }
        let seed = self.settings.retrain.seed + (round - 1) as u64;
        let calibration = calibration_batches(ctx, self.settings.calibration, seed)?;
        ctx.log(&format!(
            "bsp: surgeon prune on {} calibration sentences",
            self.settings.calibration
        ));
        let bar = progress::bar(masks.len() as u64, "bsp surgeon", ctx.quiet);
        let surgery = obs::operate(&model, &masks, self.settings.grouping, &calibration, &bar)?;
        bar.finish_and_clear();
        Ok((surgery.model, surgery.masks, surgery.fits))
    }

    /// Phase 3 of round `round`: training with the removed groups held at zero. The last round
    /// keeps the parameters that score best on selection, earlier rounds their last.
    fn retrain(
        &self,
        model: &Model,
        masks: &BTreeMap<String, Tensor>,
        round: usize,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<(Model, TrainLog)> {
        let rounds = self.settings.prune_rounds;
        let mut settings = self.settings.retrain.clone();
        settings.seed += (round - 1) as u64;
        let data = training_data(ctx, &settings)?;
        ctx.log(&format!(
            "bsp: masked retraining (round {round} of {rounds}) on {} train examples",
            data.sequences.len()
        ));
        let phase = Phase {
            penalty: None,
            masks: Some(masks),
            keep_best: round == rounds,
        };
        let name = match rounds {
            1 => "retrain".to_string(),
            _ => format!("retrain-{round}"),
        };
        train_phase(ctx, journal, model, &settings, &data, &name, phase)
    }

    /// The histogram of the group norms at each stage.
    fn plot(&self, stages: &[(&str, Vec<f64>)]) -> String {
        let series: Vec<(&str, &[f64])> = stages.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        histogram(
            &format!(
                "BSP group norms ({:?}, λ {:e})",
                self.settings.grouping, self.settings.lambda
            ),
            "group L2 norm (log scale); removed groups are 0 and not drawn",
            &series,
        )
    }
}

/// What the prune-and-retrain rounds leave.
struct Pruned {
    /// The model after the last round.
    model: Model,
    /// The last round's kept-entry masks.
    masks: BTreeMap<String, Tensor>,
    /// The last round's training log.
    log: TrainLog,
    /// Each round's ratio and kept evaluation, for the report.
    rounds: Vec<RoundReport>,
}

/// What the training phases left for the report: the last retraining's log, every round, and
/// the lasso's evaluations.
struct Trained {
    log: TrainLog,
    rounds: Vec<RoundReport>,
    lasso_evaluations: Vec<Evaluation>,
}

/// How one training phase differs from plain recovery.
struct Phase<'a> {
    penalty: Option<&'a Penalty<'a>>,
    masks: Option<&'a BTreeMap<String, Tensor>>,
    keep_best: bool,
}

/// Runs one training phase, checkpointed under its own name.
fn train_phase(
    ctx: &StageContext,
    journal: &mut Journal,
    model: &Model,
    settings: &TrainSettings,
    data: &EncodedSet,
    name: &str,
    phase: Phase,
) -> Result<(Model, TrainLog)> {
    let tag = format!("stage{}-bsp-{name}", ctx.stage);
    journal.begin_step(&tag, || Ok(()))?;
    let judge = |m: &Model| ctx.batches.score(m);
    let run = TrainRun {
        data,
        labels: ctx.labels,
        batch_size: ctx.batch_size,
        teacher: ctx.original,
        judge: &judge,
        checkpoint: journal.checkpoint(&tag)?,
        penalty: phase.penalty,
        masks: phase.masks,
        keep_best: phase.keep_best,
        quiet: ctx.quiet,
    };
    fine_tune(model, settings, &run)
}

/// The seeded train sample of a phase, tokenised.
fn training_data(ctx: &StageContext, settings: &TrainSettings) -> Result<EncodedSet> {
    let (train, _) = ctx.train_sample(settings.train_limit, settings.seed)?;
    encode(&train, "", ctx.encoder)
}

/// A seeded sample of `count` train sentences in length-sorted batches (the surgeon's inputs).
fn calibration_batches(ctx: &StageContext, count: usize, seed: u64) -> Result<Vec<Inputs>> {
    let (sample, _) = ctx.train_sample(Some(count), seed)?;
    let set = encode(&sample, "", ctx.encoder)?;
    let batches = crate::scoring::batch::batches(ctx.original, &set, ctx.labels, ctx.batch_size)?;
    Ok(batches.into_iter().map(|b| b.inputs).collect())
}

/// The share of groups removed after `round` of `rounds`: `ratio · (1 − (1 − round/rounds)³)`.
fn scheduled_ratio(ratio: f64, round: usize, rounds: usize) -> f64 {
    ratio * (1.0 - (1.0 - round as f64 / rounds as f64).powi(3))
}

/// Group norms of every target, by parameter name.
fn norms(targets: &[(String, Tensor)], g: Grouping) -> Result<BTreeMap<String, Vec<f32>>> {
    targets
        .iter()
        .map(|(n, w)| Ok((n.clone(), g.norms(w)?.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// The value below which a `ratio` of the sorted `values` lie (the smallest kept value).
fn quantile(sorted: &[f32], ratio: f64) -> f32 {
    let at = ((sorted.len() as f64 * ratio) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(at).copied().unwrap_or(0.0)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn flat(norms: &BTreeMap<String, Vec<f32>>) -> Vec<f64> {
    norms.values().flatten().map(|&x| x as f64).collect()
}

impl Bsp {
    /// The kept-entry masks of `targets` (1 kept, 0 removed) from their group norms, removing a
    /// `ratio` of the groups.
    fn masks(&self, targets: &[(String, Tensor)], ratio: f64) -> Result<BTreeMap<String, Tensor>> {
        let s = &self.settings;
        let g = s.grouping;
        let norms = norms(targets, g)?;
        let global = {
            let mut all: Vec<f32> = norms.values().flatten().copied().collect();
            all.sort_by(f32::total_cmp);
            quantile(&all, ratio)
        };
        let mut out = BTreeMap::new();
        for (name, w) in targets {
            let v = &norms[name];
            let threshold = match s.threshold {
                Threshold::Global => global,
                Threshold::PerMatrix => {
                    let mut sorted = v.clone();
                    sorted.sort_by(f32::total_cmp);
                    quantile(&sorted, ratio)
                }
            };
            let keep: Vec<f32> = v.iter().map(|&x| f32::from(x >= threshold)).collect();
            let (o, i) = w.dims2()?;
            let grid = Tensor::from_vec(keep, g.grid(o, i)?, w.device())?;
            out.insert(name.clone(), g.expand(&grid, o, i)?);
        }
        Ok(out)
    }

    /// What was removed, per matrix and in all.
    /// What was removed, per matrix and in all, how it is stored, and what training did.
    fn details(
        &self,
        masks: &BTreeMap<String, Tensor>,
        trained: Trained,
        stored: Stored,
        stages: &[(&'static str, Vec<f64>)],
    ) -> Result<BspReport> {
        let Trained {
            log,
            rounds,
            lasso_evaluations,
        } = trained;
        let mut matrices = BTreeMap::new();
        let (mut total, mut zero) = (0usize, 0usize);
        for (name, m) in masks {
            let weights = m.elem_count();
            let kept = m.sum_all()?.to_scalar::<f32>()? as usize;
            matrices.insert(name.clone(), MatrixKept { weights, kept });
            total += weights;
            zero += weights - kept;
        }
        let ratio = total as f64 / (total - zero).max(1) as f64;
        let group_norms = stages
            .iter()
            .map(|(stage, v)| GroupNorms {
                stage,
                mean: mean(v),
                median: median(v),
            })
            .collect();
        Ok(BspReport {
            summary: format!(
                "{zero} of {total} weights of the pruned matrices removed ({ratio:.2}× fewer); retraining kept step {}",
                log.best.step
            ),
            pruned_weights: total,
            removed_weights: zero,
            compression: ratio,
            matrices,
            retraining_kept: log.best,
            retraining_evaluations: log.evaluations,
            stored,
            group_norms,
            rounds,
            lasso_evaluations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_grows_to_the_ratio_fastest_at_first() {
        assert_eq!(scheduled_ratio(0.5, 1, 1), 0.5);
        let r: Vec<f64> = (1..=4).map(|k| scheduled_ratio(0.5, k, 4)).collect();
        assert_eq!(r[3], 0.5);
        assert!((r[0] - 0.5 * (1.0 - 0.75f64.powi(3))).abs() < 1e-12);
        let steps: Vec<f64> = [0.0]
            .iter()
            .chain(&r)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        assert!(steps.windows(2).all(|w| w[0] > w[1]), "{steps:?}");
    }

    #[test]
    fn zero_rounds_are_refused() {
        let settings = BspSettings {
            prune_rounds: 0,
            ..BspSettings::default()
        };
        assert!(Bsp::new(settings).is_err());
    }
}
