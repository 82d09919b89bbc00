//! Accuracy-driven, hierarchical, greedy pruning (AxFormer): blocks first, then heads inside
//! kept attention blocks, then FFN neuron groups inside kept FFN blocks. At each level the
//! candidates are visited from least to most significant (significance recomputed on the
//! current model, or read from a report of this very model); the selection engine decides each
//! tentative removal (gates). After each level the model is sliced physically and, by default,
//! re-fit layer by layer against the original ([`super::reconstruct`]); a level whose re-fit
//! model falls below its floor keeps only the longest prefix of its removals that holds it
//! (`Settle`). Under size / speed each level spends only its share of the tolerance.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::compensate::{proposed_ffn, FfnCompensation, Proposal};
use super::journal::{Journal, TrialRecord};
use super::reconstruct::{reconstruct, BlockFit, DEFAULT_RIDGE};
use super::select::{Engine, Trial};
use super::{significance, Alternative, Pass, PassOutput, StageContext};
use crate::analyze::check_budget;
use crate::analyze::elements::{check_group_size, Element, Level};
use crate::analyze::report::{ElementSignificance, Report};
use crate::analyze::summary::short_name;
use crate::data::batch::encode;
use crate::model::slice::LayerKeep;
use crate::model::Model;
use crate::progress;
use crate::scoring::batch::{batches, ScoringBatch};
use crate::scoring::goal::Mode;
use crate::scoring::score::{Rule, Score};

crate::settings! {
    /// Settings of the prune pass: `[[stages]]` keys of a config, most of them also flags.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct PruneSettings;
    /// Settings of a prune stage as flags. Unset flags take their defaults, or a config's values
    /// under `compress` (where they apply to every prune stage).
    pub struct PruneFlags;
    {
        /// accuracy: keep removals that do not lower the selection metric; size / speed: remove
        /// within --max-drop, favouring parameters / latency saved.
        #[flag(long, value_enum)]
        mode: Mode = Mode::Accuracy, "accuracy";
        /// Levels to prune, in order blocks → heads → groups.
        #[flag(long, value_enum, value_delimiter = ',')]
        levels: Vec<Level> = vec![Level::Blocks, Level::Heads, Level::Groups], "blocks,heads,groups";
        /// FFN neurons per group (pruned widths stay multiples of it).
        #[flag(long)]
        group_size: usize = 32, "32";
        /// Cap on tentative removals decided (all levels together).
        #[flag_opt(long)]
        budget: usize = None, "no cap";
        /// Stop a level after this many consecutive rejected removals (0: never); candidates come
        /// in ascending significance, so long runs of rejections rarely end.
        #[flag(long)]
        patience: usize = 20, "20";
        /// Read significance from this report (of the same model) instead of recomputing it per
        /// level.
        #[flag_opt(long)]
        significance: PathBuf = None, "recompute";
        /// Forward-pass equivalents each level's significance analysis may spend (as `analyze
        /// --budget-passes`): a Taylor pass ranks every candidate, and the least significant by
        /// it are ablated exactly first; for models the size of BERT-base and up.
        #[flag_opt(long, value_name = "N")]
        analysis_budget: f64 = None, "no budget: every candidate ablated";
        // Unset: on under size and speed, where it holds the tolerance on unseen data, but not
        // under accuracy, where the removals that help the task would be fitted back towards the
        // original, nor when a recovery stage follows, where the re-fit of a deep prune
        // over-fits the selection split and training never beats it there (all measured).
        /// Re-fit the output projections layer by layer after each level: true or false.
        #[flag_opt(long)]
        reconstruct: bool = None, "true under size and speed without a recovery after the prune, else false";
        /// Ridge strength of the layer-wise re-fit, relative to the mean feature energy.
        #[flag(long)]
        ridge: f64 = DEFAULT_RIDGE, "0.1";
        /// Train sentences the re-fit is fitted on, drawn outside the selection (the selection
        /// data itself when the task has no train split): a re-fit on the selection data would
        /// make the selection metric that judges it an in-sample figure.
        #[flag(long)]
        calibration: usize = 512, "512";
        /// Under size / speed, give each level an equal cumulative share of the tolerance.
        share_tolerance: bool = true, "true";
        /// With reconstruction under size / speed: how far below its floor a level's search may
        /// go before the re-fit, in multiples of the allowance.
        reconstruct_slack: f64 = 3.0, "3";
        /// Under size / speed with a recovery after the prune: how far below the floor the prune
        /// may go, in multiples of --max-drop; the recovery is to win it back, and the result is
        /// judged against --max-drop itself.
        #[flag(long)]
        recover_slack: f64 = 1.0, "1";
        // More than one round over-fits the selection split (measured).
        /// Passes over the levels; a later round re-ranks and retries on the re-fit model (it
        /// stops early when a round removes nothing).
        #[flag(long)]
        rounds: usize = 1, "1";
        // Off by default: on MiniLM / SST-2 it removed 157 of 192 groups instead of a few, but
        // lost 3.4 points on the report split (measured).
        /// With the re-fit: judge each FFN group removal with its layer's output projection
        /// already corrected (closed-form least squares): true or false.
        #[flag(long)]
        compensate: bool = false, "false";
    }
}

