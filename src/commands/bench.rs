//! `axcompress bench`: latency (batch 1), throughput (batch N), peak memory, size and metric of a
//! model, optionally against a baseline with interleaved runs.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{log, print_json, task_setup};
use crate::cli::{BenchArgs, Cli, ModelArgs};
use crate::data::batch::encode;
use crate::measure::{median, percentile, throughput, time_single, tokenize_times, weights_bytes};
use crate::setup::TaskSetup;
use crate::text::tokenizer::Sequence;

/// One model under measurement.
struct Measured {
    name: &'static str,
    spec: String,
    setup: TaskSetup,
    dev: Vec<Sequence>,
    /// The dev texts `dev` was tokenized from.
    texts: Vec<(String, Option<String>)>,
    latencies: Vec<f64>,
    throughputs: Vec<f64>,
}

/// Runs `axcompress bench`.
pub fn run(args: &BenchArgs, cli: &Cli) -> Result<()> {
    if args.samples == 0 || args.repeats == 0 {
        bail!("--samples and --repeats must be at least 1");
    }
    let mut subjects = load_measured(args, cli)?;
    warm_up(&subjects, args)?;
    let samples = args.samples.min(subjects[0].dev.len());
    let tokenize_us = tokenize_p50_us(&subjects[0], samples)?;
    log(
        cli,
        &format!(
            "timing {samples} sentences at batch 1 and {} passes at batch {} ({} order), {} threads, interleaved",
            args.repeats,
            args.task.batch_size,
            args.order.name(),
            crate::threads::count()
        ),
    );
    time_interleaved(&mut subjects, samples, args)?;
    let mut report = json!({
        "task": args.task.task.name(),
        "threads": crate::threads::count(),
        "tokenize_b1_us_p50": tokenize_us,
        "results": results(&subjects, args)?,
    });
    if let Some(speedup) = speedup(&report["results"]) {
        report["speedup"] = speedup;
    }
    match cli.json {
        true => print_json(&report),
        false => print_table(&report, tokenize_us),
    }
}

/// The model (and the baseline, if any) with the dev split as each one's tokenizer encodes it.
fn load_measured(args: &BenchArgs, cli: &Cli) -> Result<Vec<Measured>> {
    let mut specs = vec![("model", args.model.model.clone())];
    if let Some(b) = &args.baseline {
        specs.push(("baseline", b.clone()));
    }
    let mut subjects = Vec::new();
    for (name, spec) in specs {
        let model_args = ModelArgs {
            model: spec.clone(),
            offline: args.model.offline,
            // The revision names the model's hub id, not the baseline's.
            revision: args.model.revision.clone().filter(|_| name == "model"),
        };
        let setup = task_setup(&model_args, &args.task, cli.runtime())?;
        let (suffix, set) = setup.data.split("dev")?.remove(0);
        let dev = encode(&set, suffix, &setup.encoder)?.sequences;
        let texts = set
            .examples
            .iter()
            .map(|e| (e.text_a.clone(), e.text_b.clone()))
            .collect();
        subjects.push(Measured {
            name,
            spec,
            setup,
            dev,
            texts,
            latencies: Vec::new(),
            throughputs: Vec::new(),
        });
    }
    Ok(subjects)
}

/// A few single sentences and one batched pass of each model before any timing.
fn warm_up(subjects: &[Measured], args: &BenchArgs) -> Result<()> {
    for s in subjects {
        for seq in s.dev.iter().take(8) {
            time_single(&s.setup.model, seq)?;
        }
        throughput(
            &s.setup.model,
            &s.dev[..s.dev.len().min(64)],
            args.task.batch_size,
            args.order,
        )?;
    }
    Ok(())
}

/// Batch-1 latencies of the first `samples` sentences and `--repeats` throughput passes, the
/// models taking turns (in alternating order) so that machine load falls on both alike.
fn time_interleaved(subjects: &mut [Measured], samples: usize, args: &BenchArgs) -> Result<()> {
    let order = |i: usize, n: usize| -> Vec<usize> {
        if i.is_multiple_of(2) {
            (0..n).collect()
        } else {
            (0..n).rev().collect()
        }
    };
    for i in 0..samples {
        for k in order(i, subjects.len()) {
            let s = &mut subjects[k];
            let t = time_single(&s.setup.model, &s.dev[i])?;
            s.latencies.push(t * 1000.0);
        }
    }
    for r in 0..args.repeats {
        for k in order(r, subjects.len()) {
            let s = &mut subjects[k];
            let t = throughput(&s.setup.model, &s.dev, args.task.batch_size, args.order)?;
            s.throughputs.push(t);
        }
    }
    Ok(())
}

