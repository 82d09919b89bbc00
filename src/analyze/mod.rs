//! Significance analysis (SA): how much each attention / FFN block, attention head and group of
//! FFN neurons matters to the task loss and metric, by exact ablation (with prefix caching) and
//! by a first-order Taylor estimate.

pub mod ablation;
pub mod elements;
pub mod plots;
pub mod report;
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
    let metric = task.primary_metric().to_string();

    let taylor_started = Instant::now();
    let taylor = taylor_pass(subject, set, &settings, quiet)?;
    let mut elements = blocks_and_heads(model, &settings.levels);
    if let Some(t) = taylor
        .as_ref()
        .filter(|_| settings.levels.contains(&Level::Groups))
    {
        elements.extend(groups_by_score(&t.neuron_estimates(), settings.group_size));
    }
    let exact = exactly_ablated(&elements, &settings);
    let to_ablate: Vec<Element> = elements
        .iter()
        .zip(&exact)
        .filter(|(_, &x)| x)
        .map(|(e, _)| e.clone())
        .collect();
    let taylor_seconds = taylor_started.elapsed().as_secs_f64();
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
    let mut results = measured.significances(model, &elements, &exact, outcomes);
    let levels = rank_and_summarise(&mut results, &settings.levels);
    let cost = Cost {
        ablations: to_ablate.len(),
        forward_equivalents_bound: forward_equivalents_bound(model, set, &settings, &to_ablate),
    };
    let report = Report {
        schema: report::SCHEMA.to_string(),
        model: ModelIdentity {
            source: model_source.to_string(),
            fingerprint: model.fingerprint()?,
            family: model.config.family.name().to_string(),
            structure: model.config.structure.clone(),
        },
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
    })
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
    if settings.method != Method::Ablation && settings.taylor_examples == 0 {
        bail!("--method taylor and both need the Taylor pass; set --taylor-examples above 0");
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

/// An upper bound of the analysis's cost in forward passes over the data.
fn forward_equivalents_bound(
    model: &Model,
    set: &EncodedSet,
    settings: &Settings,
    ablated: &[Element],
) -> f64 {
    let n = set.sequences.len() as f64;
    let layers = model.num_layers().max(1) as f64;
    1.0 + 3.0 * settings.taylor_examples.min(set.sequences.len()) as f64 / n
        + ablated
            .iter()
            .map(|e| (layers - e.layer() as f64) / layers)
            .sum::<f64>()
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
