//! `axcompress prune`: a pipeline of accuracy-driven pruning, optionally followed by recovery
//! fine-tuning (`--recover`), configured by flags.

use anyhow::Result;

use super::run_stages;
use crate::cli::{Cli, PruneArgs};
use crate::passes::prune::PruneSettings;
use crate::pipeline::StageSpec;
use crate::train::fit::TrainSettings;

/// Runs `axcompress prune`.
pub fn run(args: &PruneArgs, cli: &Cli) -> Result<()> {
    let mut stages = vec![StageSpec::Prune(args.prune.apply(PruneSettings::default()))];
    if let Some(examples) = args.recover {
        stages.push(StageSpec::Recover(TrainSettings {
            train_limit: Some(examples),
            augment: args.augment.unwrap_or_default(),
            ..TrainSettings::default()
        }));
    }
    let a = args;
    run_stages(&a.model, &a.task, &a.selection, &a.run, &a.out, stages, cli)
}