/// Why a level stopped visiting candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// Every candidate was visited.
    Exhausted,
    /// The budget of decisions ran out.
    Budget,
    /// `patience` rejections in a row.
    Patience,
}

/// One element the pass removed, with the selection score after removing it.
#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    /// The element (heads by original index, groups by neuron positions at that level).
    #[serde(flatten)]
    pub element: Element,
    /// Selection loss and metric after the removal.
    pub after: Score,
}

/// The outcome of one level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelOutcome {
    /// The level.
    pub level: Level,
    /// Candidates in visiting order.
    pub candidates: usize,
    /// Why the level stopped.
    pub stop: Stop,
    /// Every decision in order (`score` is null where the evaluation stopped early because
    /// acceptance had become impossible).
    pub trials: Vec<TrialRecord>,
    /// Accepted removals in order.
    pub removed: Vec<Removal>,
    /// Selection score at the end of the level.
    pub score: Score,
    /// The layer-wise re-fit after the level, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconstruction: Option<Reconstruction>,
    /// Accepted removals taken back because the re-fit model fell below the level's floor.
    pub undone: usize,
}

/// A level's layer-wise reconstruction.
#[derive(Debug, Clone, Serialize)]
pub struct Reconstruction {
    /// Every block re-fit, with its error before and after.
    pub blocks: Vec<BlockFit>,
    /// Selection score after the re-fit.
    pub score: Score,
}

/// The prune pass.
pub struct Prune {
    settings: PruneSettings,
    significance: Option<Report>,
}

impl Prune {
    /// Checks the settings and reads the significance report, if any.
    pub fn new(mut settings: PruneSettings) -> Result<Self> {
        settings.levels.sort();
        settings.levels.dedup();
        if settings.levels.is_empty() {
            bail!("prune: levels is empty; use some of blocks, heads, groups");
        }
        if settings.group_size == 0 {
            bail!("--group-size must be at least 1");
        }
        if settings.calibration == 0 {
            bail!(
                "prune: calibration must be at least 1 (train sentences the re-fit is fitted on)"
            );
        }
        if settings.rounds == 0 {
            bail!("prune: rounds must be at least 1 (passes over the levels)");
        }
        let s = &settings;
        if [s.ridge, s.reconstruct_slack, s.recover_slack]
            .iter()
            .any(|x| x.is_nan() || *x < 0.0)
        {
            bail!("prune: ridge, reconstruct_slack and recover_slack must be non-negative numbers");
        }
        if settings.significance.is_some() && settings.analysis_budget.is_some() {
            bail!("prune: analysis_budget applies to the analysis a significance report replaces; drop one of them");
        }
        check_budget(settings.analysis_budget, "prune: analysis_budget")?;
        let significance = settings
            .significance
            .as_deref()
            .map(Report::load)
            .transpose()?;
        Ok(Prune {
            settings,
            significance,
        })
    }

    /// The rule of level `index` of `count`. Under size and speed with `share_tolerance`, each
    /// level may spend only its cumulative equal share of the allowance left at the stage's
    /// `start` metric, so the first level cannot spend it all.
    fn level_rule(&self, rule: Rule, start: f64, index: usize, count: usize) -> Rule {
        match rule {
            Rule::AtLeast(floor)
                if self.settings.share_tolerance && start > floor && index + 1 < count =>
            {
                let share = (index + 1) as f64 / count as f64;
                Rule::AtLeast(start - (start - floor) * share)
            }
            _ => rule,
        }
    }

