//! The shape stage through the real binary: a smaller uniform model, written in float16 with a
//! stock config, whose reloaded predictions are the ones the run judged.

mod common;

use std::path::Path;

use axcompress::model::Model;
use serde_json::Value;

fn shape_config(dir: &Path, model: &Path, data: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("shape.toml");
    let text = format!(
        "model = {model:?}\ntask = \"sst2\"\ndata = {data:?}\n{extra}\n\
         [selection]\non = \"train-perturbed\"\nholdout = 40\n\n\
         [[stages]]\npass = \"shape\"\nlayers = 2\nhidden = 128\nffn = 256\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_shaped_float16_model_is_stock_and_reloads_to_what_the_run_judged() {
    let data = common::small_sst2(120);
    let tmp = tempfile::tempdir().unwrap();
    let source = common::demo_model();
    let config = shape_config(tmp.path(), &source, data.path(), "dtype = \"float16\"");
    let out = tmp.path().join("small");
    let report = common::compress_json(&config, &out, &[]);
    let written: Value = common::read_json(&out.join("config.json"));
    for (key, value) in [
        ("num_hidden_layers", 2),
        ("hidden_size", 128),
        ("num_attention_heads", 4),
        ("intermediate_size", 256),
    ] {
        assert_eq!(written[key], value, "{key}");
    }
    assert_eq!(written["axcompress"]["hf_compatible"], true);
    assert_eq!(
        written["dtype"], "float16",
        "the config names the written precision"
    );
    assert_eq!(report["hf_compatible"], true);
    let loads_in = report["loads_in"].as_str().unwrap();
    assert!(loads_in.ends_with("; transformers 5.x"), "{loads_in}");
    // Every tensor is float16 on disk.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in tensors.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F16, "{name}");
    }
    // The model reloads to the figures the run judged it by.
    let model = Model::from_dir(&out).unwrap();
    assert_eq!(model.num_layers(), 2);
    assert_eq!(model.config.hidden_size, 128);
    let eval = common::eval_json(&out, "sst2", data.path());
    assert_eq!(eval["metrics"], common::dev_after(&report), "{eval}");
    // The loss too: the run judged the float16 model, not the float32 one it computed.
    let dev = report["evaluation"].as_array().unwrap().iter();
    let judged = dev
        .filter(|c| c["split"] == "dev")
        .map(|c| c["after"]["loss"].as_f64().unwrap());
    let (judged, reloaded) = (
        judged.sum::<f64>(),
        eval["sets"][0]["loss"].as_f64().unwrap(),
    );
    assert!((judged - reloaded).abs() < 1e-7, "{judged} vs {reloaded}");
    let stage = &report["stages"][0];
    assert_eq!(stage["pass"], "shape");
    assert_eq!(stage["details"]["layers"].as_array().unwrap().len(), 2);
    let kept_heads = stage["details"]["kept_heads"].as_array().unwrap();
    assert!(kept_heads.iter().all(|h| h.as_array().unwrap().len() == 4));
}

#[test]
fn a_shape_that_asks_for_more_than_the_model_has_is_one_line() {
    let data = common::small_sst2(60);
    let tmp = tempfile::tempdir().unwrap();
    let source = common::demo_model();
    let config = shape_config(tmp.path(), &source, data.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    for (from, to, needle) in [
        (
            "layers = 2",
            "layers = 4",
            "layers = 4 is more than the model has (3)",
        ),
        (
            "hidden = 128",
            "hidden = 100",
            "not a multiple of the head size 32",
        ),
        ("ffn = 256", "ffn = 0", "at least 1"),
    ] {
        std::fs::write(&config, text.replace(from, to)).unwrap();
        let out = tmp.path().join("never");
        let o = common::run(&[
            "compress",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        common::assert_clean_error(&o, &[needle]);
        assert!(!out.exists());
    }
}
