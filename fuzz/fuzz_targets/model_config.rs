//! config.json → model config and per-layer structure, on arbitrary bytes.
#![no_main]

use axcompress::model::config::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice(data) else {
        return;
    };
    let _ = ModelConfig::from_json(json, "config.json");
});
