//! Interrupted runs: a prune killed with SIGKILL in its second level leaves no output and a
//! progress file; `--resume` replays the recorded decisions (no analysis, no re-evaluation of
//! what was decided) and writes exactly what an uninterrupted run writes.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn as_str(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn prune_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "prune",
        "--model",
        common::demo_model().to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        data.to_str().unwrap(),
        "--mode",
        "size",
        "--on",
        "dev",
        "--max-drop",
        "2",
        "--confidence",
        "0.5",
        "--levels",
        "blocks,heads",
        "--budget",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Decisions recorded in step `step` of the progress file, if it has that step.
fn recorded(progress: &Path, step: usize) -> Option<usize> {
    let text = std::fs::read_to_string(progress).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["steps"].get(step)?["trials"].as_array().map(Vec::len)
}

/// Starts a prune and kills it (SIGKILL) once its second level has decided two candidates.
fn kill_in_second_level(args: &[String], progress: &Path) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_axcompress"))
        .args(args)
        .arg("-q")
        .env_remove("GLUE_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while recorded(progress, 1).is_none_or(|n| n < 2) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be interrupted"
        );
        assert!(started.elapsed() < Duration::from_secs(600), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

#[test]
fn a_killed_run_resumes_to_the_same_model() {
    let data = common::small_sst2(40);
    let tmp = tempfile::tempdir().unwrap();
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));

    let args = prune_args(data.path(), &whole);
    let o = common::run(&as_str(&args));
    // 20 check sentences cannot vouch for 2 points: status 3 writes the output all the same.
    assert!(
        common::wrote_output(&o),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let args = prune_args(data.path(), &resumed);
    let progress = tmp.path().join("resumed.progress.json");
    kill_in_second_level(&args, &progress);
    assert!(!resumed.exists(), "a killed run left an output directory");
    assert!(progress.is_file());

    let o = common::run(&as_str(&args));
    common::assert_clean_error(&o, &["resumed.progress.json", "pass --resume"]);

    let mut resume = args.clone();
    resume.push("--resume".into());
    let o = common::run(&as_str(&resume));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(common::wrote_output(&o), "{log}");
    assert!(
        !log.contains("significance of blocks"),
        "blocks were analysed again: {log}"
    );
    assert!(
        !log.contains("significance of heads"),
        "heads were analysed again: {log}"
    );
    assert!(log.contains("replayed from the progress file"), "{log}");
    assert!(!progress.exists(), "the progress file outlived the run");
    for file in ["model.safetensors", "config.json", "report.json"] {
        assert!(
            std::fs::read(whole.join(file)).unwrap() == std::fs::read(resumed.join(file)).unwrap(),
            "{file} differs between the uninterrupted and the resumed run"
        );
    }
}

/// Sets the first `"layer"` found under `value` to `layer`; true when one was found.
fn set_first_layer(value: &mut serde_json::Value, layer: u64) -> bool {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(l) = map.get_mut("layer") {
                *l = layer.into();
                return true;
            }
            map.values_mut().any(|v| set_first_layer(v, layer))
        }
        serde_json::Value::Array(items) => items.iter_mut().any(|v| set_first_layer(v, layer)),
        _ => false,
    }
}

#[test]
fn a_progress_file_naming_a_layer_the_model_lacks_is_refused_in_one_line() {
    let data = common::small_sst2(40);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("edited");
    let args = prune_args(data.path(), &out);
    let progress = tmp.path().join("edited.progress.json");
    kill_in_second_level(&args, &progress);
    let mut journal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&progress).unwrap()).unwrap();
    assert!(set_first_layer(&mut journal["steps"][1], 99), "{journal}");
    std::fs::write(&progress, journal.to_string()).unwrap();
    let mut resume = args.clone();
    resume.extend(["--resume".into(), "-q".into()]);
    let o = common::run(&as_str(&resume));
    common::assert_clean_error(&o, &["layer 99", "the model has 3", "progress file"]);
    assert!(!out.exists());
}

#[test]
fn a_resume_after_the_data_changed_at_the_same_path_is_refused() {
    // Before: the key named the data's path only, so rankings computed on the old dev.tsv were
    // replayed on the new one.
    let data = common::small_sst2(40);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("changed");
    let args = prune_args(data.path(), &out);
    let progress = tmp.path().join("changed.progress.json");
    kill_in_second_level(&args, &progress);
    let dev = data.path().join("SST-2/dev.tsv");
    let text = std::fs::read_to_string(&dev).unwrap();
    let flipped = match text.trim_end().strip_suffix('1') {
        Some(head) => format!("{head}0\n"),
        None => format!("{}1\n", text.trim_end().strip_suffix('0').unwrap()),
    };
    std::fs::write(&dev, flipped).unwrap();
    let mut resume = args.clone();
    resume.extend(["--resume".into(), "-q".into()]);
    let o = common::run(&as_str(&resume));
    common::assert_clean_error(&o, &["changed.progress.json", "another run", "data"]);
    assert!(!out.exists());
    assert!(
        progress.is_file(),
        "the refused resume removed the progress file"
    );
}
