//! The output rule, on a tree holding an input model, data, a config and unrelated files: an
//! output never is, holds or sits inside an input; it is a directory or nothing; and `--force`
//! replaces only a directory axcompress wrote (or an empty one). Every refusal is one line and
//! leaves every file byte for byte as it was.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

/// `root/P/model` (the demo model), `root/P/unrelated.txt`, `root/d/SST-2` (40 sentences),
/// `root/cfg/c.toml` (a quantize config naming them), `root/f.txt`, `root/other/notes.txt`.
fn tree() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("P/model")).unwrap();
    for entry in std::fs::read_dir(common::demo_model()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, r.join("P/model").join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(r.join("P/unrelated.txt"), "keep me").unwrap();
    let data = common::small_sst2(40);
    std::fs::create_dir_all(r.join("d/SST-2")).unwrap();
    for split in ["train.tsv", "dev.tsv"] {
        std::fs::copy(
            data.path().join("SST-2").join(split),
            r.join("d/SST-2").join(split),
        )
        .unwrap();
    }
    std::fs::create_dir_all(r.join("cfg")).unwrap();
    let config = "model = \"../P/model\"\ndata = \"../d/SST-2\"\ntask = \"sst2\"\n\n[[stages]]\npass = \"quantize\"\n";
    std::fs::write(r.join("cfg/c.toml"), config).unwrap();
    std::fs::write(r.join("f.txt"), "a file").unwrap();
    std::fs::create_dir_all(r.join("other")).unwrap();
    std::fs::write(r.join("other/notes.txt"), "not ours").unwrap();
    root
}

/// Every file under `root` with its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path.strip_prefix(root).unwrap().to_path_buf(), bytes);
            }
        }
    }
    files
}

/// `quantize --bits 8` of the tree's model on its data into `out` (relative to the tree).
fn quantize(root: &Path, out: &str, force: bool) -> Output {
    let (model, data) = (root.join("P/model"), root.join("d/SST-2"));
    let extra: &[&str] = if force {
        &["--bits", "8", "--force"]
    } else {
        &["--bits", "8"]
    };
    common::run_stage("quantize", &model, &data, &root.join(out), extra)
}

#[test]
fn an_output_that_is_holds_or_sits_in_an_input_or_is_not_ours_is_refused_and_nothing_changes() {
    let root = tree();
    let r = root.path();
    // An earlier output of ours, to be replaced only with --force.
    assert!(common::wrote_output(&quantize(r, "ours", false)));
    let before = snapshot(r);
    let cases: [(&str, bool, &str); 7] = [
        ("P", true, "holds the input"),
        ("P/model/sub", false, "is inside the input"),
        ("d", true, "holds the input"),
        ("f.txt", true, "is not a directory"),
        ("other", true, "not a directory axcompress wrote"),
        ("ours", false, "already exists; pass --force"),
        (".", true, "holds the input"),
    ];
    for (out, force, needle) in cases {
        let run = quantize(r, out, force);
        common::assert_clean_error(&run, &[needle]);
        assert_eq!(snapshot(r), before, "--out {out} changed files");
    }
    // The config file is an input too: its own directory is refused.
    let config = r.join("cfg/c.toml");
    let run = common::run(&[
        "compress",
        "--config",
        config.to_str().unwrap(),
        "--out",
        r.join("cfg").to_str().unwrap(),
        "--force",
        "-q",
    ]);
    common::assert_clean_error(&run, &["holds the input", "c.toml"]);
    assert_eq!(snapshot(r), before);
}

#[test]
fn force_replaces_an_output_of_ours_and_an_empty_directory_takes_one_without_it() {
    let root = tree();
    let r = root.path();
    assert!(common::wrote_output(&quantize(r, "ours", false)));
    std::fs::write(r.join("ours/stale.txt"), "from before").unwrap();
    let inputs = |s: &BTreeMap<PathBuf, Vec<u8>>| -> BTreeMap<PathBuf, Vec<u8>> {
        s.iter()
            .filter(|(p, _)| !p.starts_with("ours") && !p.starts_with("empty"))
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect()
    };
    let before = inputs(&snapshot(r));
    assert!(common::wrote_output(&quantize(r, "ours", true)));
    assert!(
        !r.join("ours/stale.txt").exists(),
        "the old output is replaced whole"
    );
    assert!(r.join("ours/model.safetensors").is_file());
    std::fs::create_dir(r.join("empty")).unwrap();
    assert!(common::wrote_output(&quantize(r, "empty", false)));
    assert!(r.join("empty/config.json").is_file());
    assert_eq!(
        inputs(&snapshot(r)),
        before,
        "no input or unrelated file changed"
    );
}

