//! `compress --config`: every config shipped in configs/ runs (on small data, small budgets, so
//! they cannot rot), its output loads, flags override the file, and bad configs are refused.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// `compress --config config --model model --data data --out out --json` with `extra` flags; the
/// report.
fn compress(config: &Path, model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut flags = vec![
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    flags.extend_from_slice(extra);
    common::compress_json(config, out, &flags)
}

/// The task a config is for.
fn task_of(config: &Path) -> String {
    axcompress::config_file::load(config)
        .unwrap()
        .settings
        .task
        .to_string()
}

#[test]
fn no_config_points_outside_the_repository() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    for config in configs() {
        let settings = axcompress::config_file::load(&config).unwrap().settings;
        let local = [Some(PathBuf::from(&settings.model)), settings.data]
            .into_iter()
            .flatten()
            .filter(|p| p.exists());
        for path in local {
            let path = path.canonicalize().unwrap();
            assert!(
                path.starts_with(&repo),
                "{}: {}",
                config.display(),
                path.display()
            );
        }
        // A model that is not a local path is a hub id `org/name` (a path in a config is
        // resolved against the config's directory, so it starts with `/` here).
        let hub_id =
            !settings.model.starts_with(['/', '.']) && settings.model.matches('/').count() <= 1;
        assert!(
            Path::new(&settings.model).exists() || hub_id,
            "{}: model {} is neither in the repository nor a hub id",
            config.display(),
            settings.model
        );
    }
}

/// Every SST-2 config, run on the demo model and the first 40 demo sentences of each split (the
/// configs name hub checkpoints, and `--model`/`--data` override them; the demo config's own
/// model is the demo model). The RTE config has its own test on the RTE fixture.
#[test]
fn every_sst2_config_in_configs_runs_and_writes_a_loadable_model() {
    let configs = configs();
    assert!(configs.len() >= 5, "configs/ holds {configs:?}");
    let tmp = tempfile::tempdir().unwrap();
    let data = common::small_sst2(40);
    let mut ran = 0;
    for config in configs {
        let name = config.file_stem().unwrap().to_string_lossy().into_owned();
        let task = task_of(&config);
        if task != "sst2" {
            assert!(name.starts_with(&task), "{name} is for {task}");
            continue;
        }
        ran += 1;
        let out = tmp.path().join(&name);
        let report = compress(
            &config,
            &common::demo_model(),
            data.path(),
            &out,
            // 20 selection sentences bound no drop of one point: a wide allowance keeps the
            // prunes going; 20 check sentences may still not vouch for it (status 3 writes the
            // model all the same, which is what this test loads).
            &[
                "--levels",
                "blocks",
                "--budget",
                "3",
                "--holdout",
                "20",
                "--max-drop",
                "50",
            ],
        );
        for stage in report["stages"].as_array().unwrap() {
            if stage["pass"] == "prune" {
                assert_eq!(stage["settings"]["budget"], 3, "{name}: --budget overrides");
                let levels = &stage["settings"]["levels"];
                assert_eq!(levels, &serde_json::json!(["blocks"]), "{name}");
            }
        }
        let eval = common::eval_json(&out, &task, data.path());
        assert_eq!(eval["metrics"], common::dev_after(&report), "{name}");
    }
    assert!(ran >= 5, "{ran} SST-2 configs");
}

/// The README's first command, as a newcomer runs it (only `--out` moved to a temp dir): the
/// demo config compresses the demo model on the demo data, keeps its promise, and says so.
#[test]
fn the_demo_config_runs_with_no_flags_and_keeps_its_promise() {
    let config = common::repo().join("configs/demo.toml");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    // Status 3 would write the output too; `kept` says it is 0.
    let report = common::compress_json(&config, &out, &[]);
    assert_eq!(report["tolerance"]["kept"], true, "{}", report["tolerance"]);
    let w = &report["weights_bytes"];
    assert!(
        w["after"].as_f64().unwrap() < 0.55 * w["before"].as_f64().unwrap(),
        "{w}"
    );
    let eval = common::eval_json(&out, "sst2", &common::demo_sst2());
    assert_eq!(eval["metrics"], common::dev_after(&report));
    // `onnx = true`: the ONNX file beside the weights, a graph with integer products.
    let onnx = std::fs::read(out.join("model.onnx")).unwrap();
    let graph = axcompress::export::onnx::interpret::decode(&onnx)
        .unwrap()
        .graph
        .unwrap();
    assert!(graph.node.iter().any(|n| n.op_type() == "MatMulInteger"));
    // Without --out it writes out/demo in the repository (the path is relative to the config).
    let settings = axcompress::config_file::load(&config).unwrap();
    assert_eq!(
        settings.out,
        Some(common::repo().join("configs/../out/demo"))
    );
}

#[test]
#[cfg_attr(
    fixtures_missing,
    ignore = "needs ../shared (AXCOMPRESS_FIXTURES): the MiniLM RTE fixture and GLUE RTE"
)]
fn rte_config_keeps_the_fp16_weights() {
    let shared = fixtures_or_skip!();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/rte-minilm-size.toml");
    let data = common::small_glue(&shared.join("data/glue"), "RTE", 30);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rte");
    let report = compress(
        &config,
        &shared.join("models/minilm-l6-rte"),
        data.path(),
        &out,
        &[
            "--levels",
            "blocks",
            "--max-drop",
            "20",
            "--confidence",
            "0.5",
        ],
    );
    let w = &report["weights_bytes"];
    assert!(w["after"].as_u64() < w["before"].as_u64(), "{w}");
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(tensors
        .values()
        .all(|t| t.dtype() == candle_core::DType::F16));
}

/// A config in a temp dir pointing at the demo model.
fn config_with(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = common::demo_model();
    let text = format!(
        "model = \"{}\"\ntask = \"sst2\"\n{extra}\n[[stages]]\npass = \"prune\"\n",
        model.display()
    );
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    dir
}

#[test]
fn unknown_keys_and_a_missing_out_are_refused() {
    let dir = config_with("max_dorp = 1.0");
    let path = dir.path().join("c.toml");
    let o = common::run(&[
        "compress",
        "--config",
        path.to_str().unwrap(),
        "--out",
        "/tmp/x",
    ]);
    common::assert_clean_error(&o, &["c.toml:3", "unknown field `max_dorp`"]);
    let dir = config_with("");
    let path = dir.path().join("c.toml");
    let o = common::run(&["compress", "--config", path.to_str().unwrap()]);
    common::assert_clean_error(&o, &["no output directory", "--out"]);
}
