//! `axcompress prune`: a one-stage pipeline (accuracy-driven pruning), configured by flags.

use anyhow::Result;

use super::run_pipeline;
use crate::cli::{Cli, PruneArgs};
use crate::data::splits::SelectionSpec;
use crate::passes::prune::PruneSettings;
use crate::pipeline::{Output, RunSettings, StageSpec};

/// Runs `axcompress prune`.
pub fn run(args: &PruneArgs, cli: &Cli) -> Result<()> {
    let settings = RunSettings {
        model: args.model.model.clone(),
        offline: args.model.offline,
        task: args.task.task,
        data: args.task.data.clone(),
        batch_size: args.task.batch_size,
        max_length: args.task.max_length,
        selection: args.selection.apply(SelectionSpec::default()),
        test: args.run.test.clone(),
        max_drop: args.run.max_drop,
        stages: vec![StageSpec::Prune(args.prune.apply(PruneSettings::default()))],
    };
    let out = Output {
        dir: args.out.clone(),
        force: args.run.force,
        resume: args.run.resume,
    };
    run_pipeline(&settings, &out, cli)
}
