//! Block-structured pruning end to end on the demo model with a little data: the lasso lowers the group
//! norms, the hard prune removes the asked share of every matrix, the stripes run equal to the
//! masked dense model, the stored file shrinks, and the exported model reloads equal to itself;
//! gradual rounds reach the ratio in steps; the surgeon prunes with less output error.

mod common;

use std::path::Path;

use serde_json::Value;

/// One bsp run on the first `rows` SST-2 sentences: its temporary directories and report.
struct Run {
    _tmp: tempfile::TempDir,
    data: tempfile::TempDir,
    out: std::path::PathBuf,
    report: Value,
}

/// Runs `compress` with one bsp stage of `settings` on `rows` sentences of SST-2's train and dev.
fn run_bsp(rows: usize, settings: &str) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bsp");
    let data = common::small_sst2(rows);
    let report = bsp(data.path(), &out, settings);
    Run {
        _tmp: tmp,
        data,
        out,
        report,
    }
}

/// Runs `compress` with one bsp stage of `settings` on the SST-2 data at `data`.
fn bsp(data: &Path, out: &Path, settings: &str) -> Value {
    let config = out.with_extension("toml");
    let text = format!(
        "model = \"{}\"\ntask = \"sst2\"\ndata = \"{}\"\n\n[[stages]]\npass = \"bsp\"\n{settings}\n",
        common::demo_model().display(),
        data.display()
    );
    std::fs::write(&config, text).unwrap();
    common::compress_json(&config, out, &[])
}

