//! `axcompress compress --config FILE`: the pipeline a config declares, with command-line flags
//! overriding its keys.

use anyhow::{Context, Result};

use super::run_pipeline;
use crate::cli::{Cli, CompressArgs};
use crate::config_file;
use crate::passes::vocab::VocabSettings;
use crate::pipeline::{with_vocab, Output, StageSpec};

/// Runs `axcompress compress`.
pub fn run(args: &CompressArgs, cli: &Cli) -> Result<()> {
    let config = config_file::load(&args.config)?;
    let mut s = config.settings;
    if let Some(m) = &args.model {
        s.model = m.clone();
    }
    s.hub.offline |= args.offline;
    s.hub.revision = args.revision.clone().or(s.hub.revision);
    s.task = args.task.unwrap_or(s.task);
    s.data = args.data.clone().or(s.data);
    s.batch_size = args.batch_size.unwrap_or(s.batch_size);
    s.max_length = args.max_length.or(s.max_length);
    s.selection = args.selection.apply(s.selection);
    s.test = args.run.test.clone().or(s.test);
    s.max_drop = args.run.max_drop.or(s.max_drop);
    s.confidence = args.run.confidence.unwrap_or(s.confidence);
    s.dtype = args.run.dtype.or(s.dtype);
    s.onnx |= args.run.onnx;
    s.runtime = cli.runtime();
    s.stages = s
        .stages
        .into_iter()
        .map(|stage| match stage {
            StageSpec::Prune(p) => StageSpec::Prune(args.prune.apply(p)),
            StageSpec::Quantize(mut q) => {
                q.bits = args.bits.unwrap_or(q.bits);
                StageSpec::Quantize(q)
            }
            other => other,
        })
        .collect();
    let vocab = VocabSettings::from_flags(args.run.vocab, args.run.vocab_corpus.clone());
    s.stages = with_vocab(s.stages, vocab);
    let dir = args.out.clone().or(config.out).with_context(|| {
        format!(
            "{}: no output directory; pass --out DIR or set out = \"DIR\" in the config",
            args.config.display()
        )
    })?;
    let out = Output {
        dir,
        reads: vec![args.config.clone()],
        force: args.run.force,
        resume: args.run.resume,
    };
    run_pipeline(&s, &out, cli)
}
