//! Classifiers of real models' shapes (BERT-base, RoBERTa-base, BERT-large) with seeded random
//! weights, written in Hugging Face layout, to measure time and memory at scale with nothing
//! downloaded and nothing large committed.
//!
//! **Only time and memory mean anything on them**: the weights are random, so their accuracy,
//! significance and pruning decisions say nothing about a trained model of the same shape. They
//! reuse a tokenizer given by the caller (the demo model's), whose ids all fall inside the
//! shape's vocabulary.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::config::Family;
use super::names;

/// A real model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `bert-base-uncased`: 12 layers, hidden 768, 12 heads, FFN 3072, vocabulary 30,522.
    BertBase,
    /// `roberta-base`: 12 layers, hidden 768, 12 heads, FFN 3072, vocabulary 50,265.
    RobertaBase,
    /// `bert-large-uncased`: 24 layers, hidden 1024, 16 heads, FFN 4096, vocabulary 30,522.
    BertLarge,
}

/// The sizes that define a [`Shape`].
struct Dims {
    family: Family,
    layers: usize,
    hidden: usize,
    heads: usize,
    ffn: usize,
    vocab: usize,
    positions: usize,
}

impl Shape {
    /// Every shape, smallest first.
    pub const ALL: [Shape; 3] = [Shape::BertBase, Shape::RobertaBase, Shape::BertLarge];

    /// The shape's name on the command line (`bert-base`, `roberta-base`, `bert-large`).
    pub fn name(self) -> &'static str {
        match self {
            Shape::BertBase => "bert-base",
            Shape::RobertaBase => "roberta-base",
            Shape::BertLarge => "bert-large",
        }
    }

    /// The shape named `name`.
    pub fn parse(name: &str) -> Result<Shape> {
        match Shape::ALL.into_iter().find(|s| s.name() == name) {
            Some(shape) => Ok(shape),
            None => bail!("unknown shape {name}; use bert-base, roberta-base or bert-large"),
        }
    }

    fn dims(self) -> Dims {
        let base = Dims {
            family: Family::Bert,
            layers: 12,
            hidden: 768,
            heads: 12,
            ffn: 3072,
            vocab: 30522,
            positions: 512,
        };
        match self {
            Shape::BertBase => base,
            Shape::RobertaBase => Dims {
                family: Family::Roberta,
                vocab: 50265,
                positions: 514,
                ..base
            },
            Shape::BertLarge => Dims {
                layers: 24,
                hidden: 1024,
                heads: 16,
                ffn: 4096,
                ..base
            },
        }
    }
}

/// Writes a two-label classifier of `shape` with weights drawn from `seed` into `out` (created;
/// must not exist), with the tokenizer files of `tokenizer_dir`: `config.json`,
/// `model.safetensors` (f32) and the tokenizer.
pub fn write(shape: Shape, tokenizer_dir: &Path, out: &Path, seed: u64) -> Result<()> {
    let dims = shape.dims();
    std::fs::create_dir(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config_json(&dims))?,
    )?;
    let tensors = random_weights(&dims, seed);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let bytes = safetensors::serialize(views, None)?;
    std::fs::write(out.join("model.safetensors"), bytes)?;
    for file in ["tokenizer.json", "tokenizer_config.json", "vocab.txt"] {
        let from = tokenizer_dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, out.join(file))
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    Ok(())
}

/// The Hugging Face `config.json` of a shape.
fn config_json(d: &Dims) -> serde_json::Value {
    let (model_type, architecture, pad) = match d.family {
        Family::Roberta => ("roberta", "RobertaForSequenceClassification", 1),
        _ => ("bert", "BertForSequenceClassification", 0),
    };
    serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": d.hidden,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "intermediate_size": d.ffn,
        "hidden_act": "gelu",
        "vocab_size": d.vocab,
        "max_position_embeddings": d.positions,
        "type_vocab_size": if d.family == Family::Roberta { 1 } else { 2 },
        "layer_norm_eps": 1e-12,
        "pad_token_id": pad,
        "id2label": {"0": "negative", "1": "positive"},
        "label2id": {"negative": 0, "positive": 1},
        "axcompress_synthetic": "random weights: measure time and memory only",
    })
}

