//! `axcompress eval`: metrics, loss and speed of a model on a GLUE task's data.

use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Map, Value};

use super::{log, print_json, task_setup};
use crate::cli::{Cli, EvalArgs};
use crate::data::batch::load_split;
use crate::data::labels::LabelMap;
use crate::evaluate::{predict, predicted_labels, score};
use crate::export::check_file_destination;
use crate::fsutil::write_atomic;
use crate::model::encoder::RunOptions;
use crate::model::Model;
use crate::progress;
use crate::setup::TaskSetup;

/// Runs `axcompress eval`.
pub fn run(args: &EvalArgs, cli: &Cli) -> Result<()> {
    let started = Instant::now();
    let TaskSetup {
        model,
        labels,
        encoder,
        max_length,
        data,
    } = task_setup(&args.model, &args.task, cli.runtime())?;
    if let Some(path) = &args.predictions {
        let inputs = [Some(model.dir.as_path()), args.task.data.as_deref()];
        check_file_destination(
            "--predictions",
            &inputs.into_iter().flatten().collect::<Vec<_>>(),
            path,
            args.force,
        )?;
    }
    let (task, batch_size) = (args.task.task, args.task.batch_size);
    let sets = load_split(&data, &args.split, &encoder)?;
    let total: usize = sets.iter().map(|s| s.sequences.len()).sum();
    log(
        cli,
        &format!(
            "evaluating {} on {total} {} examples",
            args.model.model, task
        ),
    );

    let bar = progress::bar(total as u64, "eval", cli.quiet);
    let infer_started = Instant::now();
    let mut per_set = Vec::new();
    let mut metrics = Map::new();
    let mut all_predictions = Vec::new();
    for set in &sets {
        let logits = predict(
            &model,
            &set.sequences,
            batch_size,
            RunOptions::default(),
            &bar,
        )?;
        let scores = score(task, &labels, &logits, &set.targets);
        for (name, value) in &scores.metrics {
            let key = if set.suffix.is_empty() {
                name.clone()
            } else {
                format!("{name}_{}", set.suffix)
            };
            metrics.insert(key, json!(value));
        }
        per_set.push(json!({
            "file": set.path.display().to_string(),
            "examples": set.sequences.len(),
            "metrics": scores.metrics.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<Map<_, _>>(),
            "loss": scores.loss,
        }));
        all_predictions.push(predictions_json(&model, &labels, task, &logits));
    }
    bar.finish_and_clear();
    let inference_seconds = infer_started.elapsed().as_secs_f64();
    let wall_seconds = started.elapsed().as_secs_f64();

    if let Some(path) = &args.predictions {
        let value = if all_predictions.len() == 1 {
            all_predictions.remove(0)
        } else {
            Value::Array(all_predictions)
        };
        write_atomic(path, serde_json::to_string(&value)?.as_bytes())?;
    }
    let report = json!({
        "model": args.model.model,
        "task": task.name(),
        "data": {"origin": data.origin, "location": data.location()},
        "split": args.split,
        "examples": total,
        "metrics": metrics,
        "sets": per_set,
        "batch_size": batch_size,
        "max_length": max_length,
        "wall_seconds": wall_seconds,
        "inference_seconds": inference_seconds,
        "sentences_per_second": total as f64 / inference_seconds.max(1e-9),
        "peak_rss_bytes": crate::measure::peak_rss_bytes(),
    });
    if cli.json {
        return print_json(&report);
    }
    println!("task {}  examples {total}", task);
    for (name, value) in &metrics {
        println!("  {name:<24} {:.4}", value.as_f64().unwrap_or(f64::NAN));
    }
    println!(
        "  wall {wall_seconds:.2}s  inference {inference_seconds:.2}s  {:.1} sentences/s (batch {})",
        total as f64 / inference_seconds.max(1e-9),
        batch_size
    );
    Ok(())
}

fn predictions_json(
    model: &Model,
    labels: &LabelMap,
    task: crate::data::task::Task,
    logits: &[Vec<f32>],
) -> Value {
    let predicted: Vec<Value> = if model.config.regression {
        logits.iter().map(|r| json!(r[0])).collect()
    } else {
        predicted_labels(logits, labels)
            .into_iter()
            .map(|t| json!(task.labels()[t]))
            .collect()
    };
    json!({ "logits": logits, "predicted": predicted })
}
