//! `axcompress prune`: hierarchical accuracy-driven pruning, physical slicing and export.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{log, selection_data, TaskSetup};
use crate::analyze::elements::Level;
use crate::analyze::report::{Method, Report, Settings};
use crate::analyze::{analyze, batches, Scorer, Subject};
use crate::bench::{median, time_single, weights_bytes};
use crate::cli::{Cli, MaxDrop, PruneArgs};
use crate::data::batch::load_split;
use crate::evaluate::{predict, score};
use crate::export::write_model_dir;
use crate::model::encoder::RunOptions;
use crate::model::inputs::Sequence;
use crate::model::Model;
use crate::passes::prune::{prune_level, visiting_order, Mode, Rule, Selector};
use crate::progress;

/// Dev sentences timed for the latency figure in `report.json`.
const LATENCY_SAMPLES: usize = 64;

/// Runs `axcompress prune`.
pub fn run(args: &PruneArgs, cli: &Cli) -> Result<()> {
    let started = Instant::now();
    if args.mode != Mode::Accuracy && args.max_drop.is_none() {
        bail!(
            "--mode {:?} needs --max-drop (e.g. 1.0 for one metric point, or 2%)",
            args.mode
        );
    }
    let split = if args.selection.on == "holdout" {
        "train"
    } else {
        "dev"
    };
    let setup = TaskSetup::load(&args.model, &args.task, split)?;
    crate::export::check_destination(&setup.model.dir, &args.out, args.force)?;
    let task = args.task.task;
    let original = &setup.model;
    let significance = match &args.significance {
        Some(path) => {
            let report = Report::load(path)?;
            report.check_model(original, path)?;
            Some(report)
        }
        None => None,
    };
    let (set, data) = selection_data(&args.selection, task, &setup.data, &setup.encoder)?;
    let dev = load_split(task, &setup.data, "dev", &setup.encoder)?.remove(0);
    let metric = task.primary_metric();
    let batch_size = args.task.batch_size;
    let dev_score = |m: &Model| -> Result<f64> {
        let logits = predict(
            m,
            &dev.sequences,
            batch_size,
            RunOptions::default(),
            &indicatif::ProgressBar::hidden(),
        )?;
        Ok(score(task, &setup.labels, &logits, &dev.targets)
            .get(metric)
            .unwrap_or(f64::NAN))
    };
    let scorer = Scorer::new(task, &setup.labels, &set.targets);
    let select_batches = batches(original, &set, &setup.labels, batch_size)?;
    let mean_len = set.sequences.iter().map(|s| s.ids.len()).sum::<usize>() as f64
        / set.sequences.len() as f64;

    let mut model = original.clone();
    let base_selection =
        Selector::new(&model, &select_batches, &scorer, metric, &model.keep_all())?
            .score(0, &model.keep_all())?;
    let floor = match args.max_drop {
        None => f64::NEG_INFINITY,
        Some(MaxDrop::Points(p)) => base_selection.metric - p / 100.0,
        Some(MaxDrop::Relative(r)) => base_selection.metric * (1.0 - r),
    };
    let rule = Rule {
        mode: args.mode,
        floor,
        patience: args.patience,
    };
    log(
        cli,
        &format!(
            "pruning {} ({} mode) on {} {} examples; selection {metric} {:.4}",
            args.model.model,
            args.mode.name(),
            data.examples,
            data.source,
            base_selection.metric
        ),
    );
    let mut budget = args.budget.unwrap_or(usize::MAX);
    let mut levels = args.levels.clone();
    levels.sort();
    levels.dedup();
    let mut outcomes = Vec::new();
    for &level in &levels {
        let results = match &significance {
            Some(r) => r.elements.clone(),
            None => {
                let subject = Subject {
                    model: &model,
                    source: &args.model.model,
                    task,
                    labels: &setup.labels,
                };
                let settings = Settings {
                    method: Method::Ablation,
                    levels: vec![level],
                    group_size: args.group_size,
                    exact_groups: Some(8),
                    taylor_examples: if level == Level::Groups {
                        512.min(set.sequences.len())
                    } else {
                        0
                    },
                    batch_size,
                    max_length: setup.max_length,
                };
                log(cli, &format!("significance of {}", level.name()));
                analyze(&subject, &set, data.clone(), settings, cli.quiet)?
                    .report
                    .elements
            }
        };
        let order = visiting_order(&model, &results, level, args.mode, mean_len);
        let mut plan = model.keep_all();
        let bar = progress::bar(order.len() as u64, level.name(), cli.quiet);
        let mut selector = Selector::new(&model, &select_batches, &scorer, metric, &plan)?;
        let outcome = prune_level(
            &mut selector,
            &mut plan,
            level,
            &order,
            rule,
            &mut budget,
            &bar,
        )?;
        bar.finish_and_clear();
        log(
            cli,
            &format!(
                "{}: removed {} of {} ({} re-evaluations), selection {metric} {:.4}",
                level.name(),
                outcome.removed.len(),
                outcome.candidates,
                outcome.evaluations,
                outcome.score.metric
            ),
        );
        model = model.slice(&plan)?;
        outcomes.push(outcome);
    }

    let after_selection =
        Selector::new(&model, &select_batches, &scorer, metric, &model.keep_all())?
            .score(0, &model.keep_all())?;
    let (dev_before, dev_after) = (dev_score(original)?, dev_score(&model)?);
    let latency = |m: &Model| -> Result<f64> {
        let seqs: Vec<&Sequence> = dev.sequences.iter().take(LATENCY_SAMPLES).collect();
        let times = seqs
            .iter()
            .map(|s| time_single(m, s))
            .collect::<Result<Vec<_>>>()?;
        Ok(median(&times) * 1000.0)
    };
    let (latency_before, latency_after) = (latency(original)?, latency(&model)?);
    let (params_before, params_after) = (original.parameter_count(), model.parameter_count());
    let mut history: Vec<Value> = original
        .config
        .raw
        .get("axcompress")
        .and_then(|a| a.get("history"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    history.push(json!({
        "pass": "prune",
        "mode": args.mode.name(),
        "max_drop": args.max_drop.map(|d| match d { MaxDrop::Points(p) => json!(p), MaxDrop::Relative(r) => json!(format!("{}%", r * 100.0)) }),
        "budget": args.budget,
        "patience": args.patience,
        "levels": levels.iter().map(|l| l.name()).collect::<Vec<_>>(),
        "group_size": args.group_size,
        "significance": args.significance.as_ref().map(|p| p.display().to_string()),
        "selection": data,
        "source_model": args.model.model,
        "removed": outcomes.iter().map(|o| json!({"level": o.level, "count": o.removed.len()})).collect::<Vec<_>>(),
    }));
    let bytes_before = weights_bytes(&original.dir);
    let mut report = json!({
        "task": task.name(),
        "metric": metric,
        "mode": args.mode.name(),
        "parameters": {"before": params_before, "after": params_after, "ratio": params_before as f64 / params_after.max(1) as f64},
        "weights_bytes": {"before": bytes_before},
        "selection": {"data": data, "before": base_selection, "after": after_selection},
        "dev": {"file": dev.path.display().to_string(), "examples": dev.sequences.len(), "before": dev_before, "after": dev_after},
        "latency_b1_p50_ms": {"before": latency_before, "after": latency_after, "samples": LATENCY_SAMPLES.min(dev.sequences.len())},
        "levels": outcomes,
        "structure": model.config.structure,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let compat = write_model_dir(&model, &args.out, &history, &report, args.force)?;
    let bytes_after = weights_bytes(&args.out);
    report["weights_bytes"]["after"] = json!(bytes_after);
    report["hf_compatible"] = json!(compat.hf_compatible);
    report["hf_incompatible_reason"] = json!(compat.reason);
    crate::fsutil::write_atomic(
        &args.out.join("report.json"),
        (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
    )
    .context("cannot finish report.json")?;
    if cli.json {
        return super::print_json(&report);
    }
    println!("wrote {}", args.out.display());
    println!(
        "  parameters       {params_before} -> {params_after} ({:.2}x smaller)",
        params_before as f64 / params_after.max(1) as f64
    );
    println!("  weights on disk  {bytes_before} -> {bytes_after} bytes");
    println!(
        "  selection {metric:<8} {:.4} -> {:.4} ({} examples, {})",
        base_selection.metric, after_selection.metric, data.examples, data.source
    );
    println!("  dev {metric:<14} {dev_before:.4} -> {dev_after:.4}");
    println!("  latency b1 p50   {latency_before:.2} -> {latency_after:.2} ms");
    println!(
        "  hf_compatible    {}{}",
        compat.hf_compatible,
        compat.reason.map(|r| format!(" ({r})")).unwrap_or_default()
    );
    Ok(())
}