    /// Whether levels are re-fit: as set, else under size and speed when no recovery follows.
    fn reconstructs(&self, recovery_follows: bool) -> bool {
        self.settings
            .reconstruct
            .unwrap_or(self.settings.mode != Mode::Accuracy && !recovery_follows)
    }

    /// The stage's rule: under size / speed with a recovery after it, `recover_slack` times the
    /// allowance (from the stage's `start` metric) below the run's floor.
    fn stage_rule(&self, rule: Rule, start: f64, recovery_follows: bool) -> Rule {
        if recovery_follows {
            below_floor(rule, start, self.settings.recover_slack)
        } else {
            rule
        }
    }

    /// The rule the level's search decides by. With reconstruction under size / speed, the
    /// search may go `reconstruct_slack` times the allowance below the level's floor: the re-fit
    /// recovers most of it, and [`Settle`] keeps only what holds the floor after the re-fit.
    fn search_rule(&self, floor: Rule, start: f64, reconstructs: bool) -> Rule {
        if reconstructs {
            below_floor(floor, start, self.settings.reconstruct_slack)
        } else {
            floor
        }
    }

    /// The re-fit's sentences: `calibration` train sentences outside the selection, batched;
    /// `None` (the selection data) when the task's data has no train split.
    fn calibration(&self, model: &Model, ctx: &StageContext) -> Result<Option<Vec<ScoringBatch>>> {
        let seed = ctx.selection.info.seed.unwrap_or(0);
        let sample = match ctx.train_sample(Some(self.settings.calibration), seed) {
            Ok((sample, _)) => sample,
            Err(e) => {
                ctx.log(&format!(
                    "the re-fit is fitted on the selection data, which then judges it in-sample: {e:#}"
                ));
                return Ok(None);
            }
        };
        let set = encode(&sample, "", ctx.encoder)?;
        Ok(Some(batches(model, &set, ctx.labels, ctx.batch_size)?))
    }

    /// The level's candidates in visiting order, from the report or a fresh analysis.
    fn candidates(&self, model: &Model, level: Level, ctx: &StageContext) -> Result<Vec<Element>> {
        let results = match &self.significance {
            Some(r) => r.elements.clone(),
            None => {
                ctx.log(&format!("significance of {}", level.name()));
                let s = &self.settings;
                significance(model, level, s.group_size, s.analysis_budget, ctx)?
            }
        };
        let set = &ctx.selection.set;
        let mean_len = set.sequences.iter().map(|s| s.ids.len()).sum::<usize>() as f64
            / set.sequences.len().max(1) as f64;
        Ok(visiting_order(
            model,
            &results,
            level,
            self.settings.mode,
            mean_len,
        ))
    }
}

/// What a prune reports: each level's search, in order.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// The levels pruned.
    pub levels: Vec<LevelOutcome>,
}

impl Pass for Prune {
    type Settings = PruneSettings;
    type Report = PruneReport;

