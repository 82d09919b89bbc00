//! `axcompress quantize`: a one-stage pipeline (int8 / int4 / mixed precision), configured by
//! flags.

use anyhow::Result;

use super::run_stages;
use crate::cli::{Cli, QuantizeArgs};
use crate::passes::quantize::QuantizeSettings;
use crate::pipeline::StageSpec;

/// Runs `axcompress quantize`.
pub fn run(args: &QuantizeArgs, cli: &Cli) -> Result<()> {
    let stage = StageSpec::Quantize(args.quantize.apply(QuantizeSettings::default()));
    let (a, stages) = (args, vec![stage]);
    run_stages(&a.model, &a.task, &a.selection, &a.run, &a.out, stages, cli)
}