#[test]
fn bsp_prunes_the_asked_share_stores_stripes_and_reloads_equal() {
    let settings = "ratio = 0.875\nlambda = 0.1\n[stages.lasso]\nepochs = 3\nlearning_rate = 1e-3\nevaluations = 1\n[stages.retrain]\nevaluations = 2";
    let run = run_bsp(64, settings);
    let (report, out, data) = (&run.report, &run.out, &run.data);
    let stage = &report["stages"][0];
    let d = &stage["details"];

    // The lasso drives the group norms down.
    let mean = |i: usize| d["group_norms"][i]["mean"].as_f64().unwrap();
    assert!(mean(1) < 0.97 * mean(0), "lasso: {} → {}", mean(0), mean(1));

    // Seven of every eight groups removed in each matrix: 8× fewer weights.
    assert_eq!(d["compression"].as_f64().unwrap(), 8.0, "{d}");
    let storage = d["storage"].as_array().unwrap();
    assert_eq!(
        storage.len(),
        12,
        "four matrices in the demo model's three layers"
    );
    assert!(storage.iter().all(|m| m["density"] == 0.125), "{d}");
    // Stripes narrower than the kernel's minimum run dense (the demo model's 256-wide inputs cut
    // into 8 stripes); the FFN output's 768 inputs run as stripes.
    let runs =
        |name: &str| storage.iter().find(|m| m["name"] == name).unwrap()["execution"].clone();
    assert_eq!(runs("layer.0.ffn.output.weight"), "stripes", "{d}");

    // The stripes compute what the masked dense model computed.
    let kept = &d["retraining_kept"]["selection"];
    let after = &stage["selection_after"];
    assert_eq!(kept["metric"], after["metric"]);
    let gap = (kept["loss"].as_f64().unwrap() - after["loss"].as_f64().unwrap()).abs();
    assert!(gap < 1e-4, "masked {kept} vs stripes {after}");

    // The file shrinks by about the removed weights (f16, as the demo model is stored), and the
    // reload equals the run.
    let size = |dir: &Path| {
        std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len()
    };
    let removed = d["removed_weights"].as_u64().unwrap();
    let original = size(&common::demo_model());
    assert!(
        size(out) < original - removed * 2 * 9 / 10,
        "{} vs {original}",
        size(out)
    );
    let config = common::read_json(&out.join("config.json"));
    assert_eq!(
        config["axcompress"]["block_sparse"]["format"],
        "column-stripes"
    );
    assert!(out.join("bsp-group-norms.svg").is_file());
    let eval = &common::eval_json(out, "sst2", data.path())["sets"][0];
    let dev = report["evaluation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["split"] == "dev")
        .unwrap()["after"]
        .clone();
    let loss = |v: &Value| v["loss"].as_f64().unwrap();
    assert!(
        (loss(eval) - loss(&dev)).abs() < 1e-5,
        "reloaded {eval} vs run {dev}"
    );
    assert_eq!(eval["metrics"]["accuracy"], dev["metrics"]["accuracy"]);
}

#[test]
fn gradual_rounds_reach_the_ratio_of_equal_width_stripes_in_steps() {
    let settings = "grouping = { stripe-width = 16 }\nratio = 0.5\nthreshold = \"global\"\nprune_rounds = 2\n[stages.lasso]\nevaluations = 1\n[stages.retrain]\nevaluations = 1";
    let report = run_bsp(32, settings).report;
    let d = &report["stages"][0]["details"];
    // Equal-size groups: half the groups is half the weights, whatever the matrix shapes.
    assert_eq!(d["compression"].as_f64().unwrap(), 2.0, "{d}");
    let rounds = d["rounds"].as_array().unwrap();
    let ratio = |i: usize| rounds[i]["ratio"].as_f64().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(
        (ratio(0) - 0.4375).abs() < 1e-12 && ratio(1) == 0.5,
        "{rounds:?}"
    );
}

#[test]
fn whole_rows_slice_ffn_neurons_and_compute_what_the_masked_model_did() {
    let settings = "grouping = \"rows\"\nmatrices = [\"ffn-in\"]\nratio = 0.5\n[stages.lasso]\nevaluations = 1\n[stages.retrain]\nevaluations = 1";
    let run = run_bsp(32, settings);
    let stage = &run.report["stages"][0];
    let d = &stage["details"];
    // Half of each layer's 768 FFN input rows are zero: those neurons are cut out.
    assert_eq!(d["ffn_neurons_sliced"], 3 * 384, "{d}");
    let config = common::read_json(&run.out.join("config.json"));
    // Every layer keeps 384 neurons: a uniform shape, written as the standard field.
    assert_eq!(config["intermediate_size"], 384, "{config}");
    // Their constant outputs (GELU of the bias) moved into the output bias: the sliced model
    // computes what the masked one did.
    let kept = &d["retraining_kept"]["selection"];
    let after = &stage["selection_after"];
    let gap = (kept["loss"].as_f64().unwrap() - after["loss"].as_f64().unwrap()).abs();
    assert!(gap < 1e-4, "masked {kept} vs sliced {after}");
}

#[test]
fn the_surgeon_removes_the_same_share_with_less_output_error_than_magnitude() {
    let settings = "grouping = { stripe-width = 16 }\nratio = 0.5\nthreshold = \"global\"\nlambda = 0.0\nhard_prune = \"obs\"\ncalibration = 32\n[stages.retrain]\nevaluations = 1";
    let run = run_bsp(32, settings);
    let stage = &run.report["stages"][0];
    let d = &stage["details"];
    // λ = 0: no lasso phase.
    assert_eq!(d["lasso_evaluations"].as_array().unwrap().len(), 0, "{d}");
    // Each matrix loses the magnitude rule's share (up to rounding per block of columns).
    let compression = d["compression"].as_f64().unwrap();
    assert!((compression - 2.0).abs() < 0.02, "{compression}");
    // On the calibration inputs, every matrix's outputs move less than with the magnitude
    // rule's groups removed and no correction.
    let fits = d["rounds"][0]["surgeon"].as_array().unwrap();
    assert_eq!(
        fits.len(),
        12,
        "four matrices in the demo model's three layers"
    );
    for fit in fits {
        let (error, magnitude) = (
            fit["error"].as_f64().unwrap(),
            fit["magnitude_error"].as_f64().unwrap(),
        );
        assert!(error > 0.0 && error < magnitude, "{fit}");
    }
    // The stored stripes compute what the masked model computed.
    let kept = &d["retraining_kept"]["selection"];
    let after = &stage["selection_after"];
    let gap = (kept["loss"].as_f64().unwrap() - after["loss"].as_f64().unwrap()).abs();
    assert!(gap < 1e-4, "masked {kept} vs stripes {after}");
}
