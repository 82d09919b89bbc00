//! The `axcompress` section of config.json (per-layer structure, attention modes), fuzzed inside
//! an otherwise valid MiniLM-L6 config.
#![no_main]

use axcompress::model::config::ModelConfig;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(section) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let config = json!({
        "model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
        "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
        "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
        "id2label": {"0": "negative", "1": "positive"},
        "axcompress": section,
    });
    let _ = ModelConfig::from_json(config, "config.json");
});
