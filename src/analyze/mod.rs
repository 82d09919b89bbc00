//! Significance analysis (SA): how much each attention / FFN block, attention head and group of
//! FFN neurons matters to the task loss and metric, by exact ablation (with prefix caching) and
//! by a first-order Taylor estimate.

pub mod ablation;
pub mod elements;
pub mod plots;
pub mod report;
pub mod shard;
pub mod summary;
pub mod taylor;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::data::batch::EncodedSet;
use crate::data::labels::LabelMap;
use crate::data::splits::DataInfo;
use crate::data::task::Task;
use crate::evaluate::{self, LossAndMetrics};
use crate::model::encoder::RunOptions;
use crate::model::Model;
use crate::progress;
use crate::scoring::batch;
use crate::scoring::scorer::Scorer;
use elements::{blocks_and_heads, check_group_size, groups_by_score, Element, Level};
use report::{
    Baseline, Cost, ElementSignificance, LevelSummary, Method, ModelIdentity, Report, Settings,
    Source,
};
use shard::Shard;

/// A finished analysis with its wall-clock figures (kept out of the report so that equal inputs
/// give byte-identical reports).
pub struct Analysis {
    /// The report.
    pub report: Report,
    /// Wall time of the whole analysis.
    pub wall_seconds: f64,
    /// Wall time of one plain forward pass over the analysis data (the baseline).
    pub forward_seconds: f64,
    /// Wall time of the Taylor pass.
    pub taylor_seconds: f64,
    /// Wall time of the ablations.
    pub ablation_seconds: f64,
    /// Elements in the whole analysis (the report holds only the shard's when sharded).
    pub total_elements: usize,
    /// Position of each of the report's elements in the whole analysis's element order.
    pub positions: Vec<usize>,
}

/// The model being analysed and how its outputs map onto the task.
pub struct AnalysedModel<'a> {
    /// The model.
    pub model: &'a Model,
    /// Path or hub id as given by the user (recorded in the report).
    pub source: &'a str,
    /// The task.
    pub task: Task,
    /// Model outputs → task labels.
    pub labels: &'a LabelMap,
}

/// Runs significance analysis of `subject.model` on `set` (described by `data`).
pub fn analyze(
    subject: &AnalysedModel,
    set: &EncodedSet,
    data: DataInfo,
    settings: Settings,
    quiet: bool,
) -> Result<Analysis> {
    let how = HowToRun {
        shard: Shard::WHOLE,
        budget_minutes: None,
        quiet,
    };
    analyze_with(subject, set, data, settings, &how)
}

/// How an analysis runs, beyond what its report records.
pub struct HowToRun {
    /// The share of the elements to measure.
    pub shard: Shard,
    /// Wall-time budget: converted, once the baseline pass is timed, into the forward-pass
    /// budget the report's settings record (ignored when the settings already have one).
    pub budget_minutes: Option<f64>,
    /// No progress bars or estimate.
    pub quiet: bool,
}