/// Each model's figures, with its metric and peak memory from an evaluation in a child process.
fn results(subjects: &[Measured], args: &BenchArgs) -> Result<serde_json::Map<String, Value>> {
    let mut rows = serde_json::Map::new();
    for s in subjects {
        // The directory the model resolved to: the child needs no hub access or revision.
        let eval = eval_in_child(&s.setup.model.dir.to_string_lossy(), args)?;
        rows.insert(s.name.to_string(), json!({
            "model": s.spec,
            "latency_b1_ms": {"p50": percentile(&s.latencies, 0.5), "p90": percentile(&s.latencies, 0.9), "samples": s.latencies.len()},
            "throughput_sentences_per_second": {"batch_size": args.task.batch_size, "order": args.order.name(), "median": median(&s.throughputs), "runs": s.throughputs},
            "peak_rss_bytes": eval["peak_rss_bytes"],
            "weights_bytes": weights_bytes(&s.setup.model.dir),
            "parameters": s.setup.model.parameter_count(),
            "metrics": eval["metrics"],
        }));
    }
    Ok(rows)
}

/// Baseline over model (model over baseline for throughput) of each figure, with a baseline.
fn speedup(results: &Value) -> Option<Value> {
    let (m, b) = (results.get("model")?, results.get("baseline")?);
    let ratio = |path: &[&str], baseline_over_model: bool| -> Value {
        let get = |v: &Value| path.iter().fold(v, |v, k| &v[*k]).as_f64();
        match (get(b), get(m)) {
            (Some(bv), Some(mv)) if bv > 0.0 && mv > 0.0 => json!(if baseline_over_model {
                bv / mv
            } else {
                mv / bv
            }),
            _ => Value::Null,
        }
    };
    Some(json!({
        "latency_b1_p50": ratio(&["latency_b1_ms", "p50"], true),
        "latency_b1_p90": ratio(&["latency_b1_ms", "p90"], true),
        "throughput": ratio(&["throughput_sentences_per_second", "median"], false),
        "weights_bytes": ratio(&["weights_bytes"], true),
        "peak_rss": ratio(&["peak_rss_bytes"], true),
    }))
}

/// The human table of `report`.
fn print_table(report: &Value, tokenize_us: f64) -> Result<()> {
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>12} {:>10}",
        "", "b1 p50 ms", "b1 p90 ms", "b32 sent/s", "peak RSS MB", "weights MB", "metric"
    );
    for (name, r) in report["results"].as_object().context("results")? {
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let metric = r["metrics"]
            .as_object()
            .and_then(|m| m.values().next())
            .map(f)
            .unwrap_or(f64::NAN);
        println!(
            "{name:<10} {:>10.2} {:>10.2} {:>12.1} {:>12.1} {:>12.1} {:>10.4}",
            f(&r["latency_b1_ms"]["p50"]),
            f(&r["latency_b1_ms"]["p90"]),
            f(&r["throughput_sentences_per_second"]["median"]),
            f(&r["peak_rss_bytes"]) / 1e6,
            f(&r["weights_bytes"]) / 1e6,
            metric
        );
    }
    println!("tokenizing one sentence (before the latencies above): p50 {tokenize_us:.0} µs");
    if let Some(s) = report.get("speedup") {
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "baseline/model: latency p50 {:.2}x, p90 {:.2}x, throughput {:.2}x, weights {:.2}x, peak RSS {:.2}x",
            f("latency_b1_p50"), f("latency_b1_p90"), f("throughput"), f("weights_bytes"), f("peak_rss")
        );
    }
    Ok(())
}

/// Median microseconds to tokenize one of the first `samples` dev texts on its own (not part of
/// the latency figures, which start from token ids, as PyTorch's do in the comparison script).
fn tokenize_p50_us(subject: &Measured, samples: usize) -> Result<f64> {
    let texts = &subject.texts[..samples.min(subject.texts.len())];
    Ok(median(&tokenize_times(&subject.setup.encoder, texts)?) * 1e6)
}

/// Evaluates a model in a separate process so that its peak memory is its own.
fn eval_in_child(spec: &str, args: &BenchArgs) -> Result<Value> {
    let exe = std::env::current_exe().context("cannot find the axcompress executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "eval",
        "--model",
        spec,
        "--task",
        args.task.task.name(),
        "--json",
        "--quiet",
        "--batch-size",
    ])
    .arg(args.task.batch_size.to_string());
    if let Some(data) = &args.task.data {
        cmd.arg("--data").arg(data);
    }
    if let Some(n) = args.task.max_length {
        cmd.arg("--max-length").arg(n.to_string());
    }
    if args.model.offline {
        cmd.arg("--offline");
    }
    let out = cmd.output().context("cannot run the eval child process")?;
    if !out.status.success() {
        bail!(
            "evaluating {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("the eval child printed no JSON")
}
