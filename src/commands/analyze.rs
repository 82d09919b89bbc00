//! `axcompress analyze`: significance analysis with a JSON report, a terminal summary and SVG
//! heatmaps.

use std::path::{Path, PathBuf};

use crate::formats::quant::Execution;
use anyhow::Result;
use serde_json::json;

use super::{log, task_setup};
use crate::analyze::elements::Level;
use crate::analyze::report::{Method, Report, Settings};
use crate::analyze::shard::{self, Shard, ShardReport, SHARD_SCHEMA};
use crate::analyze::{analyze_with, plots, summary, AnalysedModel, Analysis, HowToRun};
use crate::cli::{AnalyzeArgs, AnalyzeCommand, Cli, CountOrAll, MergeArgs};
use crate::data::batch::EncodedSet;
use crate::data::splits::SelectOn;
use crate::data::splits::{SelectionSpec, Splits};
use crate::evaluate::model_targets;
use crate::export::check_file_destination;
use crate::fsutil::{pretty_json, write_atomic};
use crate::model::runtime::Runtime;

/// Runs `axcompress analyze` (or `analyze merge`).
pub fn run(command: &AnalyzeCommand, cli: &Cli) -> Result<()> {
    match command {
        AnalyzeCommand::Merge(merge) => run_merge(merge, cli),
        AnalyzeCommand::Run(args) => run_analysis(args, cli),
    }
}

/// Runs one analysis, or one shard of it.
fn run_analysis(args: &AnalyzeArgs, cli: &Cli) -> Result<()> {
    // Gradients need f32 matrices: a quantized model runs dequantized unless --execution said
    // otherwise (then analysis refuses it).
    let runtime = Runtime {
        execution: cli.execution.unwrap_or(Execution::Dequantized),
        ..cli.runtime()
    };
    let setup = task_setup(&args.model, &args.task, runtime)?;
    if let Some(out) = &args.out {
        check_report_destination(args, &setup.model.dir, out)?;
    }
    check_plot_destinations(args, &setup.model.dir)?;
    let task = args.task.task;
    let spec = args.selection.apply(SelectionSpec::default());
    let label = |set: &EncodedSet| {
        model_targets(&setup.model, task, &setup.labels, set, args.task.batch_size)
    };
    let selection = Splits::load(&spec, &setup.data, &setup.encoder, &label)?.selection;
    let (set, data) = (selection.set, selection.info);
    log(
        cli,
        &format!(
            "analysing {} on {} {} examples ({})",
            args.model.model, data.examples, data.source, data.path
        ),
    );
    let settings = settings_of(args, set.sequences.len(), setup.max_length);
    let subject = AnalysedModel {
        model: &setup.model,
        source: &args.model.model,
        task,
        labels: &setup.labels,
    };
    let how = HowToRun {
        shard: args.shard.unwrap_or(Shard::WHOLE),
        budget_minutes: args.budget_minutes,
        quiet: cli.quiet,
    };
    let analysis = analyze_with(&subject, &set, data, settings, &how)?;
    if let Some(shard) = args.shard {
        return write_shard(analysis, shard, args, cli);
    }
    let report = &analysis.report;
    let report_text = pretty_json(report)?;
    if let Some(out) = &args.out {
        write_with_timing(out, &report_text, &analysis)?;
        log(cli, &format!("wrote {}", out.display()));
    }
    let cost_line = format!(
        "{}; {} ablations",
        cost_text(&analysis),
        report.cost.ablations
    );
    show(report, &report_text, plot_dir(args), &cost_line, cli)
}

/// Writes the heatmaps (into `plots`, when given) and prints the report: its summary and
/// `cost_line`, or under `--json` the report itself.
fn show(
    report: &Report,
    report_text: &[u8],
    plots: Option<PathBuf>,
    cost_line: &str,
    cli: &Cli,
) -> Result<()> {
    if let Some(dir) = plots {
        for p in plots::write_heatmaps(report, &dir)? {
            log(cli, &format!("wrote {}", p.display()));
        }
    }
    if cli.json {
        log(cli, cost_line);
        print!("{}", String::from_utf8_lossy(report_text));
        return Ok(());
    }
    print!("{}", summary::render(report, 3));
    println!("{cost_line}");
    Ok(())
}

/// `took …s = … forward passes over the same data (…s each)`.
fn cost_text(analysis: &Analysis) -> String {
    format!(
        "analysis took {:.1}s = {:.1} forward passes over the same data ({:.2}s each)",
        analysis.wall_seconds,
        analysis.wall_seconds / analysis.forward_seconds.max(1e-9),
        analysis.forward_seconds,
    )
}

/// Writes `text` to `out` and the analysis's wall-clock figures to the timing file beside it.
fn write_with_timing(out: &Path, text: &[u8], analysis: &Analysis) -> Result<()> {
    let timing = json!({
        "wall_seconds": analysis.wall_seconds,
        "forward_pass_seconds": analysis.forward_seconds,
        "forward_pass_equivalents": analysis.wall_seconds / analysis.forward_seconds.max(1e-9),
        "taylor_seconds": analysis.taylor_seconds,
        "ablation_seconds": analysis.ablation_seconds,
    });
    write_in_place(out, text)?;
    write_atomic(&timing_path(out), &pretty_json(&timing)?)
}