/// Every tensor of the classifier: `(shape, little-endian f32 bytes)` by Hugging Face name.
/// Matrices and embeddings ~ uniform with BERT's initialiser scale (std 0.02), biases 0,
/// LayerNorm scales 1.
fn random_weights(d: &Dims, seed: u64) -> HashMap<String, (Vec<usize>, Vec<u8>)> {
    let mut w = Tensors {
        family: d.family,
        hidden: d.hidden,
        rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        tensors: HashMap::new(),
    };
    let types = if d.family == Family::Roberta { 1 } else { 2 };
    for (table, rows) in [
        ("word_embeddings", d.vocab),
        ("position_embeddings", d.positions),
        ("token_type_embeddings", types),
    ] {
        let name = format!("embeddings.{table}.weight");
        w.add(name, vec![rows, d.hidden], Fill::Random);
    }
    w.norm("embeddings.LayerNorm");
    for i in 0..d.layers {
        let layer = names::layer(d.family, i);
        for name in &layer.qkv {
            w.linear(name, d.hidden, d.hidden);
        }
        w.linear(&layer.attention_output, d.hidden, d.hidden);
        w.norm(&layer.attention_norm);
        w.linear(&layer.intermediate, d.ffn, d.hidden);
        w.linear(&layer.ffn_output, d.hidden, d.ffn);
        w.norm(&layer.ffn_norm);
    }
    let (dense, out) = match d.family {
        Family::Roberta => ("classifier.dense", "classifier.out_proj"),
        _ => ("pooler.dense", "classifier"),
    };
    w.linear(dense, d.hidden, d.hidden);
    w.linear(out, 2, d.hidden);
    w.tensors
}

/// The tensors written so far, and the generator that fills them.
struct Tensors {
    family: Family,
    hidden: usize,
    rng: u64,
    tensors: HashMap<String, (Vec<usize>, Vec<u8>)>,
}

impl Tensors {
    /// Adds the tensor `name` (without the family prefix) of `shape`.
    fn add(&mut self, name: String, shape: Vec<usize>, fill: Fill) {
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(4 * n);
        for _ in 0..n {
            let v = match fill {
                Fill::Random => uniform(&mut self.rng) * 0.0346,
                Fill::Const(c) => c,
            };
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let full = names::full_name(self.family, &name);
        self.tensors.insert(full, (shape, bytes));
    }

    /// A linear layer `name` from `inputs` to `outputs`: random weight, zero bias.
    fn linear(&mut self, name: &str, outputs: usize, inputs: usize) {
        self.add(
            format!("{name}.weight"),
            vec![outputs, inputs],
            Fill::Random,
        );
        self.add(format!("{name}.bias"), vec![outputs], Fill::Const(0.0));
    }

    /// A LayerNorm `name`: scale 1, shift 0.
    fn norm(&mut self, name: &str) {
        let h = self.hidden;
        self.add(format!("{name}.weight"), vec![h], Fill::Const(1.0));
        self.add(format!("{name}.bias"), vec![h], Fill::Const(0.0));
    }
}

/// How a tensor is filled.
#[derive(Clone, Copy)]
enum Fill {
    /// Uniform in ±0.0346 (standard deviation 0.02).
    Random,
    /// Every value the same.
    Const(f32),
}

/// A uniform number in [-1, 1) from a xorshift64 state.
fn uniform(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_parameter_counts_of_the_real_models() {
        // bert-base-uncased 109.48M, roberta-base 124.65M, bert-large-uncased 335.14M (with the
        // pooler and a 2-label head, as transformers counts them).
        for (shape, millions) in [
            (Shape::BertBase, 109.48),
            (Shape::RobertaBase, 124.65),
            (Shape::BertLarge, 335.14),
        ] {
            let d = shape.dims();
            let h = d.hidden;
            let types = if d.family == Family::Roberta { 1 } else { 2 };
            let embeddings = (d.vocab + d.positions + types) * h + 2 * h;
            let layer = 4 * (h * h + h) + 2 * (h * d.ffn) + d.ffn + h + 4 * h;
            let head = h * h + h + 2 * h + 2;
            let total = embeddings + d.layers * layer + head;
            let got = total as f64 / 1e6;
            assert!((got - millions).abs() < 0.01, "{shape:?}: {got}M");
        }
    }

    #[test]
    fn weights_carry_the_family_names_and_repeat_with_the_seed() {
        let d = Dims {
            layers: 2,
            hidden: 64,
            heads: 4,
            ffn: 128,
            vocab: 100,
            positions: 40,
            family: Family::Roberta,
        };
        let tensors = random_weights(&d, 3);
        assert!(tensors.contains_key("roberta.encoder.layer.1.output.dense.weight"));
        assert!(tensors.contains_key("classifier.out_proj.weight"));
        let again = random_weights(&d, 3);
        assert!(
            tensors.iter().all(|(k, v)| again[k] == *v),
            "same seed, same bytes"
        );
        assert_eq!(Shape::parse("bert-large").unwrap(), Shape::BertLarge);
        assert!(Shape::parse("gpt2").is_err());
    }
}
