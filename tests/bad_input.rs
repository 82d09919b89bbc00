//! Bad input: each case exits non-zero with one `error:` line that names the file or field,
//! and never panics.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_clean_error, copy_model, eval};

fn inspect(model: &Path) -> Output {
    common::run(&["inspect", "--model", model.to_str().unwrap()])
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config = common::read_json(&path);
    edit(&mut config);
    std::fs::write(path, serde_json::to_string(&config).unwrap()).unwrap();
}

fn tsv(content: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".tsv").tempfile().unwrap();
    std::fs::write(f.path(), content).unwrap();
    f
}

#[test]
fn missing_model_directory() {
    let out = inspect(Path::new("/nonexistent/model-dir"));
    assert_clean_error(&out, &["/nonexistent/model-dir", "does not exist"]);
}

#[test]
fn missing_config_json() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_clean_error(&inspect(dir.path()), &["missing config.json"]);
}

#[test]
fn unknown_model_type() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    edit_config(dir.path(), |c| c["model_type"] = "gpt2".into());
    assert_clean_error(
        &inspect(dir.path()),
        &["config.json", "unknown model_type \"gpt2\""],
    );
}

#[test]
fn truncated_safetensors() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &inspect(dir.path()),
        &["model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn corrupt_safetensors() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    assert_clean_error(
        &inspect(dir.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn corrupt_pytorch_bin() {
    let dir = copy_model(&common::tiny("tiny-bert-bin"));
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not a zip").unwrap();
    assert_clean_error(
        &inspect(dir.path()),
        &["pytorch_model.bin", "cannot read PyTorch checkpoint"],
    );
}

#[test]
fn weight_shape_disagrees_with_config() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    edit_config(dir.path(), |c| c["intermediate_size"] = 96.into());
    assert_clean_error(
        &inspect(dir.path()),
        &[
            "intermediate.dense.weight has shape [64, 32]",
            "config.json implies [96, 32]",
        ],
    );
}

#[test]
fn missing_weights() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_clean_error(
        &inspect(dir.path()),
        &["no weights found", "model.safetensors"],
    );
}

#[test]
fn missing_tokenizer() {
    let dir = copy_model(&common::demo_model());
    for f in ["tokenizer.json", "vocab.txt"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    let out = eval(dir.path(), &common::demo_sst2(), &[]);
    assert_clean_error(&out, &["no tokenizer found", "tokenizer.json or vocab.txt"]);
}

#[test]
fn tsv_with_missing_column() {
    let data = tsv("text\tlabel\ngood \t1\n");
    let out = eval(&common::demo_model(), data.path(), &[]);
    assert_clean_error(&out, &[".tsv", "missing column \"sentence\""]);
}

#[test]
fn tsv_with_unparsable_label() {
    let data = tsv("sentence\tlabel\ngood \t1\nbad \tmaybe\n");
    let out = eval(&common::demo_model(), data.path(), &[]);
    assert_clean_error(&out, &[".tsv:3", "\"maybe\" is not a label of task sst2"]);
}

#[test]
fn model_labels_unknown_to_the_task() {
    let dir = copy_model(&common::demo_model());
    edit_config(dir.path(), |c| c["id2label"]["1"] = "happy".into());
    let out = eval(dir.path(), &common::demo_sst2(), &[]);
    assert_clean_error(
        &out,
        &["id2label[1] = \"happy\"", "not a label of task sst2"],
    );
}

#[test]
fn model_label_count_differs_from_task() {
    let out = eval(&common::tiny("tiny-bert"), &common::demo_sst2(), &[]);
    assert_clean_error(&out, &["config.json", "has 3 labels", "task sst2 has 2"]);
}

#[test]
fn empty_dataset() {
    let data = tsv("sentence\tlabel\n");
    let out = eval(&common::demo_model(), data.path(), &[]);
    assert_clean_error(&out, &[".tsv", "dataset is empty"]);
}

#[test]
fn max_length_zero() {
    let out = eval(
        &common::demo_model(),
        &common::demo_sst2(),
        &["--max-length", "0"],
    );
    assert_clean_error(&out, &["--max-length 0", "max_position_embeddings"]);
}

#[test]
fn data_directory_without_split_file() {
    let empty = tempfile::tempdir().unwrap();
    let out = eval(&common::demo_model(), empty.path(), &[]);
    assert_clean_error(&out, &["no dev.tsv for task sst2"]);
}

#[test]
fn a_confidence_out_of_range_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for bad in ["1.5", "0.3", "1"] {
        let o = common::run(&[
            "prune",
            "--model",
            "/nonexistent/model-dir",
            "--task",
            "sst2",
            "--mode",
            "size",
            "--max-drop",
            "1",
            "--confidence",
            bad,
            "--out",
            out.to_str().unwrap(),
        ]);
        // Refused by its value, before the (missing) model is even looked for.
        assert_clean_error(&o, &["confidence", bad, "out of range"]);
        assert!(!out.exists());
    }
}