    fn name(&self) -> &'static str {
        "prune"
    }

    fn settings(&self) -> &PruneSettings {
        &self.settings
    }

    fn check_settings(&self, model: &Model) -> Result<()> {
        if self.settings.levels.contains(&Level::Groups) {
            check_group_size(model, self.settings.group_size)?;
        }
        Ok(())
    }

    fn check_input(&self, model: &Model) -> Result<()> {
        if model.is_quantized() {
            bail!("prune: the input is quantized; prune the float model, then quantize (after quantization only recover and vocab may run)");
        }
        self.check_settings(model)?;
        match (&self.significance, &self.settings.significance) {
            (Some(report), Some(path)) => report.check_model(model, path),
            _ => Ok(()),
        }
    }

    fn run(
        &self,
        mut model: Model,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<PassOutput<PruneReport>> {
        self.check_input(&model)?;
        let rule = self.settings.mode.rule("prune", ctx.floor)?;
        let reconstructs = self.reconstructs(ctx.recovery_follows);
        let calibration = match reconstructs {
            true => self.calibration(&model, ctx)?,
            false => None,
        };
        let calibration = calibration.as_deref().unwrap_or(&ctx.batches.batches);
        let original = model.clone();
        // The same removals without any re-fit: what reconstruction is compared with.
        let mut plain = model.clone();
        let mut budget = self.settings.budget.unwrap_or(usize::MAX);
        let mut outcomes = Vec::new();
        let start = match rule.floor() {
            Some(_) => ctx.batches.score(&model)?.metric,
            None => f64::NAN,
        };
        let rule = self.stage_rule(rule, start, ctx.recovery_follows);
        let levels = &self.settings.levels;
        let rounds = self.settings.rounds;
        let steps = (0..rounds).flat_map(|round| levels.iter().map(move |&l| (round, l)));
        for (index, (round, level)) in steps.enumerate() {
            if budget == 0 {
                ctx.log(&format!("{}: skipped, the budget is spent", level.name()));
                break;
            }
            if round > 0 && index % levels.len() == 0 && !removed_in_round(&outcomes, levels.len())
            {
                break;
            }
            let step = format!(
                "stage {} prune {} round {}",
                ctx.stage,
                level.name(),
                round + 1
            );
            let order = journal.begin_step(&step, || self.candidates(&model, level, ctx))?;
            check_elements(&model, &order).with_context(|| {
                format!("{step}: a candidate from the progress file or the significance report does not fit the model; delete the progress file (or run without --resume)")
            })?;
            let floor = self.level_rule(rule, start, index, rounds * levels.len());
            let level_run = self.level_run(level, floor, start, reconstructs);
            let input = model.clone();
            let (sliced, plan, mut outcome, replayed) =
                level_run.run(model, &order, &mut budget, ctx, journal)?;
            let (next, plan) = match reconstructs && !outcome.removed.is_empty() {
                true => {
                    let settle = Settle {
                        original: &original,
                        input: &input,
                        floor: Settled::of_rule(floor, &input, ctx)?,
                        compensated: level_run.compensate,
                        calibration,
                    };
                    settle.run(self.settings.ridge, &mut outcome, ctx)?
                }
                false => (sliced, plan),
            };
            plain = plain.slice(&plan)?;
            model = next;
            ctx.log(&outcome.summary(replayed));
            outcomes.push(outcome);
        }
        Ok(PassOutput {
            model,
            details: PruneReport { levels: outcomes },
            alternatives: match reconstructs {
                true => vec![Alternative::new("same removals, no reconstruction", plain)],
                false => Vec::new(),
            },
            files: Vec::new(),
        })
    }
}

impl Prune {
    /// The search of `level` under the level's `floor`: compensated FFN group trials already
    /// include most of the re-fit, so they get no slack; the others get the search's.
    fn level_run(&self, level: Level, floor: Rule, start: f64, reconstructs: bool) -> LevelRun {
        let compensate = level == Level::Groups && reconstructs && self.settings.compensate;
        LevelRun {
            level,
            rule: match compensate {
                true => floor,
                false => self.search_rule(floor, start, reconstructs),
            },
            patience: self.settings.patience,
            compensate,
        }
    }
}

impl LevelOutcome {
    /// The log line of a finished level.
    fn summary(&self, replayed: usize) -> String {
        format!(
            "{}: removed {} of {} ({} decided, {replayed} replayed from the progress file, {} taken back after the re-fit), the search ended at selection {:.4}",
            self.level.name(),
            self.removed.len(),
            self.candidates,
            self.trials.len(),
            self.undone,
            self.score.metric
        )
    }
}

/// One level of greedy removal.
struct LevelRun {
    level: Level,
    rule: Rule,
    patience: usize,
    /// Judge each FFN group removal with its layer's output projection already corrected
    /// ([`FfnCompensation`]) instead of by gates on the uncorrected model.
    compensate: bool,
}

