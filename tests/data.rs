//! Data found by task name: `--data`, then `$GLUE_DIR/<TaskDir>`, then the hub dataset
//! `nyu-mll/glue` in the local cache; the hub rows equal the GLUE TSV rows, so every result on
//! them is the same.

mod common;

use std::path::{Path, PathBuf};

use axcompress::data::task::Task;
use axcompress::data::{glue, hub};

/// The fixture hub cache.
fn hub_cache(shared: &Path) -> PathBuf {
    shared.join("data/hub")
}

/// The parquet files of one split of a task in the fixture hub cache.
fn hub_files(shared: &Path, config: &str, split: &str) -> Vec<PathBuf> {
    let snapshots = hub_cache(shared).join("datasets--nyu-mll--glue/snapshots");
    let snapshot = std::fs::read_dir(snapshots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(snapshot.path().join(config))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&format!("{split}-")) && name.ends_with(".parquet")
        })
        .collect();
    files.sort();
    files
}

#[test]
#[cfg_attr(fixtures_missing, ignore = "needs the shared fixtures")]
fn hub_rows_equal_glue_tsv_rows() {
    let shared = fixtures_or_skip!();
    for (task, config) in [(Task::Sst2, "sst2"), (Task::Rte, "rte")] {
        for (split, hub_split) in [("train", "train"), ("dev", "validation")] {
            let files = hub_files(&shared, config, hub_split);
            assert!(!files.is_empty(), "{task} {split}: no parquet files");
            let from_hub = hub::read(task, &files).unwrap();
            let tsv = glue::split_paths(task, &shared.join("data/glue"), split).unwrap();
            let from_tsv = glue::read(task, &tsv[0].1).unwrap();
            assert_eq!(
                from_hub.examples.len(),
                from_tsv.examples.len(),
                "{task} {split}"
            );
            for (i, (h, t)) in from_hub.examples.iter().zip(&from_tsv.examples).enumerate() {
                assert_eq!(h, t, "{task} {split} row {}", i + 1);
            }
        }
    }
}

/// `eval --json` of the SST-2 fixture model with `extra` arguments and environment; also
/// writes the predictions to `predictions`.
fn eval(
    shared: &Path,
    predictions: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let model = shared.join("models/minilm-l6-sst2");
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "sst2",
        "--predictions",
        predictions.to_str().unwrap(),
        "--json",
        "-q",
    ];
    args.extend_from_slice(extra);
    common::json_stdout(&common::run_with_env(&args, env))
}

#[test]
#[cfg_attr(fixtures_missing, ignore = "needs the shared fixtures")]
fn without_data_the_hub_cache_gives_the_same_results_as_the_tsv_files() {
    let shared = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let (p_tsv, p_hub) = (tmp.path().join("tsv.json"), tmp.path().join("hub.json"));
    let data = shared.join("data/glue/SST-2");
    let tsv = eval(&shared, &p_tsv, &["--data", data.to_str().unwrap()], &[]);
    let cache = hub_cache(&shared);
    let env = [
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let hub = eval(&shared, &p_hub, &[], &env);
    assert_eq!(tsv["data"]["origin"], "argument");
    assert_eq!(hub["data"]["origin"], "hub");
    assert_eq!(hub["examples"], 872);
    assert_eq!(hub["metrics"], tsv["metrics"]);
    assert_eq!(
        std::fs::read(&p_hub).unwrap(),
        std::fs::read(&p_tsv).unwrap()
    );
}

#[test]
#[cfg_attr(fixtures_missing, ignore = "needs the shared fixtures")]
fn glue_dir_is_searched_before_the_hub() {
    let shared = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let glue_dir = shared.join("data/glue");
    let empty_cache = tempfile::tempdir().unwrap();
    let env = [
        ("GLUE_DIR", glue_dir.to_str().unwrap()),
        ("HF_HUB_CACHE", empty_cache.path().to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let r = eval(&shared, &tmp.path().join("p.json"), &[], &env);
    assert_eq!(r["data"]["origin"], "glue-dir");
    assert_eq!(
        r["data"]["location"],
        glue_dir.join("SST-2").to_str().unwrap()
    );
    assert_eq!(r["examples"], 872);
}

#[test]
#[cfg_attr(fixtures_missing, ignore = "needs the shared fixtures")]
fn no_data_anywhere_names_the_three_places_tried() {
    let shared = fixtures_or_skip!();
    let empty_cache = tempfile::tempdir().unwrap();
    let out = common::run_with_env(
        &[
            "eval",
            "--model",
            shared.join("models/minilm-l6-sst2").to_str().unwrap(),
            "--task",
            "sst2",
        ],
        &[
            ("HF_HUB_CACHE", empty_cache.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    common::assert_clean_error(
        &out,
        &[
            "no --data given",
            "GLUE_DIR is not set",
            "nyu-mll/glue",
            "offline",
        ],
    );
}
