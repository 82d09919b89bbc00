//! `axcompress attention`: a one-stage pipeline (approximate attention per layer), configured by
//! flags.

use anyhow::Result;

use super::run_stages;
use crate::cli::{AttentionArgs, Cli};
use crate::passes::attention::AttentionSettings;
use crate::pipeline::StageSpec;

/// Runs `axcompress attention`.
pub fn run(args: &AttentionArgs, cli: &Cli) -> Result<()> {
    let stage = StageSpec::Attention(args.attention.apply(AttentionSettings::default()));
    let (a, stages) = (args, vec![stage]);
    run_stages(&a.model, &a.task, &a.selection, &a.run, &a.out, stages, cli)
}
