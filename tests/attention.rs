//! Approximate attention: with every key kept it is dense attention; the gathered kernel equals
//! the masked reference inside real models; the mode survives export and reload; the pass
//! switches layers by the selection data and records them.

mod common;

use axcompress::export::write_model_dir;
use axcompress::kernels::attention_mode::{ApproxAttention, Keep, KeySelector};
use axcompress::kernels::Ops;
use axcompress::model::encoder::Queries;
use axcompress::model::encoder::RunOptions;
use axcompress::model::inputs::Inputs;
use axcompress::model::Model;
use common::{max_abs_diff, read_json, reference_inputs};
use serde_json::json;

const METHODS: [KeySelector; 2] = [KeySelector::SignMatch, KeySelector::HardTopk];

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// `model` with every attention layer run as `mode` (a per-layer mode with `per_layer`).
fn approximated(model: &Model, per_layer: impl Fn(usize) -> ApproxAttention) -> Model {
    let mut out = model.clone();
    for l in 0..model.num_layers() {
        out = out.with_attention_mode(l, Some(per_layer(l))).unwrap();
    }
    out
}

/// Final hidden states and logits (first-position fast path) of `model`.
fn outputs(model: &Model, inputs: &Inputs, ops: Ops) -> (Vec<f32>, Vec<f32>) {
    let opts = RunOptions { gates: None, ops };
    let hidden = values(&model.encode(inputs, opts).unwrap());
    (hidden, values(&model.forward(inputs, opts).unwrap()))
}

fn assert_all_keys_equal_dense(model: &Model, inputs: &Inputs, name: &str) {
    let (hidden, logits) = outputs(model, inputs, Ops::Inference);
    for method in METHODS {
        for k in [Keep::Count(100_000), Keep::Fraction(1.0)] {
            let approx = approximated(model, |_| ApproxAttention { method, k });
            for ops in [Ops::Inference, Ops::Differentiable] {
                let (h, l) = outputs(&approx, inputs, ops);
                let (dh, dl) = (max_abs_diff(&h, &hidden), max_abs_diff(&l, &logits));
                // Logits within 1e-5; hidden states (up to ~10 in size) within 1e-5 relative.
                let scale = hidden.iter().fold(1f32, |m, x| m.max(x.abs()));
                assert!(
                    dh <= 1e-5 * scale && dl <= 1e-5,
                    "{name} {method:?} k={k} {ops:?}: hidden {dh}, logits {dl}"
                );
            }
        }
    }
}

#[test]
fn every_key_kept_equals_dense_attention_on_the_tiny_fixtures() {
    for name in ["tiny-bert", "tiny-roberta", "tiny-distilbert"] {
        let dir = common::tiny(name);
        let model = Model::from_dir(&dir).unwrap();
        let inputs = reference_inputs(&model, &read_json(&dir.join("reference.json")));
        assert_all_keys_equal_dense(&model, &inputs, name);
    }
}

#[test]
fn every_key_kept_equals_dense_attention_on_the_demo_model() {
    let model = Model::from_dir(&common::demo_model()).unwrap();
    let inputs = common::sst2_dev_inputs(&model, 48);
    assert_all_keys_equal_dense(&model, &inputs, "demo");
}

#[test]
fn gathered_equals_the_masked_reference_in_the_demo_model_for_varied_k() {
    let model = Model::from_dir(&common::demo_model()).unwrap();
    let inputs = common::sst2_dev_inputs(&model, 48);
    let grid = [
        Keep::Count(1),
        Keep::Fraction(0.3),
        Keep::Count(5),
        Keep::Fraction(0.125),
        Keep::Count(2),
        Keep::Fraction(0.6),
    ];
    let fast = RunOptions::default();
    for method in METHODS {
        let approx = approximated(&model, |l| ApproxAttention { method, k: grid[l] });
        // On the real states entering each layer: the fast path runs the gathered kernel, the
        // differentiable path the masked reference. (Across layers the two paths may pick other
        // keys where a score or sign is within rounding of a tie, so compare layer by layer.)
        let mut h = approx.embed(&inputs, Ops::Inference).unwrap();
        for (l, layer) in approx.layers.iter().enumerate() {
            let att = layer.attention.as_ref().unwrap();
            for queries in [Queries::All, Queries::First] {
                let context =
                    |ops| values(&att.context(&h, &inputs.mask_bias, ops, queries).unwrap());
                let diff = max_abs_diff(&context(Ops::Inference), &context(Ops::Differentiable));
                assert!(diff <= 1e-5, "{method:?} layer {l} {queries:?}: {diff}");
            }
            h = approx.run_layers(&h, &inputs, l..l + 1, fast).unwrap();
        }
        // The first-position-only last layer gives what the full encoder gives there.
        let full = values(
            &approx
                .classify(&approx.encode(&inputs, fast).unwrap())
                .unwrap(),
        );
        let (_, approx_logits) = outputs(&approx, &inputs, Ops::Inference);
        let first_only = max_abs_diff(&full, &approx_logits);
        assert!(
            first_only <= 1e-5,
            "{method:?}: first-position path {first_only}"
        );
        // And the approximation is not dense attention in disguise.
        let (_, dense_logits) = outputs(&model, &inputs, Ops::Inference);
        assert!(
            max_abs_diff(&approx_logits, &dense_logits) > 1e-3,
            "{method:?}"
        );
    }
}

