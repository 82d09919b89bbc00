//! Reliability: broken weights and awkward text are refused or handled with one clear line,
//! limits are enforced, and no writer leaves a half-written file at its final path, whether the
//! run is killed (SIGKILL) or interrupted (SIGINT, exit 130 with the resumable state named).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_error, copy_model, run};

/// SIGPIPE's number on Linux and the BSDs.
const SIGPIPE: i32 = 13;

const NAN_TENSOR: &str = "bert.encoder.layer.0.output.dense.weight";

/// The dtype of tensor `name` in the safetensors `bytes` and the byte range of its data.
fn tensor_span(bytes: &[u8], name: &str) -> (String, std::ops::Range<usize>) {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let offset =
        |i: usize| 8 + header_len + header[name]["data_offsets"][i].as_u64().unwrap() as usize;
    let dtype = header[name]["dtype"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (dtype, offset(0)..offset(1))
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its bytes (the model's weights are
/// symlinked by `copy_model`: the file is written anew).
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, bytes).unwrap();
}

/// Replaces the first value of the f32 or f16 tensor `name` in `dir/model.safetensors` by
/// `value`.
fn poison(dir: &Path, name: &str, value: f32) {
    rewrite_weights(dir, |bytes| {
        let (dtype, span) = tensor_span(bytes, name);
        let start = span.start;
        match dtype.as_str() {
            "F32" => bytes[start..start + 4].copy_from_slice(&value.to_le_bytes()),
            "F16" => {
                bytes[start..start + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes())
            }
            other => panic!("{name} is {other:?}, not F32 or F16"),
        }
    });
}

/// Sets every value of the f32 tensor `name` in `dir/model.safetensors` to `value`.
fn fill(dir: &Path, name: &str, value: f32) {
    rewrite_weights(dir, |bytes| {
        let (dtype, span) = tensor_span(bytes, name);
        assert_eq!(dtype, "F32", "{name}");
        for chunk in bytes[span].chunks_mut(4) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    });
}

/// The demo model with every f16 tensor stored as f32 (room for values beyond fp16's range).
fn demo_in_f32() -> tempfile::TempDir {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::demo_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| match view.dtype() {
            Dtype::F16 => {
                let data = view
                    .data()
                    .chunks(2)
                    .flat_map(|b| {
                        half::f16::from_le_bytes([b[0], b[1]])
                            .to_f32()
                            .to_le_bytes()
                    })
                    .collect();
                (name, Dtype::F32, view.shape().to_vec(), data)
            }
            other => (name, other, view.shape().to_vec(), view.data().to_vec()),
        })
        .collect();
    let views: Vec<(String, TensorView)> = converted
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let config = dir.path().join("config.json");
    let mut json = common::read_json(&config);
    json["dtype"] = "float32".into();
    std::fs::write(&config, json.to_string()).unwrap();
    dir
}

fn eval(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let mut args = vec![
        "eval", "--model", m, "--task", "sst2", "--data", d, "--json", "-q",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn tsv(bytes: &[u8]) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".tsv").tempfile().unwrap();
    std::fs::write(f.path(), bytes).unwrap();
    f
}

fn examples(out: &Output) -> u64 {
    common::json_stdout(out)["examples"].as_u64().unwrap()
}

/// The logits `eval --predictions` wrote to `path`.
fn logits(path: &Path) -> serde_json::Value {
    common::read_json(path)["logits"].clone()
}

#[test]
fn a_nan_weight_is_refused_naming_the_tensor_unless_allowed() {
    let dir = copy_model(&common::tiny("tiny-bert"));
    poison(dir.path(), NAN_TENSOR, f32::NAN);
    let model = dir.path().to_str().unwrap();
    assert_clean_error(
        &run(&["inspect", "--model", model]),
        &[
            NAN_TENSOR,
            "holds 1 NaN or infinite values",
            "--allow-nonfinite",
        ],
    );
    let allowed = run(&["inspect", "--model", model, "--allow-nonfinite"]);
    assert!(allowed.status.success(), "{allowed:?}");
}

