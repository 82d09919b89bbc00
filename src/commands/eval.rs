//! `axcompress eval`: metrics, loss and speed of a model on a GLUE task's data.

use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;
use serde_json::{json, Map, Value};

use super::{log, print_json, task_setup};
use crate::cli::{Cli, EvalArgs};
use crate::data::batch::{load_split, EncodedSet};
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
    let setup = task_setup(&args.model, &args.task, cli.runtime())?;
    if let Some(path) = &args.predictions {
        let inputs = [Some(setup.model.dir.as_path()), args.task.data.as_deref()];
        check_file_destination(
            "--predictions",
            &inputs.into_iter().flatten().collect::<Vec<_>>(),
            path,
            args.force,
        )?;
    }
    let sets = load_split(&setup.data, &args.split, &setup.encoder)?;
    let total: usize = sets.iter().map(|s| s.sequences.len()).sum();
    log(
        cli,
        &format!(
            "evaluating {} on {total} {} examples",
            args.model.model, args.task.task
        ),
    );
    let bar = progress::bar(total as u64, "eval", cli.quiet);
    let infer_started = Instant::now();
    let scored = score_sets(&setup, &sets, args, &bar)?;
    bar.finish_and_clear();
    let inference_seconds = infer_started.elapsed().as_secs_f64();
    let wall_seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &args.predictions {
        write_atomic(path, scored.predictions_file()?.as_bytes())?;
    }
    let report = json!({
        "model": args.model.model,
        "task": args.task.task.name(),
        "data": {"origin": setup.data.origin, "location": setup.data.location()},
        "split": args.split,
        "examples": total,
        "metrics": scored.metrics,
        "sets": scored.per_set,
        "batch_size": args.task.batch_size,
        "max_length": setup.max_length,
        "wall_seconds": wall_seconds,
        "inference_seconds": inference_seconds,
        "sentences_per_second": total as f64 / inference_seconds.max(1e-9),
        "peak_rss_bytes": crate::measure::peak_rss_bytes(),
    });
    if cli.json {
        return print_json(&report);
    }
    println!("task {}  examples {total}", args.task.task);
    for (name, value) in &scored.metrics {
        println!("  {name:<24} {:.4}", value.as_f64().unwrap_or(f64::NAN));
    }
    println!(
        "  wall {wall_seconds:.2}s  inference {inference_seconds:.2}s  {:.1} sentences/s (batch {})",
        total as f64 / inference_seconds.max(1e-9),
        args.task.batch_size
    );
    Ok(())
}

/// What evaluating the split's files gave.
struct Scored {
    /// Every metric, suffixed by its file's split where there are several (MNLI).
    metrics: Map<String, Value>,
    /// Each file's metrics and loss.
    per_set: Vec<Value>,
    /// Each file's predictions.
    predictions: Vec<Value>,
}

impl Scored {
    /// The predictions file's content: one file's predictions, or a list of them.
    fn predictions_file(&self) -> Result<String> {
        Ok(match self.predictions.as_slice() {
            [one] => serde_json::to_string(one)?,
            all => serde_json::to_string(all)?,
        })
    }
}

/// Runs the model on every file of the split and scores it.
fn score_sets(
    setup: &TaskSetup,
    sets: &[EncodedSet],
    args: &EvalArgs,
    bar: &ProgressBar,
) -> Result<Scored> {
    let task = args.task.task;
    let mut scored = Scored {
        metrics: Map::new(),
        per_set: Vec::new(),
        predictions: Vec::new(),
    };
    for set in sets {
        let logits = predict(
            &setup.model,
            &set.sequences,
            args.task.batch_size,
            RunOptions::default(),
            bar,
        )?;
        let scores = score(task, &setup.labels, &logits, &set.targets);
        for (name, value) in &scores.metrics {
            let key = if set.suffix.is_empty() {
                name.clone()
            } else {
                format!("{name}_{}", set.suffix)
            };
            scored.metrics.insert(key, json!(value));
        }
        scored.per_set.push(json!({
            "file": set.path.display().to_string(),
            "examples": set.sequences.len(),
            "metrics": scores.metrics.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<Map<_, _>>(),
            "loss": scores.loss,
        }));
        let predictions = predictions_json(&setup.model, &setup.labels, task, &logits);
        scored.predictions.push(predictions);
    }
    Ok(scored)
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
