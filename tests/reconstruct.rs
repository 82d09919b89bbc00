//! Layer-wise reconstruction after pruning: it lowers the error of every layer's output against
//! the original on sentences it was not fitted on, and the re-fit model exports, reloads and
//! equals itself; recomputing the states of batches past the memory budget changes nothing.

mod common;

use axcompress::export::write_model_dir;
use axcompress::model::encoder::RunOptions;
use axcompress::model::slice::LayerKeep;
use axcompress::model::storage::StorageDtype;
use axcompress::model::Model;
use axcompress::passes::reconstruct::{hidden_errors, reconstruct, DEFAULT_RIDGE};
use axcompress::scoring::batch::ScoringBatch;
use candle_core::{Device, Tensor};
use serde_json::json;

/// SST-2 dev sentences `range`, in batches of 32, for `model`.
fn batches(model: &Model, range: std::ops::Range<usize>) -> Vec<ScoringBatch> {
    let all = range.end;
    let inputs = common::sst2_dev_batch_inputs(model, range.start, all, 32);
    inputs
        .into_iter()
        .map(|inputs| ScoringBatch {
            loss_targets: Tensor::zeros(
                inputs.input_ids.dim(0).unwrap(),
                candle_core::DType::U32,
                &Device::Cpu,
            )
            .unwrap(),
            examples: Vec::new(),
            regression: false,
            inputs,
        })
        .collect()
}

/// Half the heads and a third of the FFN neurons of every layer removed.
fn heavy_plan(model: &Model) -> Vec<LayerKeep> {
    model
        .keep_all()
        .into_iter()
        .enumerate()
        .map(|(l, k)| LayerKeep {
            heads: k
                .heads
                .map(|h| h.into_iter().filter(|x| (x + l) % 2 == 0).collect()),
            neurons: k
                .neurons
                .map(|n| n.into_iter().filter(|x| (x + l) % 3 != 0).collect()),
        })
        .collect()
}

#[test]
fn reconstruction_lowers_held_out_layer_errors_and_round_trips() {
    let model = Model::from_dir(&common::demo_model()).unwrap();
    let pruned = model.slice(&heavy_plan(&model)).unwrap();
    let fit_on = batches(&model, 0..160);
    let held_out = batches(&model, 160..320);
    let before = hidden_errors(&model, &pruned, &held_out).unwrap();
    let (fitted, fits) = reconstruct(&model, &pruned, &fit_on, DEFAULT_RIDGE).unwrap();
    assert_eq!(fits.len(), 2 * model.config.structure.layers.len());
    for f in &fits {
        assert!(f.error_after < f.error_before, "{f:?}");
    }
    let after = hidden_errors(&model, &fitted, &held_out).unwrap();
    eprintln!("held-out relative errors per layer: {before:.4?} without, {after:.4?} with");
    for (l, (a, b)) in after.iter().zip(&before).enumerate() {
        assert!(
            a < b,
            "layer {l}: held-out error {a} with reconstruction, {b} without"
        );
    }
    assert_eq!(fitted.parameter_count(), pruned.parameter_count());

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fitted");
    write_model_dir(&fitted, &out, &[], &json!({}), false).unwrap();
    let reloaded = Model::from_dir(&out).unwrap();
    // The demo model is fp16: the export rounds the re-fit weights to it.
    let stored = fitted
        .stored_as(StorageDtype::of(fitted.storage_dtype))
        .unwrap();
    assert_eq!(
        reloaded.fingerprint().unwrap(),
        stored.fingerprint().unwrap()
    );
    let inputs = &held_out[0].inputs;
    let logits = |m: &Model| -> Vec<f32> {
        m.forward(inputs, RunOptions::default())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(logits(&reloaded), logits(&stored));

    // With no memory for states, every batch's states are recomputed from the embeddings
    // (through the fused inference path, so equal to ~1e-6 rather than bit for bit).
    std::env::set_var("AXCOMPRESS_CACHE_MB", "0");
    let (streamed, streamed_fits) = reconstruct(&model, &pruned, &fit_on, DEFAULT_RIDGE).unwrap();
    std::env::remove_var("AXCOMPRESS_CACHE_MB");
    for (a, b) in fits.iter().zip(&streamed_fits) {
        assert!(
            (a.error_after - b.error_after).abs() <= 1e-5 * a.error_after,
            "{a:?} {b:?}"
        );
    }
    let (a, b) = (logits(&fitted), logits(&streamed));
    assert!(common::max_abs_diff(&a, &b) < 1e-4, "{a:?} against {b:?}");
}