/// Runs `how.shard`'s share of the significance analysis of `subject.model` on `set`: the whole
/// analysis for [`Shard::WHOLE`]; otherwise a report of the shard's elements only, unranked and
/// without level summaries, for [`shard::merge`] to join.
pub fn analyze_with(
    subject: &AnalysedModel,
    set: &EncodedSet,
    data: DataInfo,
    mut settings: Settings,
    how: &HowToRun,
) -> Result<Analysis> {
    let (shard, quiet) = (how.shard, how.quiet);
    let AnalysedModel {
        model,
        source: model_source,
        task,
        labels,
    } = *subject;
    check_request(model, set, &settings)?;
    let started = Instant::now();
    let batches = batch::batches(model, set, labels, settings.batch_size)?;
    let scorer = Scorer::new(task, labels, &set.targets);
    let (base, forward_seconds) = baseline(subject, set, settings.batch_size, quiet)?;
    if let (None, Some(minutes)) = (settings.forward_pass_budget, how.budget_minutes) {
        settings.forward_pass_budget = Some(passes_in_minutes(minutes, forward_seconds));
    }
    if let Some(budget) = settings.forward_pass_budget {
        settings.taylor_examples = taylor_examples_within(budget, settings.taylor_examples, set);
    }
    let metric = task.primary_metric().to_string();

    let taylor_started = Instant::now();
    let taylor = taylor_pass(subject, set, &settings, quiet)?;
    let (elements, exact) = plan(model, set, &settings, taylor.as_ref());
    let ablated_anywhere = selected(&elements, &exact);
    let owned = shard.owned(&exact);
    let positions: Vec<usize> = (0..elements.len()).filter(|&i| owned[i]).collect();
    let mine: Vec<bool> = exact.iter().zip(&owned).map(|(&x, &o)| x && o).collect();
    let to_ablate = selected(&elements, &mine);
    let taylor_seconds = taylor_started.elapsed().as_secs_f64();
    let bound = Costs::of(model, set, &settings).bound(&ablated_anywhere);
    if !quiet {
        let expected = Costs::measured(model, set, &settings).bound(&ablated_anywhere);
        let budgeted = settings.forward_pass_budget.is_some();
        eprintln!(
            "{}",
            estimate_line(expected, forward_seconds, shard, budgeted)
        );
    }
    let ablation_started = Instant::now();
    let n = set.sequences.len() as u64;
    let bar = progress::bar(n * to_ablate.len() as u64, "ablation", quiet);
    let outcomes = ablation::ablate(model, &batches, &to_ablate, &scorer, &bar)?;
    bar.finish_and_clear();
    let ablation_seconds = ablation_started.elapsed().as_secs_f64();

    let measured = Baselines {
        base: &base,
        metric: &metric,
        scorer: &scorer,
        taylor: taylor.as_ref(),
    };
    let owned_elements = selected(&elements, &owned);
    let owned_exact: Vec<bool> = positions.iter().map(|&i| exact[i]).collect();
    let mut results = measured.significances(model, &owned_elements, &owned_exact, outcomes);
    let levels = match shard == Shard::WHOLE {
        true => rank_and_summarise(&mut results, &settings.levels),
        false => Vec::new(),
    };
    let cost = Cost {
        ablations: ablated_anywhere.len(),
        forward_equivalents_bound: bound,
    };
    let report = Report {
        schema: report::SCHEMA.to_string(),
        model: identity(model, model_source)?,
        task: task.name().to_string(),
        data,
        baseline: Baseline {
            loss: base.loss,
            metric,
            metrics: base.metrics.iter().cloned().collect::<BTreeMap<_, _>>(),
        },
        levels,
        elements: results,
        cost,
        settings,
    };
    Ok(Analysis {
        report,
        wall_seconds: started.elapsed().as_secs_f64(),
        forward_seconds,
        taylor_seconds,
        ablation_seconds,
        total_elements: elements.len(),
        positions,
    })
}

/// The elements of the analysis (groups formed by the Taylor pass) and which of them are ablated
/// exactly: by the method, then, under a budget, by Taylor pre-ranking.
fn plan(
    model: &Model,
    set: &EncodedSet,
    settings: &Settings,
    taylor: Option<&taylor::GateGradients>,
) -> (Vec<Element>, Vec<bool>) {
    let mut elements = blocks_and_heads(model, &settings.levels);
    if let Some(t) = taylor.filter(|_| settings.levels.contains(&Level::Groups)) {
        elements.extend(groups_by_score(&t.neuron_estimates(), settings.group_size));
    }
    let mut exact = exactly_ablated(&elements, settings);
    if let (Some(budget), Some(t)) = (settings.forward_pass_budget, taylor) {
        let estimates: Vec<f64> = elements.iter().map(|e| t.estimate(model, e)).collect();
        let costs = Costs::measured(model, set, settings);
        exact = costs.within_budget(&elements, &exact, &estimates, budget);
    }
    (elements, exact)
}

/// Which model a report is about.
fn identity(model: &Model, source: &str) -> Result<ModelIdentity> {
    Ok(ModelIdentity {
        source: source.to_string(),
        fingerprint: model.fingerprint()?,
        family: model.config.family.name().to_string(),
        structure: model.config.structure.clone(),
    })
}

/// The elements whose flag in `chosen` is set, in order.
fn selected(elements: &[Element], chosen: &[bool]) -> Vec<Element> {
    elements
        .iter()
        .zip(chosen)
        .filter(|(_, &x)| x)
        .map(|(e, _)| e.clone())
        .collect()
}