impl LevelRun {
    /// Visits `order`, keeping the removals the engine accepts; returns the sliced model, the
    /// plan it was sliced by, the outcome and how many verdicts were replayed from the journal.
    fn run(
        &self,
        model: Model,
        order: &[Element],
        budget: &mut usize,
        ctx: &StageContext,
        journal: &mut Journal,
    ) -> Result<(Model, Vec<LayerKeep>, LevelOutcome, usize)> {
        let mut compensations = Compensations::new(model.clone());
        let mut engine = Engine::new(model, ctx.batches)?;
        let mut plan = engine.model().keep_all();
        let bar = progress::bar(order.len() as u64, self.level.name(), ctx.quiet);
        let (mut trials, mut removed, mut replayed) = (Vec::new(), Vec::new(), 0);
        let mut stop = Stop::Exhausted;
        for e in order {
            if *budget == 0 {
                stop = Stop::Budget;
                break;
            }
            if self.patience > 0 && rejected_in_a_row(&trials) >= self.patience {
                stop = Stop::Patience;
                break;
            }
            bar.inc(1);
            let mut tentative = plan.clone();
            if !remove(&mut tentative, e) {
                continue;
            }
            *budget -= 1;
            let (trial, proposal) = match (self.compensate, e) {
                (true, Element::Group { layer, neurons, .. }) => {
                    let (trial, proposal) =
                        compensations.trial(e, *layer, neurons, &plan, &mut engine, ctx)?;
                    (trial, Some((*layer, proposal)))
                }
                _ => {
                    let trial = Trial {
                        layer: Some(e.layer()),
                        model: None,
                        gates: Some(engine.model().gates_for(&tentative)?),
                        label: short_name(e),
                    };
                    (trial, None)
                }
            };
            let verdict = engine.decide(trial, self.rule, journal)?;
            replayed += usize::from(verdict.replayed);
            if let (true, Some(after)) = (verdict.accepted, verdict.score) {
                if let Some((layer, proposal)) = &proposal {
                    compensations.accept(*layer, proposal)?;
                }
                plan = tentative;
                removed.push(Removal {
                    element: e.clone(),
                    after,
                });
            }
            trials.push(TrialRecord {
                label: short_name(e),
                accepted: verdict.accepted,
                score: verdict.score,
            });
        }
        bar.finish_and_clear();
        let score = engine.score();
        let (model, _) = engine.into_parts();
        // Compensated trials carry sliced models, so the engine's model is already the result.
        let model = match self.compensate {
            true => model,
            false => model.slice(&plan)?,
        };
        let outcome = LevelOutcome {
            level: self.level,
            candidates: order.len(),
            stop,
            trials,
            removed,
            score,
            reconstruction: None,
            undone: 0,
        };
        Ok((model, plan, outcome, replayed))
    }
}

/// The output-projection corrections of a level's compensated FFN group trials, one per layer,
/// made when the layer's first group is tried.
struct Compensations {
    /// The level's input model (the FFNs the corrections start from).
    input: Model,
    per_layer: Vec<Option<FfnCompensation>>,
}

impl Compensations {
    fn new(input: Model) -> Self {
        let per_layer = (0..input.num_layers()).map(|_| None).collect();
        Compensations { input, per_layer }
    }

    /// The trial of removing `neurons` from `layer`'s FFN with its output projection corrected
    /// (the engine's model, that FFN replaced), labelled by `element`, and the correction it
    /// proposes.
    fn trial(
        &mut self,
        element: &Element,
        layer: usize,
        neurons: &[usize],
        plan: &[LayerKeep],
        engine: &mut Engine,
        ctx: &StageContext,
    ) -> Result<(Trial, Proposal)> {
        if self.per_layer[layer].is_none() {
            let entering = engine.states_entering(layer)?;
            self.per_layer[layer] = Some(FfnCompensation::new(
                &engine.model().layers[layer],
                plan[layer].neurons.clone().context("the FFN is removed")?,
                &entering,
                &ctx.batches.batches,
            )?);
        }
        let comp = self.per_layer[layer].as_ref().expect("just made");
        let proposal = comp.propose(neurons)?;
        let mut model = engine.model().clone();
        let ffn = self.input.layers[layer].ffn.as_ref().context("no FFN")?;
        model.layers[layer].ffn = Some(proposed_ffn(ffn, &proposal)?);
        let trial = Trial {
            layer: Some(layer),
            model: Some(model),
            gates: None,
            label: short_name(element),
        };
        Ok((trial, proposal))
    }

    /// Keeps an accepted trial's correction for the layer's next trials.
    fn accept(&mut self, layer: usize, proposal: &Proposal) -> Result<()> {
        let comp = self.per_layer[layer].as_mut().expect("made for the trial");
        comp.accept(proposal)
    }
}