/// Writes `text` to `out` atomically, creating its directory.
fn write_in_place(out: &Path, text: &[u8]) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write_atomic(out, text)
}

/// Writes one shard's file (`--shard` requires `--out`) and says how to merge.
fn write_shard(analysis: Analysis, shard: Shard, args: &AnalyzeArgs, cli: &Cli) -> Result<()> {
    let out = args
        .out
        .as_deref()
        .expect("clap requires --out with --shard");
    let measured = analysis.report.cost.ablations;
    let file = ShardReport {
        schema: SHARD_SCHEMA.to_string(),
        shard,
        total_elements: analysis.total_elements,
        positions: analysis.positions.clone(),
        report: analysis.report.clone(),
    };
    let text = pretty_json(&file)?;
    write_with_timing(out, &text, &analysis)?;
    let line = format!(
        "shard {}/{}: {} of {} elements ({} ablations in the whole analysis); {}; wrote {}; join all {} with `axcompress analyze merge FILE... --out REPORT`",
        shard.index,
        shard.count,
        file.positions.len(),
        file.total_elements,
        measured,
        cost_text(&analysis),
        out.display(),
        shard.count
    );
    if cli.json {
        log(cli, &line);
        print!("{}", String::from_utf8_lossy(&text));
    } else {
        println!("{line}");
    }
    Ok(())
}

/// Runs `axcompress analyze merge`.
fn run_merge(args: &MergeArgs, cli: &Cli) -> Result<()> {
    let inputs: Vec<&Path> = args.shards.iter().map(PathBuf::as_path).collect();
    check_file_destination("--out", &inputs, &args.out, args.force)?;
    let plots = args
        .plots
        .clone()
        .unwrap_or_else(|| args.out.parent().unwrap_or(Path::new(".")).to_path_buf());
    let report = shard::merge(&args.shards)?;
    for level in &report.settings.levels {
        let file = plots::heatmap_path(&plots, *level);
        check_file_destination("--plots", &inputs, &file, args.force)?;
    }
    let text = pretty_json(&report)?;
    write_in_place(&args.out, &text)?;
    log(cli, &format!("wrote {}", args.out.display()));
    let line = format!(
        "merged {} shards: {} elements, {} ablations",
        args.shards.len(),
        report.elements.len(),
        report.cost.ablations
    );
    show(&report, &text, Some(plots), &line, cli)
}

/// The analysis settings the flags ask for, on `examples` examples truncated at `max_length`.
fn settings_of(args: &AnalyzeArgs, examples: usize, max_length: usize) -> Settings {
    let mut levels = args.levels.clone();
    levels.sort();
    levels.dedup();
    let budgeted = args.budget_passes.is_some() || args.budget_minutes.is_some();
    let needs_taylor =
        args.method != Method::Ablation || levels.contains(&Level::Groups) || budgeted;
    let taylor_examples = match (needs_taylor, args.taylor_examples, args.method) {
        (false, _, _) => 0,
        (true, Some(CountOrAll::Count(k)), _) => k,
        (true, None, Method::Ablation) => 512,
        (true, Some(CountOrAll::All), _) | (true, None, _) => usize::MAX,
    };
    Settings {
        method: args.method,
        levels,
        group_size: args.group_size,
        exact_groups: match args.exact_groups {
            CountOrAll::Count(k) => Some(k),
            CountOrAll::All => None,
        },
        taylor_examples: taylor_examples.min(examples),
        batch_size: args.task.batch_size,
        max_length,
        forward_pass_budget: args.budget_passes,
    }
}

/// Every path `analyze` reads: the model directory, the data and a selection file.
fn inputs<'a>(args: &'a AnalyzeArgs, model_dir: &'a Path) -> Vec<&'a Path> {
    let on = match &args.selection.on {
        Some(SelectOn::File(file)) => Some(file.as_path()),
        _ => None,
    };
    [Some(model_dir), args.task.data.as_deref(), on]
        .into_iter()
        .flatten()
        .collect()
}

/// Refuses a report path (or its timing file) that is an input or inside one, that is not a
/// file, or that exists without `--force`: before any analysis runs.
fn check_report_destination(args: &AnalyzeArgs, model_dir: &Path, out: &Path) -> Result<()> {
    let inputs = inputs(args, model_dir);
    check_file_destination("--out", &inputs, out, args.force)?;
    check_file_destination("--out", &inputs, &timing_path(out), args.force)
}

/// Where the heatmaps go: `--plots`, else beside `--out`; none without either.
fn plot_dir(args: &AnalyzeArgs) -> Option<PathBuf> {
    args.plots.clone().or_else(|| {
        args.out
            .as_ref()
            .map(|o| o.parent().unwrap_or(Path::new(".")).to_path_buf())
    })
}

/// The heatmaps obey the output rule like the report: none may be an input or inside one, or
/// replace anything but a file without `--force`.
fn check_plot_destinations(args: &AnalyzeArgs, model_dir: &Path) -> Result<()> {
    let Some(dir) = plot_dir(args) else {
        return Ok(());
    };
    let inputs = inputs(args, model_dir);
    for level in &args.levels {
        let file = plots::heatmap_path(&dir, *level);
        check_file_destination("--plots", &inputs, &file, args.force)?;
    }
    Ok(())
}

/// `report.json` → `report.timing.json`.
fn timing_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}.timing.json"))
}
