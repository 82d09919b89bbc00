//! Shared helpers for integration tests: locating the `../shared` fixtures and running the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use axcompress::model::inputs::Inputs;
use axcompress::model::Model;
use axcompress::text::tokenizer::Sequence;
use axcompress::text::tokenizer::TextEncoder;
use serde_json::Value;

/// The shared fixture directory (`AXCOMPRESS_FIXTURES`, else `../shared` beside the repo).
/// Returns `None` and says so loudly when missing; under `CI=true` a missing fixture fails,
/// unless `AXCOMPRESS_FIXTURES=none` declares a machine without them.
pub fn fixtures() -> Option<PathBuf> {
    if std::env::var("AXCOMPRESS_FIXTURES").is_ok_and(|v| v == "none") {
        eprintln!(
            "\n*** SKIPPED: AXCOMPRESS_FIXTURES=none (the extended suite is not run here) ***\n"
        );
        return None;
    }
    let dir = std::env::var_os("AXCOMPRESS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("models").is_dir() && dir.join("data").is_dir() {
        return Some(dir);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !in_ci,
        "fixtures not found at {} (set AXCOMPRESS_FIXTURES); under CI=true this is a failure",
        dir.display()
    );
    eprintln!(
        "\n*** SKIPPED: shared fixtures not found at {} (set AXCOMPRESS_FIXTURES) ***\n",
        dir.display()
    );
    None
}

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The demo SST-2 model carried by the repository (`demo/model`: a 3-layer BERT, fp16).
pub fn demo_model() -> PathBuf {
    repo().join("demo/model")
}

/// The GLUE directory of the demo data (`demo/data`, holding `SST-2`).
pub fn demo_glue() -> PathBuf {
    repo().join("demo/data")
}

/// The demo SST-2 data (`demo/data/SST-2`: all 872 dev sentences and 5,000 train sentences).
pub fn demo_sst2() -> PathBuf {
    demo_glue().join("SST-2")
}

/// The demo SST-2 data as the hub dataset `nyu-mll/glue` holds it: its repository paths
/// (`sst2/train-00000-of-00001.parquet`, `sst2/validation-…`) and the files in
/// `demo/data/nyu-mll-glue`.
pub fn demo_hub_dataset() -> Vec<(String, PathBuf)> {
    let dir = demo_glue().join("nyu-mll-glue/sst2");
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                format!("sst2/{}", p.file_name().unwrap().to_string_lossy()),
                p,
            )
        })
        .collect();
    files.sort();
    files
}

/// Writes a hub cache under `cache` holding the demo data as the dataset `nyu-mll/glue` at
/// revision `commit` (what a user's cache looks like after the data was fetched once).
pub fn demo_dataset_cache(cache: &Path, commit: &str) {
    let repo = cache.join("datasets--nyu-mll--glue");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for (name, path) in demo_hub_dataset() {
        let target = repo.join("snapshots").join(commit).join(name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(path, target).unwrap();
    }
}

/// A tiny parity model carried by the repository (`tests/fixtures/models/<name>`).
pub fn tiny(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

/// A GLUE directory with the first `rows` examples of the demo SST-2 train and dev files.
pub fn small_sst2(rows: usize) -> tempfile::TempDir {
    small_glue(&demo_glue(), "SST-2", rows)
}

/// Skips the calling test (returning early) when fixtures are missing.
#[macro_export]
macro_rules! fixtures_or_skip {
    () => {
        match common::fixtures() {
            Some(dir) => dir,
            None => return,
        }
    };
}

/// Runs the `axcompress` binary with `args`.
pub fn run(args: &[&str]) -> Output {
    run_with_env(args, &[])
}

/// `axcompress <command> --model M --task sst2 --data D --out O --json -q <extra>` (the shape of
/// every one-stage command: prune, quantize, analyze).
pub fn run_stage(command: &str, model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    run_task_stage(command, "sst2", model, data, out, extra)
}

/// [`run_stage`] for another task.
pub fn run_task_stage(
    command: &str,
    task: &str,
    model: &Path,
    data: &Path,
    out: &Path,
    extra: &[&str],
) -> Output {
    let mut args = stage_args(command, task, model, data, out);
    args.extend(["--json", "-q"]);
    args.extend_from_slice(extra);
    run(&args)
}

/// `<command> --model M --task T --data D --out O`: the arguments every one-stage command starts
/// with.
pub fn stage_args<'a>(
    command: &'a str,
    task: &'a str,
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
) -> Vec<&'a str> {
    let path = |p: &'a Path| p.to_str().unwrap();
    let mut args = vec![command, "--model", path(model), "--task", task];
    args.extend(["--data", path(data), "--out", path(out)]);
    args
}

/// Runs the `axcompress` binary with `args` and extra environment variables. The caller's
/// `HF_HUB_OFFLINE`, `GLUE_DIR`, `HF_ENDPOINT` and `HF_TOKEN` are not passed on: a test sets
/// what it relies on.
pub fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_axcompress"));
    cmd.args(args);
    for k in ["HF_HUB_OFFLINE", "GLUE_DIR", "HF_ENDPOINT", "HF_TOKEN"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the axcompress binary runs")
}

