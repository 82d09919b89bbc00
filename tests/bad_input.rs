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

/// Writes `dir/pytorch_model.bin` as `torch.save` does (a zip holding `archive/data.pkl`) with
/// `pickle` as its pickle.
fn write_pytorch_bin(dir: &Path, pickle: &[u8]) {
    use std::io::Write;
    let file = std::fs::File::create(dir.join("pytorch_model.bin")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn a_pickle_nesting_a_million_lists_deep_is_refused_without_overflowing_the_stack() {
    // Before: candle's reader recursed and the process aborted (exit 134).
    let dir = copy_model(&common::tiny("tiny-bert-bin"));
    let depth = 1_000_000;
    let mut pickle = vec![0x80, 2];
    pickle.extend(std::iter::repeat_n(b']', depth));
    pickle.extend(std::iter::repeat_n(b'a', depth - 1));
    pickle.push(b'.');
    write_pytorch_bin(dir.path(), &pickle);
    assert_clean_error(
        &inspect(dir.path()),
        &[
            "pytorch_model.bin",
            "nests objects more than 1000 deep",
            "torch.save",
        ],
    );
}

#[test]
fn fewer_layers_in_config_json_than_in_the_weights_are_refused() {
    // Before: num_hidden_layers 0 against a checkpoint of 2 layers loaded as an empty encoder.
    let dir = copy_model(&common::tiny("tiny-bert"));
    edit_config(dir.path(), |c| c["num_hidden_layers"] = 0.into());
    assert_clean_error(
        &inspect(dir.path()),
        &[
            "model.safetensors",
            "tensors of the encoder are not used",
            "0 layers",
        ],
    );
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its (name, dtype, shape, bytes) list.
fn edit_weights(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn an_unknown_extra_tensor_loads_with_a_warning_naming_it() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    edit_weights(dir.path(), |t| {
        t.push((
            "bert.mystery.weight".into(),
            safetensors::Dtype::F32,
            vec![2],
            vec![0; 8],
        ));
    });
    let out = inspect(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("bert.mystery.weight"),
        "{stderr}"
    );
    // The fixture as shipped loads without a warning.
    let clean = inspect(&common::tiny("tiny-bert"));
    assert!(!String::from_utf8_lossy(&clean.stderr).contains("warning"));
}

#[test]
fn a_float_weight_stored_as_i32_is_named_with_its_dtype() {
    // Before: "missing tensor".
    let dir = copy_model(&common::tiny("tiny-bert"));
    let name = "bert.encoder.layer.0.output.dense.bias";
    edit_weights(dir.path(), |t| {
        let entry = t.iter_mut().find(|e| e.0 == name).unwrap();
        entry.1 = safetensors::Dtype::I32;
    });
    assert_clean_error(
        &inspect(dir.path()),
        &[name, "stored as I32", "F32, F16 or BF16"],
    );
}

#[test]
fn a_tokenizer_json_that_is_a_directory_is_named() {
    // Before: the directory was skipped and vocab.txt used silently.
    let dir = copy_model(&common::demo_model());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    std::fs::create_dir(dir.path().join("tokenizer.json")).unwrap();
    let out = eval(dir.path(), &common::demo_sst2(), &[]);
    assert_clean_error(&out, &["tokenizer.json", "not a readable file"]);
}

#[test]
fn a_symlink_loop_or_a_missing_local_path_never_reaches_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("loopA"), tmp.path().join("loopB"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    assert_clean_error(
        &inspect(&a),
        &["loopA", "symbolic link that does not resolve"],
    );
    // `m/missing` where m is a local directory: a path, not a hub id, so no network request
    // (HF_ENDPOINT points nowhere; a request would fail with a hub error instead).
    std::fs::create_dir(tmp.path().join("m")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axcompress"))
        .args(["inspect", "--model", "m/missing"])
        .current_dir(tmp.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert_clean_error(&out, &["m/missing does not exist", "not taken as a hub id"]);
}

#[test]
fn unsupported_compressed_tensors_fields_are_refused_naming_the_field() {
    let data = common::small_sst2(8);
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    common::int8_demo(data.path(), &q);
    let group = "/quantization_config/config_groups/group_0/weights";
    for (field, value, needle) in [
        ("num_bits", serde_json::json!(3), "weights.num_bits is 3"),
        (
            "strategy",
            serde_json::json!("tensor"),
            "weights.strategy is \"tensor\"",
        ),
    ] {
        let copy = copy_model(&q);
        edit_config(copy.path(), |c| {
            *c.pointer_mut(group).unwrap().get_mut(field).unwrap() = value
        });
        assert_clean_error(&inspect(copy.path()), &["config.json", needle]);
    }
    let copy = copy_model(&q);
    edit_config(copy.path(), |c| {
        c["quantization_config"]["quant_method"] = "gptq".into()
    });
    assert_clean_error(&inspect(copy.path()), &["quant_method is \"gptq\""]);
    // GPTQ's activation order: groups of reordered inputs.
    let copy = copy_model(&q);
    let module = "bert.encoder.layer.0.output.dense";
    edit_weights(copy.path(), |t| {
        let cols = t
            .iter()
            .find(|e| e.0 == format!("{module}.weight"))
            .unwrap()
            .2[1];
        let order: Vec<u8> = (0..cols as i32)
            .rev()
            .flat_map(|i| (i / 32).to_le_bytes())
            .collect();
        t.push((
            format!("{module}.weight_g_idx"),
            safetensors::Dtype::I32,
            vec![cols],
            order,
        ));
    });
    assert_clean_error(&inspect(copy.path()), &["weight_g_idx", "actorder"]);
}

#[test]
fn asymmetric_compressed_tensors_weights_load_with_their_zero_points() {
    let data = common::small_sst2(8);
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    common::int8_demo(data.path(), &q);
    // The same values stored asymmetrically: each row's codes shifted by a zero point of ±3
    // where they fit (0 elsewhere), so (code − zero point) · scale is unchanged.
    let copy = copy_model(&q);
    let module = "bert.encoder.layer.0.output.dense";
    edit_config(copy.path(), |c| {
        let group = "/quantization_config/config_groups/group_0/weights";
        c.pointer_mut(group).unwrap()["symmetric"] = false.into();
    });
    let mut shifted_rows = 0;
    edit_weights(copy.path(), |t| {
        let e = t
            .iter_mut()
            .find(|e| e.0 == format!("{module}.weight"))
            .unwrap();
        let (rows, cols) = (e.2[0], e.2[1]);
        let mut zero_points = Vec::new();
        for row in e.3.chunks_mut(cols) {
            let (lo, hi) = row.iter().fold((127i32, -128i32), |(l, h), &b| {
                (l.min(i32::from(b as i8)), h.max(i32::from(b as i8)))
            });
            let zp: i32 = if hi <= 124 {
                3
            } else if lo >= -125 {
                -3
            } else {
                0
            };
            shifted_rows += usize::from(zp != 0);
            for b in row.iter_mut() {
                *b = (i32::from(*b as i8) + zp) as i8 as u8;
            }
            zero_points.push(zp as i8 as u8);
        }
        t.push((
            format!("{module}.weight_zero_point"),
            safetensors::Dtype::I8,
            vec![rows, 1],
            zero_points,
        ));
    });
    assert!(shifted_rows > 100, "{shifted_rows} rows shifted");
    let logits = |model: &Path| {
        let file = tmp.path().join(format!(
            "{}.json",
            model.file_name().unwrap().to_str().unwrap()
        ));
        let out = common::eval(
            model,
            data.path(),
            &[
                "--execution",
                "dequantized",
                "--predictions",
                file.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::flatten(&common::read_json(&file)["logits"])
    };
    let (a, b) = (logits(&q), logits(copy.path()));
    assert!(
        common::max_abs_diff(&a, &b) < 1e-5,
        "{}",
        common::max_abs_diff(&a, &b)
    );
}

/// `compress` with a config of `model`, the demo data and one stage of `stage` (TOML lines).
fn compress_with_stage(stage: &str) -> (Output, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    let text = format!(
        "model = \"{}\"\ntask = \"sst2\"\ndata = \"{}\"\nmax_drop = 1.0\n\n[[stages]]\n{stage}\n",
        common::demo_model().display(),
        common::demo_sst2().display()
    );
    std::fs::write(&config, text).unwrap();
    let out = tmp.path().join("out");
    let o = common::run(&[
        "compress",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    (o, tmp)
}

#[test]
fn settings_that_cannot_work_are_refused_before_any_evaluation() {
    // Before: group_size 7 failed after the blocks and heads levels had run, leaving a progress
    // file that refused the corrected rerun; k = [] became the default grid; rounds = 0 ran a
    // round; a missing teacher failed only when the recovery began, after the prune.
    let cases = [
        (
            "pass = \"prune\"\nmode = \"size\"\nlevels = [\"blocks\", \"heads\", \"groups\"]\ngroup_size = 7",
            vec!["--group-size 7 does not divide the FFN width 768"],
        ),
        (
            "pass = \"attention\"\nmethod = \"sign-match\"\nk = []",
            vec!["attention: k = [] tries nothing"],
        ),
        (
            "pass = \"prune\"\nmode = \"size\"\nrounds = 0",
            vec!["prune: rounds must be at least 1"],
        ),
        (
            "pass = \"prune\"\nmode = \"size\"\n\n[[stages]]\npass = \"recover\"\nteacher = \"/nonexistent/teacher\"",
            vec!["recover: teacher /nonexistent/teacher", "does not exist"],
        ),
    ];
    for (stage, needles) in cases {
        let (o, tmp) = compress_with_stage(stage);
        assert_clean_error(&o, &needles);
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        // No progress file and no output: refused before the journal opened.
        assert_eq!(left, vec!["c.toml"], "{stage}: left {left:?}");
    }
}
