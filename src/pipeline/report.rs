//! The report of a run (`report.json` in the output directory, and `--json`) and its human
//! summary: two views of the same data, made here.

use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use super::evaluation::Comparison;
use super::tolerance::MaxDrop;
use crate::data::source::Origin;
use crate::data::splits::DataInfo;
use crate::model::structure::Structure;
use crate::scoring::score::Score;

/// Schema identifier of `report.json`.
pub const SCHEMA: &str = "axcompress.compress.v1";

/// Everything a run decided and measured, deterministic for equal inputs (wall-clock figures
/// are in [`Timing`]).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// The input model as given (path or hub id).
    pub model: String,
    /// Task name.
    pub task: &'static str,
    /// The primary metric decisions use.
    pub metric: &'static str,
    /// Where the data came from and how it was split.
    pub data: DataReport,
    /// The run's tolerance and what was spent of it.
    pub tolerance: ToleranceReport,
    /// One entry per stage, in order.
    pub stages: Vec<StageReport>,
    /// Original vs compressed model on every split.
    pub evaluation: Vec<Comparison>,
    /// Parameters before and after.
    pub parameters: BeforeAfter,
    /// Bytes of the weight files before and after.
    pub weights_bytes: BeforeAfter,
    /// Whether stock transformers can load the output.
    pub hf_compatible: bool,
    /// Why not, when it cannot.
    pub hf_incompatible_reason: Option<String>,
    /// Which runtimes load the output, in one line.
    pub loads_in: String,
    /// Per-layer shapes of the output.
    pub structure: Structure,
}

/// Where the data came from.
#[derive(Debug, Clone, Serialize)]
pub struct DataReport {
    /// Which place of the resolution order (`argument`, `glue-dir`, `hub`).
    pub origin: Origin,
    /// The directory, file or hub dataset.
    pub location: String,
    /// The selection split (decisions).
    pub selection: DataInfo,
    /// The report split (dev examples the decisions did not see).
    pub report: Option<DataInfo>,
    /// The check split (perturbed train sentences for the final check), when the run has a
    /// `max_drop` and the task a train split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<DataInfo>,
    /// The `--test` file, if any.
    pub test: Option<String>,
}

/// The tolerance of the run, measured from the original model.
#[derive(Debug, Clone, Serialize)]
pub struct ToleranceReport {
    /// The allowed drop (`None`: accuracy mode only, nothing may be lost).
    pub max_drop: Option<MaxDrop>,
    /// The original model's selection metric.
    pub baseline: f64,
    /// The lowest selection metric the run may end with.
    pub floor: Option<f64>,
    /// Selection metric points lost by the whole run (negative: gained).
    pub spent_points: f64,
    /// Confidence of the guard on every decision and of the intervals.
    pub confidence: f64,
    /// The one-sided bound of the drop on the selection data at `confidence`, in points: what
    /// the decisions kept within `max_drop`.
    pub guarded_spent_points: f64,
    /// On the check split (perturbed train sentences no decision saw, labelled by the original):
    /// the one-sided upper bound of the share of predictions that changed, in points, at the
    /// confidence shared among the splits that may vouch (the `check` entry of `evaluation`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_bound_points: Option<f64>,
    /// On the gold-labelled report split, under an accuracy metric: the one-sided upper bound of
    /// the paired accuracy drop, gains included, in points, at the same shared confidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_bound_points: Option<f64>,
    /// Whether the run kept its promise: a split no decision saw (the check or the report split)
    /// bounds the drop within `max_drop` (true without a `max_drop`). A run that does not exits
    /// with status 3 after writing.
    pub kept: bool,
    /// When the run is not kept: why, and what to change (the line it exits with).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    /// One line for each split the decisions did not see whose interval of the drop reaches
    /// beyond `max_drop`.
    pub warnings: Vec<String>,
}

/// The warning lines for the splits in `evaluation` that no decision saw (report, test) whose
/// interval of the drop reaches beyond `max_drop`.
pub fn promise_warnings(evaluation: &[Comparison], max_drop: Option<MaxDrop>) -> Vec<String> {
    let Some(max_drop) = max_drop else {
        return Vec::new();
    };
    evaluation
        .iter()
        .filter(|c| matches!(c.split, "report" | "test"))
        .filter_map(|c| {
            let p = c.paired.as_ref()?;
            let before = c.before.metrics.get("accuracy").copied()?;
            let allowed = max_drop.points_at(before);
            p.may_exceed(allowed).then(|| {
                format!(
                    "warning: on the {} split the drop is {:+.2} ± {:.2} points; its {:.0}% interval [{:+.2}, {:+.2}] reaches beyond max_drop {allowed:.2}",
                    c.split,
                    p.drop_points,
                    p.standard_error_points,
                    p.confidence * 100.0,
                    p.interval_points[0],
                    p.interval_points[1],
                )
            })
        })
        .collect()
}

/// What one stage did.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// The pass.
    pub pass: &'static str,
    /// Its settings.
    pub settings: Value,
    /// Selection score entering the stage.
    pub selection_before: Score,
    /// Selection score leaving it.
    pub selection_after: Score,
    /// Selection metric points this stage lost (negative: gained).
    pub spent_points: f64,
    /// The pass's own report.
    pub details: Value,
    /// The models the pass compares its result with, evaluated like the result.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<AlternativeReport>,
    /// Files the pass writes beside `report.json` (name, bytes).
    #[serde(skip)]
    pub files: Vec<(String, Vec<u8>)>,
    /// The pass's line of the human summary, if it has one ([`crate::passes::Pass::summary`]).
    #[serde(skip)]
    pub summary: Option<String>,
}