/// `quantize --bits 8` of the demo model on `data`, written to `out` (a run that wrote its
/// output: status 0, or 3 on a few sentences).
pub fn int8_demo(data: &Path, out: &Path) {
    let o = run_stage("quantize", &demo_model(), data, out, &["--bits", "8"]);
    assert!(wrote_output(&o), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Parses stdout of a successful `--json` run.
pub fn json_stdout(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

/// The report a run printed, whether it kept its promise (status 0) or wrote its output without
/// vouching for `max_drop` (status 3): for tests of a pass's mechanics on a few dozen sentences,
/// whose check split cannot vouch for a few points. The promise has its own tests.
pub fn json_report(out: &Output) -> Value {
    assert!(
        wrote_output(out),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

/// True when a run wrote its output: it kept its promise (status 0) or could not vouch for
/// `max_drop` on its few sentences (status 3).
pub fn wrote_output(out: &Output) -> bool {
    matches!(out.status.code(), Some(0 | 3))
}

/// `compress --config config --out out --json -q` with `extra` flags; the report (stdout), of a
/// run that wrote its output (status 0, or 3 when its check split could not vouch for max_drop).
pub fn compress_json(config: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "compress",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
        "-q",
    ];
    args.extend_from_slice(extra);
    json_report(&run(&args))
}

/// `axcompress eval --model M --task sst2 --data D -q <extra>`.
pub fn eval(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        data.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// `eval --json` of `model` on `task` with the data at `data`.
pub fn eval_json(model: &Path, task: &str, data: &Path) -> Value {
    json_stdout(&run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--task",
        task,
        "--data",
        data.to_str().unwrap(),
        "--json",
        "-q",
    ]))
}

/// The metrics of the compressed model on dev in a run's report.
pub fn dev_after(report: &Value) -> Value {
    report["evaluation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["split"] == "dev")
        .unwrap()["after"]["metrics"]
        .clone()
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The padded reference batch of a tiny fixture as model inputs.
pub fn reference_inputs(model: &Model, reference: &Value) -> Inputs {
    let rows = |key: &str| -> Option<Vec<Vec<u32>>> {
        reference[key].as_array().map(|rows| {
            rows.iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect()
        })
    };
    let ids = rows("input_ids").unwrap();
    let mask = rows("attention_mask").unwrap();
    let (b, t) = (ids.len(), ids[0].len());
    let types = rows("token_type_ids").unwrap_or_else(|| vec![vec![0; t]; b]);
    Inputs::from_padded(
        &model.config,
        b,
        t,
        ids.concat(),
        mask.concat(),
        types.concat(),
    )
    .unwrap()
}

/// The first `n` SST-2 dev sentences, tokenized for `model` (at most 64 tokens) as one batch.
pub fn sst2_dev_inputs(model: &Model, n: usize) -> Inputs {
    sst2_dev_batch_inputs(model, 0, n, n).remove(0)
}

/// SST-2 dev sentences `start..end`, tokenized for `model` (at most 64 tokens), in batches of
/// `batch`.
pub fn sst2_dev_batch_inputs(model: &Model, start: usize, end: usize, batch: usize) -> Vec<Inputs> {
    let text = std::fs::read_to_string(demo_sst2().join("dev.tsv")).unwrap();
    let sentences: Vec<(String, Option<String>)> = text
        .lines()
        .skip(1 + start)
        .take(end - start)
        .map(|l| (l.split('\t').next().unwrap().to_string(), None))
        .collect();
    let seqs = TextEncoder::load(&model.dir, 64)
        .unwrap()
        .encode(&sentences)
        .unwrap();
    seqs.chunks(batch)
        .map(|chunk| {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            Inputs::from_sequences(&model.config, &refs).unwrap()
        })
        .collect()
}

/// Flattens nested JSON number arrays.
pub fn flatten(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number array: {other}"),
    }
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A GLUE directory holding `<task_dir>/train.tsv` and `dev.tsv` with the first `rows` examples
/// of those in the GLUE directory `glue` (small data keeps CLI tests fast).
pub fn small_glue(glue: &Path, task_dir: &str, rows: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(task_dir)).unwrap();
    for split in ["train", "dev"] {
        let file = format!("{task_dir}/{split}.tsv");
        let text = std::fs::read_to_string(glue.join(&file)).unwrap();
        let head: Vec<&str> = text.lines().take(rows + 1).collect();
        std::fs::write(dir.path().join(&file), head.join("\n") + "\n").unwrap();
    }
    dir
}

/// Copies a fixture model directory into a fresh temp dir, symlinking large files.
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dir.path().join(entry.file_name());
        if entry.metadata().unwrap().len() > 1 << 20 {
            std::os::unix::fs::symlink(entry.path(), &target).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
    dir
}

/// Asserts a clean one-line failure whose message contains every `needles` entry.
pub fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "missing {n:?} in: {stderr}");
    }
}
