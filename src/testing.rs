//! Helpers shared by the unit tests.

use candle_core::{Tensor, Var};

/// The largest `|a − b|` over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `n` deterministic values spread over `[offset, offset + span)`, a different order per `seed`.
pub fn spread(n: usize, seed: usize, span: f32, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919) % 1001) as f32 / 1001.0 * span + offset)
        .collect()
}

/// Asserts that the gradients of `Σ ours ⊙ weights` and `Σ reference ⊙ weights` with respect to
/// each of `vars` agree within `tolerance` times the larger of 1 and the largest gradient entry.
pub fn assert_same_gradients(
    ours: Tensor,
    reference: Tensor,
    weights: &Tensor,
    vars: &[(&str, &Var)],
    tolerance: f32,
) {
    let grads = |y: Tensor| {
        let store = (y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vars.iter()
            .map(|(_, v)| store.get(v).expect("a gradient").clone())
            .collect::<Vec<_>>()
    };
    for ((name, _), (a, b)) in vars.iter().zip(grads(ours).iter().zip(&grads(reference))) {
        let diff = max_abs_diff(a, b);
        let size = max_abs_diff(b, &b.zeros_like().unwrap()).max(1.0);
        assert!(
            diff <= tolerance * size,
            "{name}: off by {diff} (largest {size})"
        );
    }
}

/// A seeded random BERT-family classifier (`family`: `bert`, `roberta` or `distilbert`) with
/// `layers` layers, `heads` heads of `head_size`, FFN width `ffn`, a vocabulary of 50 and 3
/// labels: a model to test structural operations on without any file.
pub fn random_model(
    family: &str,
    layers: usize,
    heads: usize,
    head_size: usize,
    ffn: usize,
) -> crate::model::Model {
    use crate::model::config::{Family, ModelConfig};
    use crate::model::names;
    use crate::model::weights::WeightStore;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    let hidden = heads * head_size;
    let raw = match family {
        "distilbert" => serde_json::json!({
            "model_type": "distilbert", "dim": hidden, "n_layers": layers, "n_heads": heads,
            "hidden_dim": ffn, "activation": "gelu", "vocab_size": 50,
            "max_position_embeddings": 16, "pad_token_id": 0,
            "id2label": {"0": "a", "1": "b", "2": "c"}}),
        other => serde_json::json!({
            "model_type": other, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ffn, "hidden_act": "gelu",
            "vocab_size": 50, "max_position_embeddings": 20, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "pad_token_id": 1,
            "id2label": {"0": "a", "1": "b", "2": "c"}}),
    };
    let config = ModelConfig::from_json(raw, "random").unwrap();
    let mut tensors = HashMap::new();
    let mut seed = 0usize;
    let mut add = |name: String, shape: &[usize], offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let values = spread(n, seed, 0.4, offset - 0.2);
        let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        tensors.insert(name, t.to_dtype(DType::F32).unwrap());
    };
    let norm = |add: &mut dyn FnMut(String, &[usize], f32), name: &str| {
        add(format!("{name}.weight"), &[hidden], 1.0);
        add(format!("{name}.bias"), &[hidden], 0.0);
    };
    let linear = |add: &mut dyn FnMut(String, &[usize], f32), name: &str, o: usize, i: usize| {
        add(format!("{name}.weight"), &[o, i], 0.0);
        add(format!("{name}.bias"), &[o], 0.0);
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        &[50, hidden],
        0.0,
    );
    let positions = config.max_position_embeddings;
    add(
        "embeddings.position_embeddings.weight".into(),
        &[positions, hidden],
        0.0,
    );
    if config.family != Family::DistilBert {
        add(
            "embeddings.token_type_embeddings.weight".into(),
            &[2, hidden],
            0.0,
        );
    }
    norm(&mut add, "embeddings.LayerNorm");
    for l in 0..layers {
        let n = names::layer(config.family, l);
        for q in &n.qkv {
            linear(&mut add, q, hidden, hidden);
        }
        linear(&mut add, &n.attention_output, hidden, hidden);
        norm(&mut add, &n.attention_norm);
        linear(&mut add, &n.intermediate, ffn, hidden);
        linear(&mut add, &n.ffn_output, hidden, ffn);
        norm(&mut add, &n.ffn_norm);
    }
    let (dense, out) = crate::model::head::ClassifierHead::tensor_names(config.family);
    linear(&mut add, dense, hidden, hidden);
    linear(&mut add, out, 3, hidden);
    let store = WeightStore::from_tensors(tensors, "random", names::prefix(config.family));
    crate::model::Model::from_store(config, &store).unwrap()
}