/// A model a stage's result is compared with (e.g. uniform int8 beside mixed precision).
#[derive(Debug, Clone, Serialize)]
pub struct AlternativeReport {
    /// What it is.
    pub name: &'static str,
    /// Bytes of its `model.safetensors`.
    pub weights_bytes: u64,
    /// The original model (`before`) against this alternative (`after`) on every split.
    pub evaluation: Vec<Comparison>,
}

/// A quantity before and after the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BeforeAfter {
    /// The original model.
    pub before: u64,
    /// The output.
    pub after: u64,
    /// `before / after`.
    pub ratio: f64,
}

impl BeforeAfter {
    /// The pair and its ratio.
    pub fn new(before: u64, after: u64) -> Self {
        BeforeAfter {
            before,
            after,
            ratio: before as f64 / after.max(1) as f64,
        }
    }
}

/// Wall-clock figures of a run (`timing.json`; they differ between equal runs).
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Seconds the whole run took.
    pub wall_seconds: f64,
    /// Median batch-1 latency in ms over dev sentences: original model.
    pub latency_b1_p50_ms_before: f64,
    /// The same for the output.
    pub latency_b1_p50_ms_after: f64,
    /// Sentences timed.
    pub latency_samples: usize,
}

/// Metric points between two metric values (1.0 = 0.01).
pub fn points(before: f64, after: f64) -> f64 {
    (before - after) * 100.0
}

/// The human summary printed after a run.
pub fn render(report: &RunReport, timing: &Timing, out: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "wrote {out}");
    let p = &report.parameters;
    let _ = writeln!(
        s,
        "  parameters       {} -> {} ({:.2}x smaller)",
        p.before, p.after, p.ratio
    );
    let w = &report.weights_bytes;
    let _ = writeln!(
        s,
        "  weights on disk  {} -> {} bytes ({:.2}x smaller)",
        w.before, w.after, w.ratio
    );
    let _ = writeln!(
        s,
        "  data             {} (from {})",
        report.data.location,
        report.data.origin.name()
    );
    for line in report.stages.iter().filter_map(|st| st.summary.as_ref()) {
        let _ = writeln!(s, "  {line}");
    }
    render_evaluation(&mut s, report);
    render_tolerance(&mut s, report);
    let _ = writeln!(
        s,
        "  latency b1 p50   {:.2} -> {:.2} ms ({} dev sentences)",
        timing.latency_b1_p50_ms_before, timing.latency_b1_p50_ms_after, timing.latency_samples
    );
    let _ = writeln!(s, "  {}", report.loads_in);
    s
}

fn render_evaluation(s: &mut String, report: &RunReport) {
    let metric = report.metric;
    let _ = writeln!(
        s,
        "  {metric:<16} {:>9} {:>8} {:>8} {:>9} {:>8}  {}",
        "examples",
        "before",
        "after",
        "points",
        "flipped",
        format_args!(
            "drop ± se [{:.0}% interval]",
            report.tolerance.confidence * 100.0
        )
    );
    for c in &report.evaluation {
        let get =
            |v: &super::evaluation::SetScores| v.metrics.get(metric).copied().unwrap_or(f64::NAN);
        let (b, a) = (get(&c.before), get(&c.after));
        let flipped = c.flipped.map_or("-".to_string(), |f| f.to_string());
        let paired = c.paired.as_ref().map_or(String::new(), |p| {
            format!(
                "  {:+.2} ± {:.2} [{:+.2}, {:+.2}]",
                p.drop_points, p.standard_error_points, p.interval_points[0], p.interval_points[1]
            )
        });
        let _ = writeln!(
            s,
            "    {:<14} {:>9} {b:>8.4} {a:>8.4} {:>+9.2} {flipped:>8}{paired}",
            c.split,
            c.examples,
            (a - b) * 100.0
        );
    }
}

fn render_tolerance(s: &mut String, report: &RunReport) {
    let t = &report.tolerance;
    let allowed = match (t.max_drop, t.floor) {
        (Some(d), Some(f)) => format!("max drop {d} (selection floor {f:.4})"),
        _ => "no --max-drop (accuracy mode decides by no drop; uniform quantization takes no decisions)".to_string(),
    };
    let _ = writeln!(
        s,
        "  tolerance        {allowed}; spent {:+.2} points of selection {} {:.4} (bound {:+.2} at confidence {})",
        t.spent_points, report.metric, t.baseline, t.guarded_spent_points, t.confidence
    );
    for (i, st) in report.stages.iter().enumerate() {
        let _ = writeln!(
            s,
            "    stage {} {:<8} selection {:.4} -> {:.4}, spent {:+.2}",
            i + 1,
            st.pass,
            st.selection_before.metric,
            st.selection_after.metric,
            st.spent_points
        );
    }
    // The splits that vouch for a promise; without a max_drop there is none to vouch for.
    let promised = t.max_drop.is_some();
    for c in report.evaluation.iter().filter(|_| promised) {
        let (Some(bound), Some(confidence)) = (c.bound_points, c.bound_confidence) else {
            continue;
        };
        let _ = writeln!(
            s,
            "  vouch {:<10} {} sentences no decision saw: drop bound {bound:+.2} points at confidence {confidence:.3}",
            c.split, c.examples
        );
    }
    if let Some(advice) = &t.advice {
        let _ = writeln!(s, "  not kept         {advice}");
    }
    for w in &t.warnings {
        let _ = writeln!(s, "  {w}");
    }
}
