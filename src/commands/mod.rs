//! One module per subcommand, each with a thin `run` entry point: turn flags into settings, call
//! the library, print the result as text or `--json`.

pub mod analyze;
pub mod attention;
pub mod bench;
pub mod compress;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod prune;
pub mod quantize;

use std::path::Path;

use anyhow::Result;

use crate::cli::{Cli, ModelArgs, RunArgs, SelectionArgs, TaskArgs};
use crate::data::splits::SelectionSpec;
use crate::model::runtime::Runtime;
use crate::passes::vocab::VocabSettings;
use crate::pipeline::{
    self, default_selection, with_vocab, Finished, Output, RunSettings, StageSpec,
};
use crate::scoring::guard::DEFAULT_CONFIDENCE;
use crate::setup::TaskSetup;

/// Loads the model (to run as `runtime` says), labels, tokenizer and data location the task
/// flags name.
pub fn task_setup(model: &ModelArgs, task: &TaskArgs, runtime: Runtime) -> Result<TaskSetup> {
    TaskSetup::load(
        &model.model,
        &model.hub(),
        task.task,
        task.data.as_deref(),
        task.max_length,
        task.batch_size,
        runtime,
    )
}

impl SelectionArgs {
    /// `spec` with every flag given here applied.
    pub fn apply(&self, spec: SelectionSpec) -> SelectionSpec {
        SelectionSpec {
            on: self.on.clone().unwrap_or(spec.on),
            select_fraction: self.select_fraction.unwrap_or(spec.select_fraction),
            holdout: self.holdout.unwrap_or(spec.holdout),
            seed: self.seed.unwrap_or(spec.seed),
            limit: self.limit.or(spec.limit),
        }
    }
}

/// Runs a pipeline of `stages` from a command's flags (`prune`, `quantize`, `attention`).
pub fn run_stages(
    model: &ModelArgs,
    task: &TaskArgs,
    selection: &SelectionArgs,
    run: &RunArgs,
    out: &Path,
    stages: Vec<StageSpec>,
    cli: &Cli,
) -> Result<()> {
    let settings = RunSettings {
        model: model.model.clone(),
        hub: model.hub(),
        task: task.task,
        data: task.data.clone(),
        batch_size: task.batch_size,
        max_length: task.max_length,
        selection: selection.apply(default_selection(&stages)),
        test: run.test.clone(),
        max_drop: run.max_drop,
        confidence: run.confidence.unwrap_or(DEFAULT_CONFIDENCE),
        stages: with_vocab(
            stages,
            VocabSettings::from_flags(run.vocab, run.vocab_corpus.clone()),
        ),
        dtype: run.dtype,
        onnx: run.onnx,
        runtime: cli.runtime(),
    };
    let out = Output {
        dir: out.to_path_buf(),
        reads: Vec::new(),
        force: run.force,
        resume: run.resume,
    };
    run_pipeline(&settings, &out, cli)
}

/// Runs a pipeline and prints its report: the human summary, or the report (with the timing
/// and the output path) as JSON; then fails with [`pipeline::FloorMissed`] if the run ended
/// below its floor.
pub fn run_pipeline(settings: &RunSettings, out: &Output, cli: &Cli) -> Result<()> {
    let finished = pipeline::run(settings, out, cli.quiet)?;
    let Finished { report, timing } = &finished;
    let shown = out.dir.display().to_string();
    if cli.json {
        let mut value = serde_json::to_value(report)?;
        value["timing"] = serde_json::to_value(timing)?;
        value["out"] = serde_json::Value::String(shown);
        print_json(&value)?;
    } else {
        print!("{}", pipeline::report::render(report, timing, &shown));
    }
    finished.check_floor(&out.dir)
}

/// Prints a human log line on stderr unless `--quiet`.
pub fn log(cli: &Cli, line: &str) {
    if !cli.quiet {
        eprintln!("{line}");
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