/// Refuses an analysis that cannot run, before any work.
fn check_request(model: &Model, set: &EncodedSet, settings: &Settings) -> Result<()> {
    if model.runs_quantized_kernels() {
        bail!("analysis takes gradients, which the quantized kernels do not have; run it with --execution dequantized");
    }
    if set.sequences.is_empty() {
        bail!("{}: the analysis data is empty", set.path.display());
    }
    if settings.levels.contains(&Level::Groups) {
        check_group_size(model, settings.group_size)?;
    }
    if settings.levels.contains(&Level::Groups) && settings.taylor_examples == 0 {
        bail!("grouping FFN neurons needs the Taylor pass; set --taylor-examples above 0");
    }
    check_budget(settings.forward_pass_budget, "--budget-passes")?;
    if settings.forward_pass_budget.is_some() && settings.taylor_examples == 0 {
        bail!("a forward-pass budget ranks the candidates by the Taylor pass; set --taylor-examples above 0");
    }
    if settings.method != Method::Ablation && settings.taylor_examples == 0 {
        bail!("--method taylor and both need the Taylor pass; set --taylor-examples above 0");
    }
    Ok(())
}

/// Refuses a forward-pass budget that is not a positive number; `setting` names it in the error.
pub fn check_budget(budget: Option<f64>, setting: &str) -> Result<()> {
    if budget.is_some_and(|b| b.is_nan() || b <= 0.0) {
        bail!("{setting} must be a positive number of forward passes");
    }
    Ok(())
}

