//! `axcompress prune`: a one-stage pipeline (accuracy-driven pruning), configured by flags.

use anyhow::Result;

use super::run_one_stage;
use crate::cli::{Cli, PruneArgs};
use crate::passes::prune::PruneSettings;
use crate::pipeline::StageSpec;

/// Runs `axcompress prune`.
pub fn run(args: &PruneArgs, cli: &Cli) -> Result<()> {
    let stage = StageSpec::Prune(args.prune.apply(PruneSettings::default()));
    let a = args;
    run_one_stage(&a.model, &a.task, &a.selection, &a.run, &a.out, stage, cli)
}
