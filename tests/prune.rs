//! Pruning, export and bench: exported models equal gated originals, round trips through eval and
//! inspect, stock configs where possible, and clear errors.

mod common;

use std::path::Path;

use axcompress::export::write_model_dir;
use axcompress::model::encoder::RunOptions;
use axcompress::model::inputs::{Inputs, Sequence};
use axcompress::model::slice::LayerKeep;
use axcompress::model::tokenizer::TextEncoder;
use axcompress::model::Model;
use common::{max_abs_diff, read_json};
use serde_json::json;

fn dev_inputs(shared: &Path, model: &Model, n: usize) -> Inputs {
    let text = std::fs::read_to_string(shared.join("data/glue/SST-2/dev.tsv")).unwrap();
    let sentences: Vec<(String, Option<String>)> = text
        .lines()
        .skip(1)
        .take(n)
        .map(|l| (l.split('\t').next().unwrap().to_string(), None))
        .collect();
    let seqs = TextEncoder::load(&shared.join("models/minilm-l6-sst2"), 64)
        .unwrap()
        .encode(&sentences)
        .unwrap();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    Inputs::from_sequences(&model.config, &refs).unwrap()
}

fn logits(
    model: &Model,
    inputs: &Inputs,
    gates: Option<&axcompress::model::encoder::Gates>,
) -> Vec<f32> {
    let opts = RunOptions {
        gates,
        differentiable: false,
    };
    model
        .forward(inputs, opts)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Exports `original.slice(plan)`, reloads it, and checks it against the gated original.
fn export_and_compare(shared: &Path, plan: &[LayerKeep]) -> (tempfile::TempDir, serde_json::Value) {
    let original = Model::from_dir(&shared.join("models/minilm-l6-sst2")).unwrap();
    let pruned = original.slice(plan).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    write_model_dir(
        &pruned,
        &out,
        &[json!({"pass": "test"})],
        &json!({"test": true}),
        false,
    )
    .unwrap();
    let reloaded = Model::from_dir(&out).unwrap();
    assert_eq!(reloaded.parameter_count(), pruned.parameter_count());
    let inputs = dev_inputs(shared, &original, 48);
    let gates = original.gates_for(plan).unwrap();
    let diff = max_abs_diff(
        &logits(&reloaded, &inputs, None),
        &logits(&original, &inputs, Some(&gates)),
    );
    assert!(
        diff <= 1e-4,
        "exported model differs from the gated original by {diff}"
    );
    let config = read_json(&out.join("config.json"));
    (tmp, config)
}

#[test]
fn exported_pruned_model_equals_gated_original() {
    let shared = fixtures_or_skip!();
    let original = Model::from_dir(&shared.join("models/minilm-l6-sst2")).unwrap();
    let mut plan = original.keep_all();
    plan[0].heads = Some(vec![0, 1, 4, 5, 9]);
    plan[1].neurons = Some((0..1536).filter(|n| n % 5 != 0).take(1024).collect());
    plan[2].heads = None;
    plan[3].heads = Some(vec![]);
    plan[3].neurons = Some((0..1536).step_by(3).take(256).collect());
    plan[4] = LayerKeep {
        heads: None,
        neurons: None,
    };
    plan[5].neurons = None;
    let (tmp, config) = export_and_compare(&shared, &plan);
    assert_eq!(config["axcompress"]["hf_compatible"], false);
    assert_eq!(
        config["axcompress"]["structure"]["layers"][0]["heads"],
        json!([0, 1, 4, 5, 9])
    );
    assert_eq!(config["num_hidden_layers"], 6);
    assert_eq!(
        config["id2label"],
        json!({"0": "negative", "1": "positive"})
    );
    assert!(tmp.path().join("pruned/tokenizer.json").is_file());
}

#[test]
fn stock_expressible_result_writes_a_standard_config() {
    let shared = fixtures_or_skip!();
    let original = Model::from_dir(&shared.join("models/minilm-l6-sst2")).unwrap();
    let mut plan = original.keep_all();
    plan[2] = LayerKeep {
        heads: None,
        neurons: None,
    };
    let (tmp, config) = export_and_compare(&shared, &plan);
    assert_eq!(config["axcompress"]["hf_compatible"], true);
    assert!(config["axcompress"].get("structure").is_none());
    assert_eq!(config["num_hidden_layers"], 5);
    assert_eq!(config["intermediate_size"], 1536);
    assert_eq!(config["axcompress"]["removed_layers"], json!([2]));
    let tensors = candle_core::safetensors::load(
        tmp.path().join("pruned/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(tensors.contains_key("bert.encoder.layer.4.output.dense.weight"));
    assert!(!tensors.contains_key("bert.encoder.layer.5.output.dense.weight"));
}

fn prune_cli(shared: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = shared.join("models/minilm-l6-sst2");
    let data = shared.join("data/glue/SST-2");
    let mut args = vec![
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        data.to_str().unwrap(),
        "--holdout",
        "48",
        "--levels",
        "blocks,heads",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    common::run(&args)
}

#[test]
fn prune_eval_inspect_round_trip() {
    let shared = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let o = prune_cli(&shared, &out, &["--budget", "24", "--json"]);
    let report = common::json_stdout(&o);
    assert!(report["parameters"]["after"].as_u64() <= report["parameters"]["before"].as_u64());
    let saved = read_json(&out.join("report.json"));
    assert_eq!(saved["dev"], report["dev"]);
    assert!(
        saved["selection"]["after"]["metric"].as_f64().unwrap()
            >= saved["selection"]["before"]["metric"].as_f64().unwrap()
    );
    let eval = common::json_stdout(&common::run(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        shared.join("data/glue/SST-2").to_str().unwrap(),
        "--json",
        "-q",
    ]));
    let acc = eval["metrics"]["accuracy"].as_f64().unwrap();
    assert!((acc - report["dev"]["after"].as_f64().unwrap()).abs() < 1e-9);
    let inspect = common::json_stdout(&common::run(&[
        "inspect",
        "--model",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(inspect["parameters"], report["parameters"]["after"]);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["axcompress"]["history"][0]["pass"], "prune");
}

/// A failure from argument parsing (clap): non-zero exit, no panic, the option named.
fn assert_usage_error(o: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(needle), "missing {needle:?} in {stderr}");
}

#[test]
fn out_inside_the_input_model_is_refused() {
    let shared = fixtures_or_skip!();
    let dir = common::copy_model(&shared.join("models/minilm-l6-sst2"));
    let o = common::run(&[
        "prune",
        "--model",
        dir.path().to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        shared.join("data/glue/SST-2").to_str().unwrap(),
        "--out",
        dir.path().join("sub").to_str().unwrap(),
    ]);
    common::assert_clean_error(&o, &["is inside the input model directory"]);
    assert!(!dir.path().join("sub").exists());
}

#[test]
fn existing_out_needs_force() {
    let shared = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let o = prune_cli(&shared, &out, &[]);
    common::assert_clean_error(&o, &["already exists; pass --force"]);
    assert!(out.join("keep.txt").is_file());
}

#[test]
fn max_drop_must_be_a_non_negative_number() {
    let shared = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for bad in ["-1", "abc", "-2%"] {
        let o = prune_cli(
            &shared,
            &out,
            &["--mode", "size", &format!("--max-drop={bad}")],
        );
        assert_usage_error(&o, "--max-drop");
    }
    let o = prune_cli(&shared, &out, &["--mode", "size"]);
    common::assert_clean_error(&o, &["needs --max-drop"]);
}

#[test]
fn significance_report_of_another_model_is_refused() {
    let shared = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    // A report for a copy whose config differs (one head fewer in layer 0 is a different model).
    let other = common::copy_model(&shared.join("models/minilm-l6-sst2"));
    let report_path = tmp.path().join("report.json");
    let o = common::run(&[
        "analyze",
        "--model",
        other.path().to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        shared.join("data/glue/SST-2").to_str().unwrap(),
        "--on",
        "dev",
        "--limit",
        "8",
        "--levels",
        "blocks",
        "--out",
        report_path.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut report = read_json(&report_path);
    report["model"]["fingerprint"] = json!("0000000000000000");
    std::fs::write(&report_path, report.to_string()).unwrap();
    let o = prune_cli(
        &shared,
        &tmp.path().join("o"),
        &["--significance", report_path.to_str().unwrap()],
    );
    common::assert_clean_error(&o, &["the report was computed for model"]);
}

#[test]
fn bench_compares_against_a_baseline() {
    let shared = fixtures_or_skip!();
    let model = shared.join("models/minilm-l6-sst2");
    let data = tempfile::Builder::new().suffix(".tsv").tempfile().unwrap();
    let dev = std::fs::read_to_string(shared.join("data/glue/SST-2/dev.tsv")).unwrap();
    std::fs::write(
        data.path(),
        dev.lines().take(33).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let report = common::json_stdout(&common::run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--baseline",
        model.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        data.path().to_str().unwrap(),
        "--samples",
        "8",
        "--repeats",
        "1",
        "--json",
        "-q",
    ]));
    for k in ["model", "baseline"] {
        let r = &report["results"][k];
        assert!(r["latency_b1_ms"]["p50"].as_f64().unwrap() > 0.0);
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
        assert_eq!(r["metrics"], report["results"]["baseline"]["metrics"]);
    }
    assert_eq!(report["speedup"]["weights_bytes"].as_f64(), Some(1.0));
}
