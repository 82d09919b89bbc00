//! Model sources and formats: hub ids from an offline cache, sharded safetensors, inspect.

mod common;

use std::collections::HashMap;
use std::path::Path;

use axcompress::model::encoder::RunOptions;
use axcompress::model::Model;
use candle_core::{Device, Tensor};
use common::{read_json, reference_inputs};

/// Lays out `src` as a Hugging Face hub cache entry for `org/name` under `cache`.
fn fake_hub_cache(cache: &Path, src: &Path, id: &str) {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), snapshot.join(f)).unwrap();
    }
}

#[test]
fn hub_id_loads_from_the_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    fake_hub_cache(cache.path(), &common::tiny("tiny-bert"), "acme/tiny-bert");
    let hub = cache.path().to_str().unwrap();
    let by_flag = common::run_with_env(
        &[
            "inspect",
            "--model",
            "acme/tiny-bert",
            "--offline",
            "--json",
        ],
        &[("HF_HUB_CACHE", hub)],
    );
    let report = common::json_stdout(&by_flag);
    assert_eq!(report["layers"].as_array().unwrap().len(), 3);
    assert!(report["dir"]
        .as_str()
        .unwrap()
        .contains("snapshots/0123456789abcdef"));
    let by_env = common::run_with_env(
        &["inspect", "--model", "acme/tiny-bert", "--json"],
        &[("HF_HUB_CACHE", hub), ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(common::json_stdout(&by_env), report);
}

#[test]
fn hub_id_missing_from_cache_offline_fails_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let out = common::run_with_env(
        &["inspect", "--model", "acme/absent", "--offline"],
        &[("HF_HUB_CACHE", cache.path().to_str().unwrap())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("acme/absent") && stderr.contains("pass a local model directory"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn sharded_safetensors_equal_single_file() {
    let src = common::tiny("tiny-bert");
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.path().join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let sharded = Model::from_dir(dir.path()).unwrap();
    let single = Model::from_dir(&src).unwrap();
    let inputs = reference_inputs(&single, &read_json(&src.join("reference.json")));
    let a: Vec<f32> = sharded
        .forward(&inputs, RunOptions::default())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = single
        .forward(&inputs, RunOptions::default())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn inspect_reports_shapes_and_every_parameter() {
    let dir = common::demo_model();
    let report = common::json_stdout(&common::run(&[
        "inspect",
        "--model",
        dir.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(report["family"], "bert");
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for l in layers {
        assert_eq!(l["heads"], 8);
        assert_eq!(l["ffn_width"], 768);
        assert_eq!(l["present"], true);
    }
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let in_file: usize = tensors.values().map(Tensor::elem_count).sum();
    assert_eq!(report["parameters"].as_u64().unwrap() as usize, in_file);
    assert_eq!(
        report["on_disk_by_dtype"]["f16"]["bytes"].as_u64().unwrap() as usize,
        in_file * 2
    );
}

#[test]
fn eval_json_reports_speed_and_metrics() {
    let data = tempfile::Builder::new().suffix(".tsv").tempfile().unwrap();
    let dev = std::fs::read_to_string(common::demo_sst2().join("dev.tsv")).unwrap();
    std::fs::write(
        data.path(),
        dev.lines().take(41).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let out = common::run(&[
        "eval",
        "--model",
        common::demo_model().to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        data.path().to_str().unwrap(),
        "--batch-size",
        "8",
        "--json",
    ]);
    let report = common::json_stdout(&out);
    assert_eq!(report["examples"], 40);
    assert_eq!(report["batch_size"], 8);
    assert_eq!(report["max_length"], 128);
    assert!(report["sentences_per_second"].as_f64().unwrap() > 0.0);
    let acc = report["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(report["sets"][0]["loss"].as_f64().unwrap().is_finite());
}
