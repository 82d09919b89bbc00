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
/// report. The configs name hub checkpoints; the tests run them on the fixture of their task.
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

/// The task a config is for, its GLUE directory name and its fixture model's directory name.
fn task_of(config: &Path) -> (String, &'static str, &'static str) {
    let text = std::fs::read_to_string(config).unwrap();
    let task = text
        .lines()
        .find_map(|l| l.strip_prefix("task = \""))
        .and_then(|l| l.split('"').next())
        .unwrap_or_else(|| panic!("{}: no task", config.display()))
        .to_string();
    let (glue_dir, model) = match task.as_str() {
        "sst2" => ("SST-2", "minilm-l6-sst2"),
        "rte" => ("RTE", "minilm-l6-rte"),
        other => panic!(
            "{}: no small fixture data for task {other}",
            config.display()
        ),
    };
    (task, glue_dir, model)
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

#[test]
#[cfg_attr(fixtures_missing, ignore = "needs the shared fixtures")]
fn every_config_in_configs_runs_and_writes_a_loadable_model() {
    let shared = fixtures_or_skip!();
    let configs = configs();
    assert!(configs.len() >= 5, "configs/ holds {configs:?}");
    let tmp = tempfile::tempdir().unwrap();
    for config in configs {
        let name = config.file_stem().unwrap().to_string_lossy().into_owned();
        let (task, glue_dir, model) = task_of(&config);
        let data = common::small_glue(&shared, glue_dir, 40);
        let out = tmp.path().join(&name);
        let report = compress(
            &config,
            &shared.join("models").join(model),
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
}

#[test]
#[cfg_attr(fixtures_missing, ignore = "needs the shared fixtures")]
fn rte_config_keeps_the_fp16_weights() {
    let shared = fixtures_or_skip!();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/rte-minilm-size.toml");
    let data = common::small_glue(&shared, "RTE", 30);
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

/// A config in a temp dir pointing at the SST-2 fixture model.
fn config_with(shared: &Path, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = shared.join("models/minilm-l6-sst2");
    let text = format!(
        "model = \"{}\"\ntask = \"sst2\"\n{extra}\n[[stages]]\npass = \"prune\"\n",
        model.display()
    );
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    dir
}

#[test]
#[cfg_attr(fixtures_missing, ignore = "needs the shared fixtures")]
fn unknown_keys_and_a_missing_out_are_refused() {
    let shared = fixtures_or_skip!();
    let dir = config_with(&shared, "max_dorp = 1.0");
    let path = dir.path().join("c.toml");
    let o = common::run(&[
        "compress",
        "--config",
        path.to_str().unwrap(),
        "--out",
        "/tmp/x",
    ]);
    common::assert_clean_error(&o, &["c.toml:3", "unknown field `max_dorp`"]);
    let dir = config_with(&shared, "");
    let path = dir.path().join("c.toml");
    let o = common::run(&["compress", "--config", path.to_str().unwrap()]);
    common::assert_clean_error(&o, &["no output directory", "--out"]);
}
