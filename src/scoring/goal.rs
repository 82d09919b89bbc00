//! The run's goal: what every decision of every pass must preserve ([`Mode`]), and the
//! acceptance [`Rule`] it gives a pass under the run's floor.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::score::Rule;

/// What a removal must preserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Keep a removal only if the selection metric does not drop (ties: loss must not rise).
    Accuracy,
    /// Remove as many parameters as `--max-drop` allows, cheapest significance per parameter first.
    Size,
    /// Remove as much estimated latency as `--max-drop` allows, cheapest significance per FLOP first.
    Speed,
}

impl Mode {
    /// When `pass` keeps a change in this mode: accuracy never lowers the selection metric (and,
    /// with a floor, keeps its guarded value at or above it); size and speed keep the guarded
    /// metric at or above the run's `floor`, which they need.
    pub fn rule(self, pass: &str, floor: Option<f64>) -> Result<Rule> {
        match (self, floor) {
            (Mode::Accuracy, None) => Ok(Rule::NotWorse),
            (Mode::Accuracy, Some(floor)) => Ok(Rule::NotWorseAtLeast(floor)),
            (_, Some(floor)) => Ok(Rule::AtLeast(floor)),
            (mode, None) => bail!(
                "{pass} in {} mode needs --max-drop (e.g. 1.0 for one metric point, or 2%)",
                mode.name()
            ),
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Accuracy => "accuracy",
            Mode::Size => "size",
            Mode::Speed => "speed",
        }
    }
}
