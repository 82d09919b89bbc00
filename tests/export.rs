//! `axcompress export`: an ONNX file any ONNX runtime loads, checked after writing by the built-in
//! interpreter (values and structure), for stock and pruned models; stock transformers
//! directories refused for models they cannot hold; the output rules. When Python with
//! onnxruntime is importable (`AXCOMPRESS_PYTHON`, else `python3`; `.ci/run` installs one), ONNX
//! Runtime itself runs the exported files: the tiny BERT, RoBERTa and DistilBERT against
//! transformers' logits, and on SST-2 dev against `axcompress eval`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use axcompress::export::onnx::interpret;
use axcompress::export::write_model_dir;
use axcompress::model::Model;
use common::{assert_clean_error, json_stdout, read_json};
use serde_json::{json, Value};

fn export(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    common::run(&args)
}

/// The demo model with per-layer heads and FFN widths, a removed attention block, a layer with
/// no heads and a removed FFN, written by the library into `dir/pruned`.
fn pruned_demo(dir: &Path) -> PathBuf {
    let original = Model::from_dir(&common::demo_model()).unwrap();
    let mut plan = original.keep_all();
    plan[0].heads = Some(vec![0, 1, 4, 5]);
    plan[0].neurons = Some((0..768).filter(|n| n % 5 != 0).take(512).collect());
    plan[1].heads = None;
    plan[1].neurons = Some((0..768).step_by(3).take(128).collect());
    plan[2].heads = Some(vec![]);
    plan[2].neurons = None;
    let out = dir.join("pruned");
    let pruned = original.slice(&plan).unwrap();
    write_model_dir(&pruned, &out, &[json!({"pass": "test"})], &json!({}), false).unwrap();
    out
}

fn input_names(onnx: &Path) -> Vec<String> {
    let model = interpret::decode(&std::fs::read(onnx).unwrap()).unwrap();
    let graph = model.graph.unwrap();
    graph.input.iter().map(|i| i.name().to_string()).collect()
}

#[test]
fn demo_model_exports_to_a_checked_onnx_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("onnx");
    let summary = json_stdout(&export(&common::demo_model(), &out, &["--format", "onnx"]));
    assert!(
        summary["verified"]["max_abs_logit_diff"].as_f64().unwrap() < 1e-4,
        "{summary}"
    );
    assert_eq!(summary["verified"]["different_predictions"], 0);
    assert_eq!(summary["opset"], 17);
    for file in ["model.onnx", "config.json", "tokenizer.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["axcompress"]["format"], "onnx");
    let demo_data = common::demo_sst2();
    assert_clean_error(
        &common::eval(&out, &demo_data, &[]),
        &["holds only model.onnx", "ONNX Runtime"],
    );
    assert_eq!(
        input_names(&out.join("model.onnx")),
        ["input_ids", "attention_mask", "token_type_ids"]
    );
    // The same model gives the same bytes.
    let again = tmp.path().join("again");
    json_stdout(&export(
        &common::demo_model(),
        &again,
        &["--format", "onnx"],
    ));
    assert_eq!(
        std::fs::read(out.join("model.onnx")).unwrap(),
        std::fs::read(again.join("model.onnx")).unwrap()
    );
}

#[test]
fn pruned_model_exports_to_onnx_but_not_to_stock_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = pruned_demo(tmp.path());
    let out = tmp.path().join("onnx");
    let summary = json_stdout(&export(&pruned, &out, &["--format", "onnx"]));
    assert!(
        summary["verified"]["max_abs_logit_diff"].as_f64().unwrap() < 1e-4,
        "{summary}"
    );
    let inspected = json_stdout(&common::run(&[
        "inspect",
        "--model",
        pruned.to_str().unwrap(),
        "--json",
    ]));
    let loads_in = inspected["loads_in"].as_str().unwrap();
    assert!(
        loads_in.contains("ONNX Runtime") && loads_in.contains("not stock transformers: "),
        "{loads_in}"
    );
    let refused = tmp.path().join("hf");
    let result = export(&pruned, &refused, &["--format", "transformers"]);
    assert_clean_error(
        &result,
        &["--format transformers", "cannot hold", "--format onnx"],
    );
    assert!(!refused.exists());
}

#[test]
fn stock_model_exports_to_transformers_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    json_stdout(&export(
        &common::demo_model(),
        &out,
        &["--format", "transformers"],
    ));
    let original = Model::from_dir(&common::demo_model()).unwrap();
    let written = Model::from_dir(&out).unwrap();
    assert_eq!(
        original.fingerprint().unwrap(),
        written.fingerprint().unwrap()
    );
}

#[test]
fn export_follows_the_output_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::copy_model(&common::demo_model());
    let inside = model.path().join("onnx");
    assert_clean_error(
        &export(model.path(), &inside, &["--format", "onnx"]),
        &["--out", "inside the input"],
    );
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    assert_clean_error(
        &export(model.path(), &foreign, &["--format", "onnx", "--force"]),
        &["not a directory axcompress wrote"],
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
    let out = tmp.path().join("onnx");
    json_stdout(&export(model.path(), &out, &["--format", "onnx"]));
    assert_clean_error(
        &export(model.path(), &out, &["--format", "onnx"]),
        &["already exists", "--force"],
    );
    json_stdout(&export(
        model.path(),
        &out,
        &["--format", "onnx", "--force"],
    ));
}

