//! What a bsp run reports (`stages[].details` in report.json).

use std::collections::BTreeMap;

use serde::Serialize;

use super::obs::MatrixFit;
use super::storage::StoredMatrix;
use crate::train::checkpoint::Evaluation;

/// What a bsp run reports.
#[derive(Debug, Clone, Serialize)]
pub struct BspReport {
    /// One line: weights removed, the ratio, the retraining step kept.
    pub summary: String,
    /// Weights of the pruned matrices.
    pub pruned_weights: usize,
    /// Of them, removed.
    pub removed_weights: usize,
    /// `pruned_weights / kept weights`.
    pub compression: f64,
    /// Per matrix, its weights and those kept.
    pub matrices: BTreeMap<String, MatrixKept>,
    /// The last retraining's kept evaluation.
    pub retraining_kept: Evaluation,
    /// The last retraining's evaluations.
    pub retraining_evaluations: Vec<Evaluation>,
    /// How the pruned matrices are stored.
    #[serde(flatten)]
    pub stored: Stored,
    /// Group norms after each phase.
    pub group_norms: Vec<GroupNorms>,
    /// Each prune-and-retrain round.
    pub rounds: Vec<RoundReport>,
    /// The lasso phase's evaluations.
    pub lasso_evaluations: Vec<Evaluation>,
}

/// How the pruned matrices are stored: in column stripes, or sliced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stored {
    /// How each matrix was stored (column stripes; empty otherwise).
    pub storage: Vec<StoredMatrix>,
    /// FFN neurons left without inputs or outputs and sliced out (rows / columns grouping).
    pub ffn_neurons_sliced: usize,
}

/// One matrix's weights and those kept.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MatrixKept {
    /// Weights.
    pub weights: usize,
    /// Weights kept.
    pub kept: usize,
}

/// The group norms after one phase.
#[derive(Debug, Clone, Serialize)]
pub struct GroupNorms {
    /// The phase (`fine-tuned`, `after group lasso`, `after prune + retraining`).
    pub stage: &'static str,
    /// Mean group norm.
    pub mean: f64,
    /// Median group norm.
    pub median: f64,
}

/// One prune-and-retrain round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// Its number, from 1.
    pub round: usize,
    /// The share of groups removed by its end.
    pub ratio: f64,
    /// The surgeon's fit of each matrix (`hard_prune = "obs"`; empty otherwise).
    pub surgeon: Vec<MatrixFit>,
    /// The retraining's kept evaluation.
    pub kept: Evaluation,
}