/// The unablated model's scores on `set`, and the seconds its forward pass took.
fn baseline(
    subject: &AnalysedModel,
    set: &EncodedSet,
    batch_size: usize,
    quiet: bool,
) -> Result<(LossAndMetrics, f64)> {
    let bar = progress::bar(set.sequences.len() as u64, "baseline", quiet);
    let started = Instant::now();
    let logits = evaluate::predict(
        subject.model,
        &set.sequences,
        batch_size,
        RunOptions::default(),
        &bar,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let base = evaluate::score(subject.task, subject.labels, &logits, &set.targets);
    Ok((base, seconds))
}

/// The gate gradients on the first `taylor_examples` of `set` (none when it is 0).
fn taylor_pass(
    subject: &AnalysedModel,
    set: &EncodedSet,
    settings: &Settings,
    quiet: bool,
) -> Result<Option<taylor::GateGradients>> {
    if settings.taylor_examples == 0 {
        return Ok(None);
    }
    let count = settings.taylor_examples.min(set.sequences.len());
    let subset = set.subset(&(0..count).collect::<Vec<_>>());
    let batches = batch::batches(subject.model, &subset, subject.labels, settings.batch_size)?;
    let bar = progress::bar(count as u64, "taylor", quiet);
    let gradients = taylor::gate_gradients(subject.model, &batches, &bar)?;
    bar.finish_and_clear();
    Ok(Some(gradients))
}

/// Which of `elements` are ablated exactly (the rest keep their Taylor estimate).
fn exactly_ablated(elements: &[Element], settings: &Settings) -> Vec<bool> {
    elements
        .iter()
        .map(|e| match (settings.method, e) {
            (Method::Taylor, _) => false,
            (Method::Ablation, Element::Group { index, .. }) => {
                settings.exact_groups.is_none_or(|k| *index < k)
            }
            _ => true,
        })
        .collect()
}

/// The forward passes of an analysis of `levels` (blocks and heads) that ablates every element
/// exactly without a Taylor pass: a budget above it gains nothing from pre-ranking.
pub fn exact_passes(model: &Model, levels: &[Level]) -> f64 {
    Costs::baseline_only(model).bound(&blocks_and_heads(model, levels))
}

/// The analysis's cost model, in forward passes over the analysis data.
struct Costs {
    /// The baseline pass and the Taylor pass (a forward and a backward, counted as 3, scaled by
    /// the share of the data it uses).
    fixed: f64,
    /// Encoder layers.
    layers: f64,
}

impl Costs {
    fn of(model: &Model, set: &EncodedSet, settings: &Settings) -> Costs {
        Costs {
            fixed: 1.0 + 3.0 * Self::taylor_share(set, settings),
            ..Self::baseline_only(model)
        }
    }

    /// The costs of an analysis of `model` with no Taylor pass: the baseline pass is fixed.
    fn baseline_only(model: &Model) -> Costs {
        Costs {
            fixed: 1.0,
            layers: model.num_layers().max(1) as f64,
        }
    }

    /// [`Costs::of`] with the Taylor pass at its measured cost ([`TAYLOR_PASS_COST`]): what a
    /// budget and the printed estimate count.
    fn measured(model: &Model, set: &EncodedSet, settings: &Settings) -> Costs {
        Costs {
            fixed: 1.0 + TAYLOR_PASS_COST * Self::taylor_share(set, settings),
            ..Self::of(model, set, settings)
        }
    }

    /// The share of the analysis data the Taylor pass runs on.
    fn taylor_share(set: &EncodedSet, settings: &Settings) -> f64 {
        let n = set.sequences.len();
        settings.taylor_examples.min(n) as f64 / n as f64
    }

    /// An element of layer `l` recomputes the layers after it: `(layers − l) / layers` of a pass.
    fn ablation(&self, e: &Element) -> f64 {
        (self.layers - e.layer() as f64) / self.layers
    }

    /// The bound of an analysis that ablates `ablated` exactly.
    fn bound(&self, ablated: &[Element]) -> f64 {
        self.fixed + ablated.iter().map(|e| self.ablation(e)).sum::<f64>()
    }

    /// Taylor pre-ranking under a budget of `budget` forward passes: of the `exact` candidates,
    /// the ones to ablate. Each level's candidates are taken from the least significant Taylor
    /// `estimates` up, the levels in turn, each while it fits the budget left; the rest keep
    /// their Taylor estimate.
    fn within_budget(
        &self,
        elements: &[Element],
        exact: &[bool],
        estimates: &[f64],
        budget: f64,
    ) -> Vec<bool> {
        let mut queues: Vec<Vec<usize>> = Vec::new();
        for level in [Level::Blocks, Level::Heads, Level::Groups] {
            let mut ids: Vec<usize> = (0..elements.len())
                .filter(|&i| exact[i] && elements[i].level() == level)
                .collect();
            ids.sort_by(|&a, &b| estimates[a].total_cmp(&estimates[b]).then(a.cmp(&b)));
            queues.push(ids);
        }
        let mut chosen = vec![false; elements.len()];
        let mut left = budget - self.fixed;
        let longest = queues.iter().map(Vec::len).max().unwrap_or(0);
        for rank in 0..longest {
            for &i in queues.iter().filter_map(|q| q.get(rank)) {
                let cost = self.ablation(&elements[i]);
                if cost <= left {
                    chosen[i] = true;
                    left -= cost;
                }
            }
        }
        chosen
    }
}

/// What the Taylor pass over the whole analysis data costs in forward passes, as measured: its
/// forward and backward run candle's differentiable ops, not the inference kernels (12.7 at
/// BERT-base shape). The report's bound counts it as 3; a budget counts it at this.
const TAYLOR_PASS_COST: f64 = 12.0;

/// The Taylor pass takes at most this share of a forward-pass budget.
const TAYLOR_SHARE_OF_BUDGET: f64 = 0.25;

/// The Taylor examples under a budget of `budget` forward passes: at most `requested`, and
/// few enough that the pass takes at most a quarter of the budget (at least one batch's worth
/// of 32, when the data has them: fewer would rank by noise).
fn taylor_examples_within(budget: f64, requested: usize, set: &EncodedSet) -> usize {
    let n = set.sequences.len();
    let affordable = (n as f64 * budget * TAYLOR_SHARE_OF_BUDGET / TAYLOR_PASS_COST) as usize;
    requested.min(affordable.max(32)).min(n)
}

/// The forward passes `minutes` of wall time buys at `forward_seconds` a pass (one decimal, so
/// the report records a readable figure).
fn passes_in_minutes(minutes: f64, forward_seconds: f64) -> f64 {
    (minutes * 60.0 / forward_seconds.max(1e-9) * 10.0).floor() / 10.0
}

/// What the analysis will cost, printed before the ablations start (with a hint at the budget
/// and the shards when it is large and no budget was given).
fn estimate_line(bound: f64, forward_seconds: f64, shard: Shard, budgeted: bool) -> String {
    let whole = bound * forward_seconds;
    let mut line = format!(
        "estimated {}: {bound:.1} forward passes of {forward_seconds:.1}s",
        minutes_text(whole)
    );
    if shard != Shard::WHOLE {
        line += &format!(
            " for the whole analysis; this shard ({}/{}) about a {} share of the ablations",
            shard.index, shard.count, shard.count
        );
    }
    if bound > 30.0 && !budgeted {
        line += "; a forward-pass budget caps it with Taylor pre-ranking (analyze --budget-passes or --budget-minutes, prune --analysis-budget), analyze --shard I/N splits it across machines";
    }
    line
}

/// `seconds` as minutes and seconds.
fn minutes_text(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s >= 60 {
        true => format!("{} min {:02} s", s / 60, s % 60),
        false => format!("{s} s"),
    }
}

/// What the significance of an element is measured against.
struct Baselines<'a> {
    base: &'a LossAndMetrics,
    metric: &'a str,
    scorer: &'a Scorer<'a>,
    taylor: Option<&'a taylor::GateGradients>,
}