/// After a level: the re-fit of all its accepted removals when that holds `floor`; otherwise the
/// longest prefix that holds it, re-fit (a binary search over the prefixes longer than the plain
/// one) or, when no longer prefix holds re-fit, the longest that the search left holding it
/// without a re-fit. Under the guard a re-fit can lose examples the search's model kept: it is
/// fitted to the original's hidden states, not to the selection.
struct Settle<'a> {
    original: &'a Model,
    input: &'a Model,
    floor: Settled,
    /// The level's trials carried compensated FFNs (not plain slices of `input`).
    compensated: bool,
    /// The sentences the re-fit is fitted on.
    calibration: &'a [ScoringBatch],
}

/// What a re-fit level must hold.
#[derive(Debug, Clone, Copy)]
enum Settled {
    /// The guarded metric at or above a floor.
    Guarded(f64),
    /// The metric at or above the level input's (accuracy mode without a floor).
    NotBelow(f64),
}

impl Settled {
    /// What a level decided under `rule` must hold after its re-fit: the rule's floor, else
    /// (no floor) the metric of the level's `input`.
    fn of_rule(rule: Rule, input: &Model, ctx: &StageContext) -> Result<Self> {
        Ok(match rule.floor() {
            Some(f) => Settled::Guarded(f),
            None => Settled::NotBelow(ctx.batches.score(input)?.metric),
        })
    }

    fn holds(self, score: &Score) -> bool {
        match self {
            Settled::Guarded(f) => score.judged() >= f,
            Settled::NotBelow(f) => score.metric >= f,
        }
    }

    fn value(self) -> f64 {
        match self {
            Settled::Guarded(f) | Settled::NotBelow(f) => f,
        }
    }
}

/// A prefix of a level's removals, sliced and re-fit.
struct Fitted {
    model: Model,
    plan: Vec<LayerKeep>,
    blocks: Vec<BlockFit>,
    score: Score,
}

impl Settle<'_> {
    fn run(
        &self,
        ridge: f64,
        outcome: &mut LevelOutcome,
        ctx: &StageContext,
    ) -> Result<(Model, Vec<LayerKeep>)> {
        let n = outcome.removed.len();
        let full = self.prefix(n, &outcome.removed, ridge, ctx)?;
        let (kept, best) = match self.floor.holds(&full.score) {
            true => (n, Some(full)),
            false => {
                // Prefixes up to `plain` hold without a re-fit; longer ones are searched re-fit.
                let plain = self.plain_prefix(&outcome.removed);
                let (mut lo, mut hi, mut best) = (plain, n, None);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    let fitted = self.prefix(mid, &outcome.removed, ridge, ctx)?;
                    if self.floor.holds(&fitted.score) {
                        (lo, best) = (mid, Some(fitted));
                    } else {
                        hi = mid;
                    }
                }
                (lo, best)
            }
        };
        outcome.undone = n - kept;
        outcome.removed.truncate(kept);
        let Some(fitted) = best else {
            return self.unfitted(kept, outcome, ctx);
        };
        ctx.log(&format!(
            "{}: re-fit {} blocks, selection {:.4} → {:.4}{}",
            outcome.level.name(),
            fitted.blocks.len(),
            outcome.score.metric,
            fitted.score.metric,
            match n - kept {
                0 => String::new(),
                undone => format!(
                    " ({undone} removals taken back to hold {:.4})",
                    self.floor.value()
                ),
            }
        ));
        outcome.reconstruction = Some(Reconstruction {
            blocks: fitted.blocks,
            score: fitted.score,
        });
        Ok((fitted.model, fitted.plan))
    }

    /// The longest prefix of `removed` that the search itself left holding the floor, without
    /// any re-fit (its recorded score is the prefix's own); 0 for compensated levels, whose
    /// trials are not plain slices.
    fn plain_prefix(&self, removed: &[Removal]) -> usize {
        match self.compensated {
            true => 0,
            false => removed
                .iter()
                .rposition(|r| self.floor.holds(&r.after))
                .map_or(0, |i| i + 1),
        }
    }

    /// No re-fit holds: the first `kept` removals, sliced without one (the level's input when
    /// `kept` is 0).
    fn unfitted(
        &self,
        kept: usize,
        outcome: &mut LevelOutcome,
        ctx: &StageContext,
    ) -> Result<(Model, Vec<LayerKeep>)> {
        let mut plan = self.input.keep_all();
        for r in &outcome.removed[..kept] {
            remove(&mut plan, &r.element);
        }
        if kept == 0 {
            return Ok((self.input.clone(), plan));
        }
        outcome.score = outcome.removed[kept - 1].after;
        ctx.log(&format!(
            "{}: no re-fit holds {:.4}; kept the first {kept} removals without one, selection {:.4}",
            outcome.level.name(),
            self.floor.value(),
            outcome.score.metric
        ));
        Ok((self.input.slice(&plan)?, plan))
    }

    /// The first `k` removals applied to the level's input, sliced, re-fit and scored.
    fn prefix(
        &self,
        k: usize,
        removed: &[Removal],
        ridge: f64,
        ctx: &StageContext,
    ) -> Result<Fitted> {
        let mut plan = self.input.keep_all();
        for r in &removed[..k] {
            remove(&mut plan, &r.element);
        }
        let sliced = self.input.slice(&plan)?;
        let (model, blocks) = reconstruct(self.original, &sliced, self.calibration, ridge)?;
        let score = ctx.batches.score(&model)?;
        Ok(Fitted {
            model,
            plan,
            blocks,
            score,
        })
    }
}

