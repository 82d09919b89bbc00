//! Our forward pass against transformers' reference outputs in ../shared/models.

mod common;

use axcompress::kernels::Ops;
use axcompress::model::encoder::RunOptions;
use axcompress::model::Model;
use axcompress::text::tokenizer::TextEncoder;
use common::{flatten, max_abs_diff, read_json, reference_inputs};

fn check_tiny(name: &str) {
    let dir = common::tiny(name);
    let reference = read_json(&dir.join("reference.json"));
    let model = Model::from_dir(&dir).unwrap();
    let inputs = reference_inputs(&model, &reference);
    for ops in [Ops::Inference, Ops::Differentiable] {
        let opts = RunOptions { gates: None, ops };
        let hidden = model.encode(&inputs, opts).unwrap();
        let hidden_diff = max_abs_diff(
            &hidden.flatten_all().unwrap().to_vec1().unwrap(),
            &flatten(&reference["last_hidden_state"]),
        );
        assert!(
            hidden_diff <= 1e-5,
            "{name}: last_hidden_state differs by {hidden_diff}"
        );
        let logits: Vec<f32> = model
            .classify(&hidden)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = flatten(&reference["logits"]);
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rel = max_abs_diff(&logits, &expected) / scale;
        assert!(rel <= 1e-4, "{name}: logits differ by {rel} relative");
    }
}

#[test]
fn tiny_bert_matches_transformers() {
    check_tiny("tiny-bert");
}

#[test]
fn tiny_bert_from_pytorch_bin_matches_transformers() {
    check_tiny("tiny-bert-bin");
}

/// Asymmetric compressed-tensors checkpoints (zero points) written by compressed-tensors itself.
#[test]
fn tiny_bert_with_zero_points_matches_transformers() {
    check_tiny("tiny-bert-int8-asym");
    check_tiny("tiny-bert-int4-asym");
}

#[test]
fn tiny_roberta_matches_transformers() {
    check_tiny("tiny-roberta");
}

#[test]
fn tiny_distilbert_matches_transformers() {
    check_tiny("tiny-distilbert");
}

fn dev_sentences() -> Vec<(String, Option<String>)> {
    let text = std::fs::read_to_string(common::demo_sst2().join("dev.tsv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| (l.split('\t').next().unwrap().to_string(), None))
        .collect()
}

#[test]
#[cfg_attr(
    fixtures_missing,
    ignore = "needs ../shared (AXCOMPRESS_FIXTURES): MiniLM SST-2 and transformers' token ids"
)]
fn minilm_tokenizer_reproduces_reference_ids() {
    let shared = fixtures_or_skip!();
    let dir = shared.join("models/minilm-l6-sst2");
    let reference = read_json(&dir.join("reference.json"));
    let encoder = TextEncoder::load(&dir, 64).unwrap();
    let seqs = encoder.encode(&dev_sentences()[..32]).unwrap();
    let expected = reference["input_ids_first32"].as_array().unwrap();
    assert_eq!(seqs.len(), expected.len());
    for (i, (s, e)) in seqs.iter().zip(expected).enumerate() {
        let e: Vec<u32> = e
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(s.ids, e, "sentence {i}");
    }
}

#[test]
fn vocab_txt_tokenizer_equals_tokenizer_json() {
    let src = common::demo_model();
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let sentences = dev_sentences();
    let from_json = TextEncoder::load(&src, 64)
        .unwrap()
        .encode(&sentences)
        .unwrap();
    let from_vocab = TextEncoder::load(dir.path(), 64)
        .unwrap()
        .encode(&sentences)
        .unwrap();
    assert_eq!(from_json, from_vocab);
}

#[test]
#[cfg_attr(
    fixtures_missing,
    ignore = "needs ../shared (AXCOMPRESS_FIXTURES): MiniLM SST-2 and transformers' logits"
)]
fn minilm_eval_reproduces_every_reference_prediction() {
    let shared = fixtures_or_skip!();
    let model = shared.join("models/minilm-l6-sst2");
    let reference = read_json(&model.join("reference.json"));
    let out_dir = tempfile::tempdir().unwrap();
    let predictions = out_dir.path().join("predictions.json");
    let out = common::run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        common::demo_sst2().to_str().unwrap(),
        "--max-length",
        "64",
        "--predictions",
        predictions.to_str().unwrap(),
        "--json",
    ]);
    let report = common::json_stdout(&out);
    assert_eq!(report["examples"], 872);
    assert_eq!(
        report["metrics"]["accuracy"].as_f64().unwrap(),
        reference["accuracy"].as_f64().unwrap()
    );
    let ours = read_json(&predictions);
    let ours_logits = ours["logits"].as_array().unwrap();
    let ref_logits = reference["logits"].as_array().unwrap();
    assert_eq!(ours_logits.len(), 872);
    for (i, (a, b)) in ours_logits.iter().zip(ref_logits).enumerate() {
        let (a, b) = (flatten(a), flatten(b));
        assert!(max_abs_diff(&a, &b) <= 1e-3, "sentence {i}: {a:?} vs {b:?}");
        let argmax = |v: &[f32]| if v[1] > v[0] { 1 } else { 0 };
        assert_eq!(argmax(&a), argmax(&b), "prediction of sentence {i}");
    }
}