impl Baselines<'_> {
    /// Every element's significance: from its ablation's `outcomes` (in order) where it was
    /// ablated exactly, else its Taylor estimate.
    fn significances(
        &self,
        model: &Model,
        elements: &[Element],
        exact: &[bool],
        outcomes: Vec<ablation::Outcome>,
    ) -> Vec<ElementSignificance> {
        let base_metric = self.base.get(self.metric).unwrap_or(f64::NAN);
        let mut outcomes = outcomes.into_iter();
        elements
            .iter()
            .zip(exact)
            .map(|(e, &is_exact)| {
                let taylor_loss_delta = self.taylor.map(|t| t.estimate(model, e));
                let (loss_delta, metric_delta, source) = if is_exact {
                    let o = outcomes.next().expect("one outcome per ablated element");
                    let s = self.scorer.scores(o.loss_sum, &o.predictions);
                    (
                        s.loss - self.base.loss,
                        Some(s.get(self.metric).unwrap_or(f64::NAN) - base_metric),
                        Source::Ablation,
                    )
                } else {
                    (
                        taylor_loss_delta.expect("taylor computed"),
                        None,
                        Source::Taylor,
                    )
                };
                ElementSignificance {
                    element: e.clone(),
                    loss_delta,
                    metric_delta,
                    source,
                    taylor_loss_delta,
                    rank: 0,
                }
            })
            .collect()
    }
}

/// Assigns ranks within each level and builds the level summaries.
fn rank_and_summarise(results: &mut [ElementSignificance], levels: &[Level]) -> Vec<LevelSummary> {
    let mut summaries = Vec::new();
    for &level in levels {
        let mut ids: Vec<usize> = (0..results.len())
            .filter(|&i| results[i].element.level() == level)
            .collect();
        // Exact values first: Taylor-only elements are, by construction, the ones Taylor ranked
        // above every ablated candidate of their layer, and first-order estimates overstate
        // removal effects, so mixing both scales in one order would mislead.
        ids.sort_by(|&a, &b| {
            let (x, y) = (&results[a], &results[b]);
            (x.source != Source::Ablation)
                .cmp(&(y.source != Source::Ablation))
                .then(x.loss_delta.total_cmp(&y.loss_delta))
                .then(a.cmp(&b))
        });
        for (rank, &i) in ids.iter().enumerate() {
            results[i].rank = rank + 1;
        }
        let both: Vec<(f64, f64)> = ids
            .iter()
            .filter(|&&i| results[i].source == Source::Ablation)
            .filter_map(|&i| {
                results[i]
                    .taylor_loss_delta
                    .map(|t| (results[i].loss_delta, t))
            })
            .collect();
        let ablated = ids
            .iter()
            .filter(|&&i| results[i].source == Source::Ablation)
            .count();
        let spearman = (both.len() >= 2 && both.len() == ids.len()).then(|| {
            let (a, t): (Vec<f64>, Vec<f64>) = both.into_iter().unzip();
            crate::data::metric::spearman(&a, &t)
        });
        summaries.push(LevelSummary {
            level,
            elements: ids.len(),
            ablated,
            removal_helps: ids
                .iter()
                .filter(|&&i| results[i].source == Source::Ablation && results[i].loss_delta < 0.0)
                .count(),
            spearman_taylor_vs_ablation: spearman,
        });
    }
    summaries
}