#[test]
fn single_file_outputs_never_overwrite_an_input_and_replace_a_file_only_with_force() {
    let root = tree();
    let r = root.path();
    let (model, data) = (r.join("P/model"), r.join("d/SST-2"));
    let eval = |predictions: &Path, force: bool| {
        let file = predictions.to_str().unwrap();
        let extra: &[&str] = match force {
            true => &["--predictions", file, "--force"],
            false => &["--predictions", file],
        };
        common::eval(&model, &data, extra)
    };
    let before = snapshot(r);
    for (path, force, needle) in [
        (model.join("config.json"), true, "is inside the input"),
        (data.join("dev.tsv"), true, "is inside the input"),
        (r.join("other"), true, "not a regular file"),
        (r.join("f.txt"), false, "already exists; pass --force"),
    ] {
        common::assert_clean_error(&eval(&path, force), &["--predictions", needle]);
        assert_eq!(snapshot(r), before, "--predictions {}", path.display());
    }
    let report = model.join("model.safetensors");
    let analyze = common::run_stage("analyze", &model, &data, &report, &["--force"]);
    common::assert_clean_error(&analyze, &["--out", "is inside the input"]);
    assert_eq!(snapshot(r), before);
    // A file of one's own is replaced with --force.
    let predictions = r.join("p.json");
    assert!(eval(&predictions, false).status.success());
    common::assert_clean_error(&eval(&predictions, false), &["already exists"]);
    let replaced = eval(&predictions, true);
    assert!(
        replaced.status.success(),
        "{}",
        String::from_utf8_lossy(&replaced.stderr)
    );
}

#[test]
fn plots_and_a_vocabulary_corpus_file_obey_the_rule_too() {
    let root = tree();
    let r = root.path();
    let (model, data) = (r.join("P/model"), r.join("d/SST-2"));
    let before = snapshot(r);
    // Heatmaps into the model directory: refused before any analysis.
    let plots = model.to_str().unwrap();
    let report = r.join("a.json");
    let analyze = common::run_stage(
        "analyze",
        &model,
        &data,
        &report,
        &["--plots", plots, "--levels", "blocks", "--force"],
    );
    common::assert_clean_error(
        &analyze,
        &["--plots", "significance-blocks.svg", "is inside the input"],
    );
    // An existing heatmap of someone else's is replaced only with --force.
    std::fs::write(r.join("other/significance-blocks.svg"), "mine").unwrap();
    let other = r.join("other");
    let analyze = common::run_stage(
        "analyze",
        &model,
        &data,
        &report,
        &["--plots", other.to_str().unwrap(), "--levels", "blocks"],
    );
    common::assert_clean_error(&analyze, &["--plots", "already exists; pass --force"]);
    std::fs::remove_file(r.join("other/significance-blocks.svg")).unwrap();
    assert_eq!(snapshot(r), before);
    // A corpus file is an input: an output directory holding it is refused.
    std::fs::write(r.join("other/corpus.txt"), "a fine film\n").unwrap();
    let before = snapshot(r);
    let corpus = r.join("other/corpus.txt");
    let run = common::run_stage(
        "quantize",
        &model,
        &data,
        &other,
        &[
            "--bits",
            "8",
            "--vocab-corpus",
            corpus.to_str().unwrap(),
            "--force",
        ],
    );
    common::assert_clean_error(&run, &["holds the input", "corpus.txt"]);
    assert_eq!(snapshot(r), before);
}

#[test]
fn a_recovery_teacher_directory_is_an_input_of_the_rule() {
    let root = tree();
    let r = root.path();
    std::fs::create_dir_all(r.join("T")).unwrap();
    for entry in std::fs::read_dir(r.join("P/model")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, r.join("T").join(path.file_name().unwrap())).unwrap();
    }
    let config = "model = \"../P/model\"\ndata = \"../d/SST-2\"\ntask = \"sst2\"\n\n[[stages]]\npass = \"recover\"\nteacher = \"../T\"\n";
    // Relative paths in a config are taken from the config's directory; the teacher is not
    // (it is a model spec like --model), so name it absolutely.
    let config = config.replace("\"../T\"", &format!("{:?}", r.join("T")));
    std::fs::write(r.join("cfg/t.toml"), config).unwrap();
    let before = snapshot(r);
    let run = common::run(&[
        "compress",
        "--config",
        r.join("cfg/t.toml").to_str().unwrap(),
        "--out",
        r.join("T/sub").to_str().unwrap(),
        "-q",
    ]);
    common::assert_clean_error(&run, &["is inside the input", "/T"]);
    assert_eq!(snapshot(r), before);
}
