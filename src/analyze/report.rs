//! The versioned significance report (`report.json`): written by `analyze`, read back by later
//! passes, which refuse a report computed for another model.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::elements::{Element, Level};
use super::summary::short_name;
use crate::data::splits::DataInfo;
use crate::fsutil::read_text;
use crate::model::structure::Structure;
use crate::model::Model;

/// A JSON file whose `schema` field names its format: what to expect of it.
pub(super) struct Versioned {
    /// The `schema` the file must have.
    pub schema: &'static str,
    /// What to do about a file of another schema.
    pub fix: &'static str,
    /// The kind of file, in the error for a malformed one.
    pub what: &'static str,
}

impl Versioned {
    /// Parses `text` (of the file at `path`) after checking its schema.
    pub fn parse<T: serde::de::DeserializeOwned>(&self, text: &str, path: &Path) -> Result<T> {
        let value: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let schema = value
            .get("schema")
            .and_then(|s| s.as_str())
            .unwrap_or("none");
        if schema != self.schema {
            bail!(
                "{}: schema \"{schema}\" is not {}; {}",
                path.display(),
                self.schema,
                self.fix
            );
        }
        serde_json::from_value(value)
            .with_context(|| format!("{}: malformed {}", path.display(), self.what))
    }
}

/// Schema identifier written into every report; bumped on incompatible changes.
pub const SCHEMA: &str = "axcompress.significance.v1";

/// How significance is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Exact: remove the element and re-evaluate (groups: the Taylor-least-significant ones).
    Ablation,
    /// First-order estimate from one backward pass.
    Taylor,
    /// Both, for every element, with their rank correlation per level.
    Both,
}

/// Where a significance value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Exact ablation.
    Ablation,
    /// First-order Taylor estimate.
    Taylor,
}

/// A complete significance analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// The model analysed.
    pub model: ModelIdentity,
    /// Task name.
    pub task: String,
    /// The analysis data.
    pub data: DataInfo,
    /// Settings used.
    pub settings: Settings,
    /// Loss and metrics of the unmodified model on the analysis data.
    pub baseline: Baseline,
    /// Per-level summaries.
    pub levels: Vec<LevelSummary>,
    /// Every element with its significance.
    pub elements: Vec<ElementSignificance>,
    /// Deterministic cost counts (wall-clock figures go to the timing file).
    pub cost: Cost,
}

/// Which model a report belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// Path or hub id as given.
    pub source: String,
    /// Hash of the structure and every weight ([`Model::fingerprint`]).
    pub fingerprint: String,
    /// Model family.
    pub family: String,
    /// Per-layer shapes at analysis time.
    pub structure: Structure,
}

/// Analysis settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Method.
    pub method: Method,
    /// Levels analysed.
    pub levels: Vec<Level>,
    /// FFN neurons per group.
    pub group_size: usize,
    /// Groups per layer ablated exactly under `ablation` (`None`: all).
    pub exact_groups: Option<usize>,
    /// Examples (the first ones of the analysis data) the Taylor pass used; 0 when it did not run.
    pub taylor_examples: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Maximum tokens per input.
    pub max_length: usize,
    /// Cap on [`Cost::forward_equivalents_bound`] (`--budget-passes`, or `--budget-minutes`
    /// converted): the candidates Taylor ranks least significant are ablated first, the rest
    /// keep their Taylor estimate. `None` (not written): every candidate is ablated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_pass_budget: Option<f64>,
}

/// The unmodified model's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Mean loss.
    pub loss: f64,
    /// Name of the task's primary metric (the one `metric_delta` refers to).
    pub metric: String,
    /// All metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// Summary of one level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelSummary {
    /// The level.
    pub level: Level,
    /// Elements analysed.
    pub elements: usize,
    /// Elements evaluated by exact ablation.
    pub ablated: usize,
    /// Elements whose exact ablation lowers the loss.
    pub removal_helps: usize,
    /// Spearman rank correlation of Taylor estimates and ablation (`both` only).
    pub spearman_taylor_vs_ablation: Option<f64>,
}

/// Significance of one element, relative to the model as analysed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElementSignificance {
    /// The element.
    #[serde(flatten)]
    pub element: Element,
    /// `L(M∖e) − L(M)` on the analysis data: negative means removal helps.
    pub loss_delta: f64,
    /// Change of the primary metric when removed (ablation only).
    pub metric_delta: Option<f64>,
    /// Where `loss_delta` came from.
    pub source: Source,
    /// The Taylor estimate of `loss_delta`, when computed.
    pub taylor_loss_delta: Option<f64>,
    /// 1 = least significant within its level: ablated elements by ascending `loss_delta`, then
    /// Taylor-only elements by ascending estimate (ties in element order).
    pub rank: usize,
}

/// Deterministic cost counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Elements evaluated by exact ablation.
    pub ablations: usize,
    /// Upper bound on the work in forward passes over the analysis data: the baseline (1), the
    /// Taylor pass (a forward and a backward, counted as 3, scaled by the examples it used) and,
    /// per ablated element of layer `l`, the `(layers − l) / layers` of a pass it recomputes.
    pub forward_equivalents_bound: f64,
}

impl Report {
    /// Reads a report and checks its schema.
    pub fn load(path: &Path) -> Result<Report> {
        Self::parse(&read_text(path)?, path)
    }

    /// Parses the text of the report at `path` and checks its schema.
    pub fn parse(text: &str, path: &Path) -> Result<Report> {
        let expected = Versioned {
            schema: SCHEMA,
            fix: "rerun axcompress analyze",
            what: "significance report",
        };
        expected.parse(text, path)
    }

    /// Refuses the report unless it was computed for exactly `model` (same structure and weights).
    pub fn check_model(&self, model: &Model, path: &Path) -> Result<()> {
        let fingerprint = model.fingerprint()?;
        if self.model.fingerprint != fingerprint {
            bail!(
                "{}: the report was computed for model {} (fingerprint {}), not for this model (fingerprint {fingerprint}); rerun axcompress analyze on this model",
                path.display(),
                self.model.source,
                self.model.fingerprint
            );
        }
        self.check_elements(&model.config.structure, path)
    }

    /// Refuses the report unless every element it names is in `structure`.
    pub fn check_elements(&self, structure: &Structure, path: &Path) -> Result<()> {
        let missing = self
            .elements
            .iter()
            .find(|e| !e.element.exists_in(structure));
        if let Some(e) = missing {
            bail!(
                "{}: element {} is not in this model (the report was edited or is corrupt); rerun axcompress analyze",
                path.display(),
                short_name(&e.element)
            );
        }
        Ok(())
    }
}