/// A Python that imports onnxruntime, tokenizers and numpy, or `None` (said loudly; under
/// `CI=true` a failure, as `.ci/run` installs one).
fn python_with_onnxruntime() -> Option<String> {
    let python = std::env::var("AXCOMPRESS_PYTHON").unwrap_or_else(|_| "python3".into());
    let importable = Command::new(&python)
        .args(["-c", "import onnxruntime, tokenizers, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if importable {
        return Some(python);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !in_ci,
        "{python} cannot import onnxruntime, tokenizers and numpy; .ci/run installs them (set AXCOMPRESS_PYTHON)"
    );
    eprintln!("\n*** SKIPPED: {python} cannot import onnxruntime, tokenizers and numpy (set AXCOMPRESS_PYTHON) ***\n");
    None
}

/// onnx's checker and strict shape inference passed, where the onnx package is installed (it is
/// in `.ci/run`'s environment, where it must have run).
fn assert_checked(report: &Value) {
    let verdict = report["onnx_checker"].as_str().unwrap();
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    match verdict {
        "passed" => {}
        "not run" if !in_ci => eprintln!("\n*** onnx checker SKIPPED: no onnx package ***\n"),
        other => panic!("onnx checker: {other}"),
    }
}

/// `python scripts/onnx_check.py ARGS`: its JSON report, after checking that it succeeded and
/// that onnx's checker passed.
fn onnx_check(python: &str, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_check.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnx_check {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_checked(&report);
    report
}

/// `scripts/onnx_check.py check` of an exported directory against its source model on SST-2 dev.
fn onnx_runtime_check(
    python: &str,
    onnx: &Path,
    reference: &Path,
    glue: &Path,
    min: &str,
) -> Value {
    let (onnx, reference, glue) = (
        onnx.to_str().unwrap(),
        reference.to_str().unwrap(),
        glue.to_str().unwrap(),
    );
    let binary = env!("CARGO_BIN_EXE_axcompress");
    onnx_check(
        python,
        &[
            "check",
            onnx,
            "--reference",
            reference,
            "--task",
            "sst2",
            "--data",
            glue,
            "--threads",
            "2",
            "--min-agreement",
            min,
            "--axcompress",
            binary,
        ],
    )
}

#[test]
fn onnx_runtime_reproduces_transformers_on_every_family() {
    let Some(python) = python_with_onnxruntime() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-bert", "tiny-roberta", "tiny-distilbert"] {
        let model = common::tiny(name);
        let out = tmp.path().join(name);
        json_stdout(&export(&model, &out, &["--format", "onnx"]));
        let reference = model.join("reference.json");
        let (out, reference) = (out.to_str().unwrap(), reference.to_str().unwrap());
        let args = [
            "reference",
            out,
            "--reference-json",
            reference,
            "--tolerance",
            "1e-5",
        ];
        onnx_check(&python, &args);
    }
}

#[test]
fn onnx_runtime_reproduces_axcompress_on_the_demo_model_pruned_and_quantized() {
    let Some(python) = python_with_onnxruntime() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let glue = common::demo_glue();
    let pruned = pruned_demo(tmp.path());
    let out = tmp.path().join("pruned-onnx");
    json_stdout(&export(&pruned, &out, &["--format", "onnx"]));
    let report = onnx_runtime_check(&python, &out, &pruned, &glue, "1.0");
    assert!(
        report["max_abs_logit_diff"].as_f64().unwrap() < 1e-3,
        "{report}"
    );
    assert_eq!(report["onnx_accuracy"], report["axcompress_accuracy"]);

    let int8 = tmp.path().join("int8");
    common::int8_demo(&glue.join("SST-2"), &int8);
    let qdq = tmp.path().join("int8-qdq");
    json_stdout(&export(&int8, &qdq, &["--format", "onnx", "--int8", "qdq"]));
    onnx_runtime_check(&python, &qdq, &int8, &glue, "0.995");
    let dynamic = tmp.path().join("int8-dynamic");
    json_stdout(&export(&int8, &dynamic, &["--format", "onnx"]));
    onnx_runtime_check(&python, &dynamic, &int8, &glue, "0.98");
}

#[test]
#[cfg_attr(
    fixtures_missing,
    ignore = "needs ../shared (AXCOMPRESS_FIXTURES): MiniLM SST-2"
)]
fn onnx_runtime_reproduces_every_minilm_prediction() {
    let shared = fixtures_or_skip!();
    let Some(python) = python_with_onnxruntime() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = shared.join("models/minilm-l6-sst2");
    let out = tmp.path().join("onnx");
    json_stdout(&export(&model, &out, &["--format", "onnx"]));
    let report = onnx_runtime_check(&python, &out, &model, &shared.join("data/glue"), "1.0");
    assert!(
        report["max_abs_logit_diff"].as_f64().unwrap() < 1e-4,
        "{report}"
    );
    assert_eq!(report["examples"], 872);
}