#[test]
fn the_mode_survives_export_and_reload_and_is_not_stock_compatible() {
    let dir = common::tiny("tiny-roberta");
    let model = Model::from_dir(&dir).unwrap();
    let inputs = reference_inputs(&model, &read_json(&dir.join("reference.json")));
    let sign = ApproxAttention {
        method: KeySelector::SignMatch,
        k: Keep::Count(2),
    };
    let approx = model.with_attention_mode(0, Some(sign)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("approx");
    let compat = write_model_dir(&approx, &out, &[], &json!({}), false).unwrap();
    assert!(!compat.hf_compatible);
    assert!(compat.reason.unwrap().contains("0 (sign-match k=2)"));
    let reloaded = Model::from_dir(&out).unwrap();
    assert_eq!(reloaded.config.structure, approx.config.structure);
    assert_eq!(
        outputs(&reloaded, &inputs, Ops::Inference),
        outputs(&approx, &inputs, Ops::Inference)
    );
    let config = read_json(&out.join("config.json"));
    let layer0 = &config["axcompress"]["structure"]["layers"][0];
    assert_eq!(
        layer0["attention_mode"],
        json!({"method": "sign-match", "k": 2})
    );

    let inspected = common::json_stdout(&common::run(&[
        "inspect",
        "--model",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(
        inspected["layers"][0]["attention_mode"]["method"],
        "sign-match"
    );
    assert_eq!(inspected["layers"][1]["attention_mode"], json!(null));
    assert_eq!(inspected["hf_compatible"], false);
}

#[test]
fn the_pass_switches_layers_the_selection_allows_and_eval_runs_them() {
    let data = common::small_sst2(120);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hard");
    let model = common::demo_model();
    let extra = [
        "--method",
        "hard-topk",
        "--mode",
        "speed",
        "--max-drop",
        "5",
        // The point estimate: the guard is tested in tests/prune.rs on a larger selection.
        "--confidence",
        "0.5",
    ];
    // 60 check sentences may not vouch for 5 points: status 3 writes the output all the same.
    let report = common::json_report(&common::run_stage(
        "attention",
        &model,
        data.path(),
        &out,
        &extra,
    ));
    let details = &report["stages"][0]["details"];
    assert_eq!(details["significance"].as_array().unwrap().len(), 3);
    let switched = details["switched"].as_array().unwrap();
    assert!(!switched.is_empty(), "{details}");
    // Per layer, K is tried smallest first and the search stops at the first accepted one.
    assert_eq!(details["grid"], json!([0.125, 0.25, 0.5]));
    let trials = details["trials"].as_array().unwrap();
    for l in 0..3 {
        let mine: Vec<_> = trials
            .iter()
            .filter(|t| t["label"].as_str().unwrap().starts_with(&format!("L{l} ")))
            .collect();
        assert!(!mine.is_empty() && mine.len() <= 3, "layer {l}: {mine:?}");
        let accepted = mine.iter().position(|t| t["accepted"] == true);
        assert!(
            accepted.is_none_or(|i| i == mine.len() - 1),
            "layer {l}: {mine:?}"
        );
        assert!(mine[0]["label"].as_str().unwrap().ends_with("k=0.125"));
    }

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["axcompress"]["hf_compatible"], false);
    let layers = &config["axcompress"]["structure"]["layers"];
    for s in switched {
        let layer = s["layer"].as_u64().unwrap() as usize;
        assert_eq!(layers[layer]["attention_mode"]["method"], "hard-topk");
        assert_eq!(layers[layer]["attention_mode"]["k"], s["k"]);
    }
    let evaluated = common::eval_json(&out, "sst2", data.path());
    assert_eq!(evaluated["metrics"], common::dev_after(&report));

    // Size and speed modes need a tolerance.
    let no_drop = common::run_stage(
        "attention",
        &model,
        data.path(),
        &tmp.path().join("x"),
        &["--method", "sign-match", "--mode", "size"],
    );
    common::assert_clean_error(&no_drop, &["--max-drop"]);
    let bad_k = common::run_stage(
        "attention",
        &model,
        data.path(),
        &tmp.path().join("y"),
        &["--method", "sign-match", "--k", "1.5"],
    );
    assert!(!bad_k.status.success());
    assert!(String::from_utf8_lossy(&bad_k.stderr).contains("fraction in (0, 1]"));
}