/// `rule` with its floor moved `times` the allowance (the distance from `start` down to the
/// floor) lower; a rule without a floor, or a floor at or above `start`, stays as it is.
fn below_floor(rule: Rule, start: f64, times: f64) -> Rule {
    match rule {
        Rule::AtLeast(f) if start > f => Rule::AtLeast(f - times * (start - f)),
        _ => rule,
    }
}

/// True when the last round (the last `levels` outcomes) removed something.
fn removed_in_round(outcomes: &[LevelOutcome], levels: usize) -> bool {
    outcomes
        .iter()
        .rev()
        .take(levels)
        .any(|o| !o.removed.is_empty())
}

fn rejected_in_a_row(trials: &[TrialRecord]) -> usize {
    trials.iter().rev().take_while(|t| !t.accepted).count()
}

/// Refuses candidates that name a layer, head or neuron the model does not have (a progress file
/// or significance report edited or made for another model), before any of them is applied.
fn check_elements(model: &Model, order: &[Element]) -> Result<()> {
    let structure = &model.config.structure;
    for e in order {
        let Some(shape) = structure.layers.get(e.layer()) else {
            bail!(
                "layer {} is named, but the model has {}",
                e.layer(),
                structure.layers.len()
            );
        };
        match e {
            Element::Head { head, .. } if *head >= structure.original_heads => bail!(
                "head {head} of layer {} is named, but the model has {} heads",
                e.layer(),
                structure.original_heads
            ),
            Element::Group { neurons, .. } => {
                let width = shape.ffn_width.unwrap_or(0);
                if let Some(n) = neurons.iter().find(|&&n| n >= width) {
                    bail!(
                        "FFN neuron {n} of layer {} is named, but its FFN has {width}",
                        e.layer()
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Applies the removal of `e` to `plan`; `false` when `e` is already gone (its block removed).
pub fn remove(plan: &mut [LayerKeep], e: &Element) -> bool {
    let k = &mut plan[e.layer()];
    match e {
        Element::AttentionBlock { .. } => k.heads.take().is_some(),
        Element::FfnBlock { .. } => k.neurons.take().is_some(),
        Element::Head { head, .. } => match &mut k.heads {
            Some(h) if h.contains(head) => {
                h.retain(|x| x != head);
                true
            }
            _ => false,
        },
        Element::Group { neurons, .. } => match &mut k.neurons {
            Some(n) if neurons.iter().all(|x| n.contains(x)) => {
                n.retain(|x| !neurons.contains(x));
                true
            }
            _ => false,
        },
    }
}

/// Estimated cost an element saves: parameters (size) or multiply-adds per token at
/// `mean_len` tokens (speed); 1 under accuracy mode.
pub fn saving(model: &Model, e: &Element, mode: Mode, mean_len: f64) -> f64 {
    let h = model.config.hidden_size as f64;
    let d = model.config.structure.head_size as f64;
    let layer = &model.layers[e.layer()];
    let heads = layer
        .attention
        .as_ref()
        .map_or(0.0, |a| a.heads.len() as f64);
    let width = layer.ffn.as_ref().map_or(0.0, |f| f.width() as f64);
    let (params, flops) = match e {
        Element::Head { .. } => (4.0 * h * d + 3.0 * d, 4.0 * h * d + 2.0 * mean_len * d),
        Element::AttentionBlock { .. } => (
            heads * (4.0 * h * d + 3.0 * d) + 3.0 * h,
            heads * (4.0 * h * d + 2.0 * mean_len * d),
        ),
        Element::Group { neurons, .. } => {
            let g = neurons.len() as f64;
            (2.0 * h * g + g, 2.0 * h * g)
        }
        Element::FfnBlock { .. } => (2.0 * h * width + width + 3.0 * h, 2.0 * h * width),
    };
    match mode {
        Mode::Accuracy => 1.0,
        Mode::Size => params.max(1.0),
        Mode::Speed => flops.max(1.0),
    }
}

/// Orders a level's significance results into visiting order: ascending rank under accuracy;
/// ascending significance per unit saved under size and speed.
pub fn visiting_order(
    model: &Model,
    results: &[ElementSignificance],
    level: Level,
    mode: Mode,
    mean_len: f64,
) -> Vec<Element> {
    let mut items: Vec<&ElementSignificance> = results
        .iter()
        .filter(|r| r.element.level() == level)
        .collect();
    match mode {
        Mode::Accuracy => items.sort_by_key(|r| r.rank),
        Mode::Size | Mode::Speed => items.sort_by(|a, b| {
            let key =
                |r: &ElementSignificance| r.loss_delta / saving(model, &r.element, mode, mean_len);
            key(a).total_cmp(&key(b)).then(a.rank.cmp(&b.rank))
        }),
    }
    items.into_iter().map(|r| r.element.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prune(mode: Mode, share_tolerance: bool) -> Prune {
        Prune::new(PruneSettings {
            mode,
            share_tolerance,
            ..PruneSettings::default()
        })
        .unwrap()
    }

    #[test]
    fn levels_spend_cumulative_equal_shares_and_the_last_reaches_the_floor() {
        let p = prune(Mode::Size, true);
        let floor = Rule::AtLeast(0.88);
        let at = |i| match p.level_rule(floor, 0.91, i, 3) {
            Rule::AtLeast(f) => f,
            other => panic!("size mode keeps a floor: {other:?}"),
        };
        assert!((at(0) - 0.90).abs() < 1e-12 && (at(1) - 0.89).abs() < 1e-12);
        assert_eq!(at(2), 0.88);
        assert_eq!(
            prune(Mode::Size, false).level_rule(floor, 0.91, 0, 3),
            floor
        );
        assert_eq!(p.level_rule(Rule::NotWorse, 0.91, 0, 3), Rule::NotWorse);
    }

    #[test]
    fn the_search_may_go_below_the_floor_only_with_reconstruction() {
        let p = prune(Mode::Speed, true);
        match p.search_rule(Rule::AtLeast(0.90), 0.91, true) {
            Rule::AtLeast(f) => assert!((f - 0.87).abs() < 1e-12, "{f}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.search_rule(Rule::AtLeast(0.90), 0.91, false),
            Rule::AtLeast(0.90)
        );
        assert_eq!(p.search_rule(Rule::NotWorse, 0.91, true), Rule::NotWorse);
    }

    #[test]
    fn a_following_recovery_widens_the_floor_and_turns_the_refit_off_unless_asked() {
        let p = prune(Mode::Speed, true);
        match p.stage_rule(Rule::AtLeast(0.90), 0.91, true) {
            Rule::AtLeast(f) => assert!((f - 0.89).abs() < 1e-12, "{f}"),
            other => panic!("speed mode keeps a floor: {other:?}"),
        }
        let floor = Rule::AtLeast(0.90);
        assert_eq!(p.stage_rule(floor, 0.91, false), floor);
        assert_eq!(p.stage_rule(Rule::NotWorse, 0.91, true), Rule::NotWorse);
        assert!(p.reconstructs(false) && !p.reconstructs(true));
        assert!(!prune(Mode::Accuracy, true).reconstructs(false));
        let asked = Prune::new(PruneSettings {
            mode: Mode::Speed,
            reconstruct: Some(true),
            ..PruneSettings::default()
        })
        .unwrap();
        assert!(asked.reconstructs(true));
    }
}