#[test]
fn an_infinite_weight_is_refused_and_when_allowed_stops_the_evaluation() {
    let dir = copy_model(&common::demo_model());
    poison(dir.path(), NAN_TENSOR, f32::INFINITY);
    let data = common::small_sst2(8);
    let out = eval(dir.path(), data.path(), &[]);
    assert_clean_error(&out, &[NAN_TENSOR, "holds 1 NaN or infinite values"]);
    // Allowed at load, the infinity reaches the logits: no accuracy or loss is reported on them.
    let out = eval(dir.path(), data.path(), &["--allow-nonfinite"]);
    assert_clean_error(&out, &["evaluation: batch 0", "NaN or infinite logits"]);
    assert!(out.stdout.is_empty(), "a result was printed");
}

#[test]
fn huge_layer_norm_weights_reach_the_logits_as_non_finite_in_the_int8_kernel_too() {
    // Before: the int8 kernel clamped the infinite activations into finite codes, and eval
    // reported accuracy 0.5 from finite logits; --execution dequantized reported NaN.
    let model = demo_in_f32();
    let data = common::small_sst2(8);
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    let o = common::run_stage("quantize", model.path(), data.path(), &q, &["--bits", "8"]);
    assert!(
        common::wrote_output(&o),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    fill(
        &q,
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        3e38,
    );
    for execution in ["auto", "kernel", "dequantized"] {
        let out = eval(&q, data.path(), &["--execution", execution]);
        assert_clean_error(&out, &["NaN or infinite logits"]);
    }
}

#[test]
fn a_weight_whose_int8_scale_overflows_fp16_stays_float_with_a_note() {
    // Before: the fp16 scale became infinite, every loss was ln 2, and axcompress refused its
    // own output.
    let model = demo_in_f32();
    poison(model.path(), NAN_TENSOR, 1e7);
    let data = common::small_sst2(8);
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    let o = common::run_stage("quantize", model.path(), data.path(), &q, &["--bits", "8"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(common::wrote_output(&o), "{stderr}");
    let report = common::read_json(&q.join("report.json"));
    let text = report.to_string();
    assert!(text.contains("overflows fp16"), "{text}");
    let out = eval(&q, data.path(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = run(&["inspect", "--model", q.to_str().unwrap(), "--json"]);
    assert!(inspect.status.success());
    let matrices = common::json_stdout(&inspect).to_string();
    assert!(matrices.contains("int8"), "{matrices}");
}

#[test]
fn a_byte_order_mark_is_ignored_in_tsv_config_and_tokenizer_files() {
    let dir = copy_model(&common::demo_model());
    for file in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
    ] {
        let path = dir.path().join(file);
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend(std::fs::read(&path).unwrap());
        std::fs::write(&path, bytes).unwrap();
    }
    let data = tsv(b"\xEF\xBB\xBFsentence\tlabel\r\na gripping film .\t1\r\ndull .\t0\r\n");
    let with_bom = eval(dir.path(), data.path(), &[]);
    assert_eq!(examples(&with_bom), 2);
    let plain = eval(&common::demo_model(), data.path(), &[]);
    let loss = |o: &Output| common::json_stdout(o)["sets"][0]["loss"].clone();
    assert_eq!(loss(&with_bom), loss(&plain));
}

#[test]
fn a_line_that_is_not_utf8_is_an_error_naming_file_and_line() {
    let data = tsv(b"sentence\tlabel\ngood .\t1\nd\xE9j\xE0 vu .\t0\n");
    let out = eval(&common::demo_model(), data.path(), &[]);
    let at = format!("{}:3: byte 2 is not UTF-8", data.path().display());
    assert_clean_error(&out, &[&at]);
}

#[test]
fn a_one_megabyte_line_is_truncated_to_max_length() {
    let long = "a gripping , funny film . ".repeat(40_000);
    assert!(long.len() > 1_000_000);
    let data = tsv(format!("sentence\tlabel\n{long}\t1\nshort .\t0\n").as_bytes());
    let model = common::demo_model();
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole.json"), tmp.path().join("cut.json"));
    let out = eval(
        &model,
        data.path(),
        &["--predictions", whole.to_str().unwrap()],
    );
    assert_eq!(examples(&out), 2);
    // The long line's logits equal those of a 2,000-byte prefix: both are truncated to 128 tokens.
    let head = tsv(format!("sentence\tlabel\n{}\t1\nshort .\t0\n", &long[..2_000]).as_bytes());
    eval(
        &model,
        head.path(),
        &["--predictions", cut.to_str().unwrap()],
    );
    assert_eq!(logits(&whole), logits(&cut));
}

#[test]
fn batch_sizes_of_zero_and_absurd_size_are_refused() {
    let model = common::demo_model();
    let data = common::small_sst2(4);
    let out = eval(&model, data.path(), &["--batch-size", "0"]);
    assert_clean_error(&out, &["--batch-size 0 is out of range", "use 1..=2048"]);
    let out = eval(&model, data.path(), &["--batch-size", "1000000"]);
    assert_clean_error(&out, &["--batch-size 1000000 is out of range"]);
    let out = eval(
        &model,
        data.path(),
        &["--batch-size", "513", "--max-length", "512"],
    );
    assert_clean_error(&out, &["--batch-size 513", "use 1..=512 at max length 512"]);
}

#[test]
fn a_one_example_dataset_evaluates_and_prunes() {
    let model = common::demo_model();
    let data = common::small_sst2(1);
    assert_eq!(examples(&eval(&model, data.path(), &[])), 1);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let args = ["--levels", "blocks", "--budget", "2"];
    let report = common::json_stdout(&common::run_stage(
        "prune",
        &model,
        data.path(),
        &out,
        &args,
    ));
    // A prune decides on perturbed train sentences by default: the one train sentence, with all
    // of dev (one sentence) left to report on.
    let data_report = &report["data"];
    assert_eq!(data_report["selection"]["examples"], 1, "{report}");
    assert_eq!(
        data_report["selection"]["source"], "train-perturbed",
        "{report}"
    );
    assert_eq!(data_report["report"]["examples"], 1, "{report}");
    assert!(out.join("model.safetensors").is_file());
}

/// Starts `axcompress args…` with its output piped.
fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_axcompress"))
        .args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("GLUE_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (polling every millisecond, at most 10 minutes) until `ready` holds; false when the
/// child ended first.
fn wait_until(child: &mut Child, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return ready();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("timed out");
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Names in `dir` that start with `.<name>.` (what a writer of `<name>` keeps beside it).
fn leftovers(dir: &Path, name: &str) -> Vec<String> {
    let prefix = format!(".{name}.");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Checks that `out` is absent, or a complete model directory that loads.
fn absent_or_complete(out: &Path) {
    if !out.exists() {
        return;
    }
    for file in [
        "config.json",
        "model.safetensors",
        "report.json",
        "tokenizer.json",
    ] {
        assert!(out.join(file).is_file(), "{} lacks {file}", out.display());
    }
    axcompress::model::Model::from_dir(out).expect("the written model loads");
}

#[test]
fn kill_9_during_export_leaves_the_destination_absent_or_complete() {
    let model = common::demo_model();
    let data = common::small_sst2(16);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let (m, d, o) = (
        model.to_str().unwrap(),
        data.path().to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args = [
        "quantize", "--model", m, "--task", "sst2", "--data", d, "--out", o, "--bits", "8",
        "--force", "-q",
    ];
    let temporary = |pid: u32| tmp.path().join(format!(".q.tmp-{pid}"));
    // Killed: as soon as the temporary directory exists, once its weights file has bytes, and
    // once the weights are being replaced on a second run over a complete destination.
    let moments: [&dyn Fn(u32) -> bool; 3] = [
        &|pid| temporary(pid).is_dir(),
        &|pid| {
            std::fs::metadata(temporary(pid).join("model.safetensors")).is_ok_and(|m| m.len() > 0)
        },
        &|pid| temporary(pid).join("config.json").exists(),
    ];
    let mut killed_mid_export = 0;
    let mut landed_after_the_clean_run = false;
    for (i, moment) in moments.iter().enumerate() {
        if i == 2 {
            assert!(run(&args).status.success());
        }
        // The last moment is a short window (the temporary complete, not yet renamed) that a
        // fast run on a busy machine can slip through: it gets a few tries.
        let tries = if i == 2 { 5 } else { 1 };
        for _ in 0..tries {
            let mut child = spawn(&args);
            let pid = child.id();
            let reached = wait_until(&mut child, || moment(pid));
            signal(&child, "-KILL");
            child.wait().unwrap();
            let landed = reached && temporary(pid).exists();
            killed_mid_export += usize::from(landed);
            absent_or_complete(&out);
            if landed {
                landed_after_the_clean_run |= i == 2;
                break;
            }
        }
    }
    assert!(killed_mid_export > 0, "no kill landed during an export");
    // The clean run removed what the first kills left; a kill that landed after it left its own.
    if landed_after_the_clean_run {
        assert!(!leftovers(tmp.path(), "q").is_empty());
    }
    // The next run removes what the killed ones left.
    assert!(run(&args).status.success());
    absent_or_complete(&out);
    assert_eq!(leftovers(tmp.path(), "q"), Vec::<String>::new());
}

#[test]
fn ctrl_c_during_prune_exits_130_naming_the_progress_and_resume_finishes() {
    let model = common::demo_model();
    let data = common::small_sst2(40);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p");
    let progress: PathBuf = tmp.path().join("p.progress.json");
    let (m, d, o) = (
        model.to_str().unwrap(),
        data.path().to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let mut args = vec![
        "prune",
        "--model",
        m,
        "--task",
        "sst2",
        "--data",
        d,
        "--out",
        o,
        "--levels",
        "heads",
        "--budget",
        "3",
        "--max-drop",
        "5",
        "--confidence",
        "0.5",
        "-q",
    ];
    let mut child = spawn(&args);
    assert!(
        wait_until(&mut child, || progress.is_file()),
        "the run ended before saving progress"
    );
    signal(&child, "-INT");
    let ended = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("saved in {}", progress.display())) && stderr.contains("--resume"),
        "{stderr}"
    );
    assert!(!out.exists());
    assert_eq!(leftovers(tmp.path(), "p"), Vec::<String>::new());
    args.push("--resume");
    let resumed = run(&args);
    assert!(common::wrote_output(&resumed), "{resumed:?}");
    absent_or_complete(&out);
    assert!(!progress.exists());
}

#[test]
fn sigterm_during_export_removes_the_temporary_like_ctrl_c() {
    // Before: SIGTERM (how CI runners cancel) killed the process outright and left the hidden
    // temporary directory behind until the next run.
    let model = common::demo_model();
    let data = common::small_sst2(16);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t");
    let (m, d, o) = (
        model.to_str().unwrap(),
        data.path().to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args = [
        "quantize", "--model", m, "--task", "sst2", "--data", d, "--out", o, "--bits", "8", "-q",
    ];
    let temporary = |pid: u32| tmp.path().join(format!(".t.tmp-{pid}"));
    let mut landed = false;
    for _ in 0..5 {
        let mut child = spawn(&args);
        let pid = child.id();
        if !wait_until(&mut child, || temporary(pid).is_dir()) {
            std::fs::remove_dir_all(&out).ok();
            continue;
        }
        signal(&child, "-TERM");
        let ended = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&ended.stderr);
        if ended.status.code() == Some(0) {
            std::fs::remove_dir_all(&out).ok();
            continue;
        }
        assert_eq!(ended.status.code(), Some(130), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        landed = true;
        break;
    }
    assert!(landed, "no SIGTERM landed while the temporary existed");
    assert_eq!(leftovers(tmp.path(), "t"), Vec::<String>::new());
    // The export may have renamed its temporary into place while the handler ran.
    absent_or_complete(&out);
}

#[test]
fn a_closed_stdout_ends_the_process_quietly_like_head_does() {
    let model = common::demo_model();
    let mut child = spawn(&["inspect", "--model", model.to_str().unwrap()]);
    // The reader goes away before the first line is printed, as `inspect | head -0` would.
    drop(child.stdout.take());
    let ended = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(ended.status.signal(), Some(SIGPIPE), "{ended:?}");
}
