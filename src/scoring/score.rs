//! What a candidate scored on the selection data ([`Score`]) and when it is accepted ([`Rule`]).

use serde::{Deserialize, Serialize};

/// Loss and primary metric on the selection data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Mean loss.
    pub loss: f64,
    /// Primary metric.
    pub metric: f64,
    /// Under an accuracy metric: examples whose correctness differs from the original model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discordant: Option<usize>,
    /// Under an accuracy metric: the original's metric less the bound a decision keeps
    /// ([`super::guard::decision_bound`]), the value floors are judged by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guarded: Option<f64>,
}

impl Score {
    /// A score without paired outcomes (judged by its point estimate).
    pub fn point(loss: f64, metric: f64) -> Self {
        Score {
            loss,
            metric,
            discordant: None,
            guarded: None,
        }
    }

    /// The value floors are judged by: the guarded metric, else the metric.
    pub fn judged(&self) -> f64 {
        self.guarded.unwrap_or(self.metric)
    }
}

/// When a trial is accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The selection metric must not drop below the accepted model's (on a tie, the loss must
    /// not rise).
    NotWorse,
    /// The selection metric, guarded ([`Score::judged`]), must stay at or above this floor.
    AtLeast(f64),
    /// Both: not worse than the accepted model, and the guarded metric at or above the floor.
    NotWorseAtLeast(f64),
}

impl Rule {
    /// Whether `trial` is acceptable when the accepted model scores `current`.
    pub fn admits(self, trial: Score, current: Score) -> bool {
        let not_worse = || {
            trial.metric > current.metric
                || (trial.metric == current.metric && trial.loss <= current.loss)
        };
        match self {
            Rule::NotWorse => not_worse(),
            Rule::AtLeast(floor) => trial.judged() >= floor,
            Rule::NotWorseAtLeast(floor) => not_worse() && trial.judged() >= floor,
        }
    }

    /// The floor of the rule, if it has one.
    pub fn floor(self) -> Option<f64> {
        match self {
            Rule::NotWorse => None,
            Rule::AtLeast(f) | Rule::NotWorseAtLeast(f) => Some(f),
        }
    }

    /// Under [`Rule::NotWorse`]: the fewest correct predictions out of `n` that can still be
    /// accepted under an accuracy metric (`n + 1` when none can); 0 for a pure floor, which the
    /// paired test below rules on.
    pub(crate) fn min_correct(self, n: usize, current: Score) -> usize {
        match self {
            Rule::AtLeast(_) => 0,
            Rule::NotWorse | Rule::NotWorseAtLeast(_) => (0..=n)
                .find(|&c| c as f64 / n as f64 >= current.metric)
                .unwrap_or(n + 1),
        }
    }
}
