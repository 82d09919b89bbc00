//! Gating elements to zero must compute exactly what slicing them out physically computes.

mod common;

use axcompress::kernels::Ops;
use axcompress::model::encoder::RunOptions;
use axcompress::model::inputs::Inputs;
use axcompress::model::slice::LayerKeep;
use axcompress::model::Model;
use candle_core::Tensor;
use common::{max_abs_diff, read_json, reference_inputs};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Asserts gated == sliced on hidden states and logits; returns the sliced model.
fn assert_gated_equals_sliced(model: &Model, keep: &[LayerKeep], inputs: &Inputs) -> Model {
    let gates = model.gates_for(keep).unwrap();
    let sliced = model.slice(keep).unwrap();
    for ops in [Ops::Inference, Ops::Differentiable] {
        let gated_opts = RunOptions {
            gates: Some(&gates),
            ops,
        };
        let plain = RunOptions { gates: None, ops };
        let g = model.encode(inputs, gated_opts).unwrap();
        let s = sliced.encode(inputs, plain).unwrap();
        let hidden_diff = max_abs_diff(&values(&g), &values(&s));
        assert!(
            hidden_diff <= 1e-5,
            "hidden states differ by {hidden_diff} ({ops:?})"
        );
        let logit_diff = max_abs_diff(
            &values(&model.classify(&g).unwrap()),
            &values(&sliced.classify(&s).unwrap()),
        );
        assert!(logit_diff <= 1e-5, "logits differ by {logit_diff}");
    }
    sliced
}

/// A plan that varies per layer: different head subsets and FFN neuron subsets, a layer with no
/// heads at all, removed blocks, and (for 3+ layers) a removed layer.
fn varied_plan(model: &Model, seed: usize) -> Vec<LayerKeep> {
    let n = model.num_layers();
    model
        .keep_all()
        .into_iter()
        .enumerate()
        .map(|(l, k)| {
            let pick = |len: usize, modulus: usize| -> Vec<usize> {
                (0..len)
                    .filter(|i| !(i * 7 + l + seed).is_multiple_of(modulus))
                    .collect()
            };
            let heads = k.heads.map(|h| {
                let pos = pick(h.len(), 2 + l % 3);
                pos.into_iter().map(|p| h[p]).collect::<Vec<_>>()
            });
            let neurons = k.neurons.map(|f| pick(f.len(), 3 + l % 2));
            match (l + seed) % 5 {
                1 => LayerKeep {
                    heads: heads.map(|_| vec![]),
                    neurons,
                },
                2 => LayerKeep {
                    heads,
                    neurons: None,
                },
                3 if n >= 3 => LayerKeep {
                    heads: None,
                    neurons: None,
                },
                4 => LayerKeep {
                    heads: None,
                    neurons,
                },
                _ => LayerKeep { heads, neurons },
            }
        })
        .collect()
}

fn check_tiny(name: &str) {
    let dir = common::tiny(name);
    let model = Model::from_dir(&dir).unwrap();
    let inputs = reference_inputs(&model, &read_json(&dir.join("reference.json")));
    for seed in 0..5 {
        let plan = varied_plan(&model, seed);
        let sliced = assert_gated_equals_sliced(&model, &plan, &inputs);
        // Second stage: a model whose layers already differ in heads and FFN widths.
        let plan2 = varied_plan(&sliced, seed + 1);
        assert_gated_equals_sliced(&sliced, &plan2, &inputs);
    }
}

#[test]
fn tiny_bert_gated_equals_sliced() {
    check_tiny("tiny-bert");
}

#[test]
fn tiny_roberta_gated_equals_sliced() {
    check_tiny("tiny-roberta");
}

#[test]
fn tiny_distilbert_gated_equals_sliced() {
    check_tiny("tiny-distilbert");
}

#[test]
fn demo_model_gated_equals_sliced_and_structure_follows() {
    let dir = common::demo_model();
    let model = Model::from_dir(&dir).unwrap();
    let inputs = common::sst2_dev_inputs(&model, 48);
    let plan = varied_plan(&model, 0);
    let sliced = assert_gated_equals_sliced(&model, &plan, &inputs);
    for (shape, keep) in sliced.config.structure.layers.iter().zip(&plan) {
        assert_eq!(shape.heads, keep.heads);
        assert_eq!(shape.ffn_width, keep.neurons.as_ref().map(Vec::len));
    }
    assert!(sliced.parameter_count() < model.parameter_count());
    let plan2 = varied_plan(&sliced, 3);
    assert_gated_equals_sliced(&sliced, &plan2, &inputs);
}

#[test]
fn gating_nothing_changes_nothing() {
    let dir = common::tiny("tiny-bert");
    let model = Model::from_dir(&dir).unwrap();
    let inputs = reference_inputs(&model, &read_json(&dir.join("reference.json")));
    let gates = model.gates_for(&model.keep_all()).unwrap();
    let a = model
        .forward(
            &inputs,
            RunOptions {
                gates: Some(&gates),
                ops: Ops::Inference,
            },
        )
        .unwrap();
    let b = model.forward(&inputs, RunOptions::default()).unwrap();
    // Without gates, attention runs in the fused kernel (its own summation order and exp):
    // equal up to float rounding, not bit for bit.
    for (x, y) in values(&a).iter().zip(values(&b)) {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn prefix_cached_run_equals_full_run() {
    let dir = common::tiny("tiny-bert");
    let model = Model::from_dir(&dir).unwrap();
    let inputs = reference_inputs(&model, &read_json(&dir.join("reference.json")));
    let full = model.encode(&inputs, RunOptions::default()).unwrap();
    let embedded = model.embed(&inputs, Ops::Inference).unwrap();
    let n = model.num_layers();
    for split in 0..=n {
        let prefix = model
            .run_layers(&embedded, &inputs, 0..split, RunOptions::default())
            .unwrap();
        let rest = model
            .run_layers(&prefix, &inputs, split..n, RunOptions::default())
            .unwrap();
        assert_eq!(values(&rest), values(&full), "split at layer {split}");
    }
}

#[test]
fn first_token_fast_path_equals_full_encoder() {
    for name in ["tiny-bert", "tiny-roberta", "tiny-distilbert"] {
        let dir = common::tiny(name);
        let model = Model::from_dir(&dir).unwrap();
        let inputs = reference_inputs(&model, &read_json(&dir.join("reference.json")));
        for seed in 0..3 {
            let plan = varied_plan(&model, seed);
            let gates = model.gates_for(&plan).unwrap();
            let opts = RunOptions {
                gates: Some(&gates),
                ops: Ops::Inference,
            };
            let full = model
                .classify(&model.encode(&inputs, opts).unwrap())
                .unwrap();
            let fast = model.forward(&inputs, opts).unwrap();
            let diff = max_abs_diff(&values(&full), &values(&fast));
            assert!(diff <= 1e-6, "{name}: first-token path differs by {diff}");
        }
    }
}
