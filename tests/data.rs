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
#[cfg_attr(
    fixtures_missing,
    ignore = "needs ../shared (AXCOMPRESS_FIXTURES): the full GLUE SST-2 and RTE, as TSV and hub parquet"
)]
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

#[test]
fn the_demo_parquet_rows_equal_the_demo_tsv_rows() {
    let files = common::demo_hub_dataset();
    for (split, hub_split) in [("train", "train"), ("dev", "validation")] {
        let parquet: Vec<PathBuf> = files
            .iter()
            .filter(|(name, _)| name.starts_with(&format!("sst2/{hub_split}-")))
            .map(|(_, path)| path.clone())
            .collect();
        assert_eq!(parquet.len(), 1, "{split}: {files:?}");
        let from_hub = hub::read(Task::Sst2, &parquet).unwrap();
        let from_tsv = glue::read(
            Task::Sst2,
            &common::demo_sst2().join(format!("{split}.tsv")),
        );
        assert_eq!(from_hub.examples, from_tsv.unwrap().examples, "{split}");
    }
}

/// `eval --json` of the demo model with `extra` arguments and environment; also
/// writes the predictions to `predictions`.
fn eval(predictions: &Path, extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let model = common::demo_model();
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
fn without_data_the_hub_cache_gives_the_same_results_as_the_tsv_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (p_tsv, p_hub) = (tmp.path().join("tsv.json"), tmp.path().join("hub.json"));
    let data = common::demo_sst2();
    let tsv = eval(&p_tsv, &["--data", data.to_str().unwrap()], &[]);
    let cache = tmp.path().join("hub");
    common::demo_dataset_cache(&cache, "0123456789abcdef0123456789abcdef01234567");
    let env = [
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let hub = eval(&p_hub, &[], &env);
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
fn glue_dir_is_searched_before_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let glue_dir = common::demo_glue();
    let empty_cache = tempfile::tempdir().unwrap();
    let env = [
        ("GLUE_DIR", glue_dir.to_str().unwrap()),
        ("HF_HUB_CACHE", empty_cache.path().to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let r = eval(&tmp.path().join("p.json"), &[], &env);
    assert_eq!(r["data"]["origin"], "glue-dir");
    assert_eq!(
        r["data"]["location"],
        glue_dir.join("SST-2").to_str().unwrap()
    );
    assert_eq!(r["examples"], 872);
}

#[test]
fn no_data_anywhere_names_the_three_places_tried() {
    let empty_cache = tempfile::tempdir().unwrap();
    let out = common::run_with_env(
        &[
            "eval",
            "--model",
            common::demo_model().to_str().unwrap(),
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
