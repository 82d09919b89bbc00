//! Hugging Face `config.json` → [`ModelConfig`] (family, sizes, labels and per-layer [`Structure`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::structure::Structure;
use crate::fsutil::read_text;

/// The BERT-family architectures axcompress runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `BertForSequenceClassification`.
    Bert,
    /// `RobertaForSequenceClassification` (padding-aware position ids, dense→tanh→out_proj head).
    Roberta,
    /// `DistilBertForSequenceClassification` (no token types, pre_classifier→ReLU→classifier).
    DistilBert,
}

impl Family {
    /// The `model_type` string of this family.
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::DistilBert => "distilbert",
        }
    }
}

/// The FFN activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), Hugging Face `gelu`.
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// ReLU.
    Relu,
}

/// Everything the runtime needs from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Architecture family.
    pub family: Family,
    /// Hidden (model) dimension.
    pub hidden_size: usize,
    /// Word-piece vocabulary size.
    pub vocab_size: usize,
    /// Rows of the position-embedding table.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (0 when the family has none).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// FFN activation.
    pub activation: Activation,
    /// Padding token id.
    pub pad_token_id: u32,
    /// Label names in model output order (`id2label`); one entry for regression.
    pub labels: Vec<String>,
    /// True for a single-output regression model (`num_labels == 1`, e.g. STS-B).
    pub regression: bool,
    /// Per-layer shapes.
    pub structure: Structure,
    /// The original JSON, kept so that exports preserve every standard field.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(raw, &path.display().to_string())
    }

    /// Parses a config already read as JSON; `source` names the file in errors.
    pub fn from_json(raw: Value, source: &str) -> Result<Self> {
        let fields = Fields { raw: &raw, source };
        let model_type = fields.string("model_type")?;
        let family = match model_type.as_str() {
            "bert" => Family::Bert,
            "roberta" => Family::Roberta,
            "distilbert" => Family::DistilBert,
            other => bail!(
                "{source}: unknown model_type \"{other}\"; axcompress supports bert, roberta and distilbert"
            ),
        };
        let names = FieldNames::of(family);
        let hidden_size = fields.usize(names.hidden)?;
        let layers = fields.usize_at_most(names.layers, MAX_LAYERS_OR_HEADS)?;
        let heads = fields.usize_at_most(names.heads, MAX_LAYERS_OR_HEADS)?;
        let ffn = fields.usize(names.ffn)?;
        if heads == 0 || hidden_size % heads != 0 {
            bail!(
                "{source}: {} = {hidden_size} is not divisible by {} = {heads}",
                names.hidden,
                names.heads
            );
        }
        let activation = match fields.string(names.activation)?.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => bail!(
                "{source}: {} \"{other}\" is not supported (gelu, gelu_new, relu)",
                names.activation
            ),
        };
        let type_vocab_size = match family {
            Family::DistilBert => 0,
            _ => fields.usize("type_vocab_size")?,
        };
        let layer_norm_eps = match family {
            Family::DistilBert => 1e-12,
            _ => raw
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
        };
        if !(layer_norm_eps.is_finite() && layer_norm_eps >= 0.0) {
            bail!("{source}: layer_norm_eps is {layer_norm_eps}; it must be a small non-negative number such as 1e-12");
        }
        let pad_token_id = raw
            .get("pad_token_id")
            .and_then(Value::as_u64)
            .unwrap_or(match family {
                Family::Roberta => 1,
                _ => 0,
            }) as u32;
        let labels = parse_labels(&raw, source)?;
        let regression = labels.len() == 1
            || raw.get("problem_type").and_then(Value::as_str) == Some("regression");
        let structure = match raw.get("axcompress").and_then(|a| a.get("structure")) {
            Some(s) => {
                let s: Structure = serde_json::from_value(s.clone()).with_context(|| {
                    format!("{source}: field axcompress.structure is malformed")
                })?;
                if s.layers.len() != layers || s.original_heads != heads {
                    bail!(
                        "{source}: axcompress.structure disagrees with {} / {}",
                        names.layers,
                        names.heads
                    );
                }
                s
            }
            None => Structure::uniform(layers, heads, hidden_size / heads, ffn),
        };
        structure.validate(&format!("{source}: axcompress.structure"))?;
        Ok(ModelConfig {
            family,
            hidden_size,
            vocab_size: fields.usize("vocab_size")?,
            max_position_embeddings: fields.usize("max_position_embeddings")?,
            type_vocab_size,
            layer_norm_eps,
            activation,
            pad_token_id,
            labels,
            regression,
            structure,
            raw,
        })
    }

    /// Longest input (in tokens, special tokens included) the position table allows.
    pub fn max_input_length(&self) -> usize {
        match self.family {
            // RoBERTa position ids start at pad_token_id + 1.
            Family::Roberta => self
                .max_position_embeddings
                .saturating_sub(self.pad_token_id as usize + 1),
            _ => self.max_position_embeddings,
        }
    }

    /// Number of model outputs.
    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }
}

/// Largest size field (hidden size, FFN width, vocabulary, positions) a config may give: far above
/// any real model, low enough that a corrupt value cannot ask for terabytes.
const MAX_SIZE: usize = 1 << 24;

/// Most layers or attention heads a config may give (the structure holds layers × heads).
const MAX_LAYERS_OR_HEADS: usize = 1 << 10;

/// Most labels `num_labels` may give.
const MAX_LABELS: usize = 1 << 16;

/// Config field names that differ between families.
struct FieldNames {
    hidden: &'static str,
    layers: &'static str,
    heads: &'static str,
    ffn: &'static str,
    activation: &'static str,
}

impl FieldNames {
    fn of(family: Family) -> Self {
        match family {
            Family::DistilBert => FieldNames {
                hidden: "dim",
                layers: "n_layers",
                heads: "n_heads",
                ffn: "hidden_dim",
                activation: "activation",
            },
            _ => FieldNames {
                hidden: "hidden_size",
                layers: "num_hidden_layers",
                heads: "num_attention_heads",
                ffn: "intermediate_size",
                activation: "hidden_act",
            },
        }
    }
}

/// Typed access to config fields with errors that name the file and field.
struct Fields<'a> {
    raw: &'a Value,
    source: &'a str,
}

impl Fields<'_> {
    /// A size field, at most [`MAX_SIZE`].
    fn usize(&self, name: &str) -> Result<usize> {
        self.usize_at_most(name, MAX_SIZE)
    }

    fn usize_at_most(&self, name: &str, limit: usize) -> Result<usize> {
        let source = self.source;
        let Some(v) = self.raw.get(name) else {
            bail!("{source}: missing field {name}");
        };
        let n = v.as_u64().with_context(|| {
            format!("{source}: field {name} must be a non-negative integer, got {v}")
        })?;
        match usize::try_from(n) {
            Ok(n) if n <= limit => Ok(n),
            _ => bail!("{source}: field {name} = {n} is larger than any model axcompress runs (at most {limit})"),
        }
    }

    fn string(&self, name: &str) -> Result<String> {
        match self.raw.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => bail!("{}: field {name} must be a string, got {v}", self.source),
            None => bail!("{}: missing field {name}", self.source),
        }
    }
}

/// Label names in output order from `id2label` (or `num_labels` → `LABEL_k`; default 2).
fn parse_labels(raw: &Value, source: &str) -> Result<Vec<String>> {
    if let Some(map) = raw.get("id2label").and_then(Value::as_object) {
        let mut labels = vec![None; map.len()];
        for (k, v) in map {
            let idx: usize = k.parse().ok().filter(|&i| i < map.len()).with_context(|| {
                format!(
                    "{source}: id2label key \"{k}\" is not an index below {}",
                    map.len()
                )
            })?;
            let name = v
                .as_str()
                .with_context(|| format!("{source}: id2label[{k}] must be a string"))?;
            labels[idx] = Some(name.to_string());
        }
        if map.is_empty() {
            bail!("{source}: id2label is empty");
        }
        return Ok(labels.into_iter().map(|l| l.unwrap_or_default()).collect());
    }
    let n = raw.get("num_labels").and_then(Value::as_u64).unwrap_or(2);
    if n > MAX_LABELS as u64 {
        bail!("{source}: num_labels = {n} is larger than any classifier axcompress runs (at most {MAX_LABELS})");
    }
    Ok((0..n).map(|i| format!("LABEL_{i}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bert() -> Value {
        json!({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
               "vocab_size": 10, "max_position_embeddings": 12, "type_vocab_size": 2,
               "id2label": {"0": "negative", "1": "positive"}})
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        for (field, value) in [
            ("num_hidden_layers", 1u64 << 40),
            ("num_attention_heads", 4096),
            ("vocab_size", u64::MAX),
        ] {
            let mut raw = bert();
            raw[field] = json!(value);
            let err = ModelConfig::from_json(raw, "config.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("field {field} = {value} is larger")),
                "{err}"
            );
        }
        let mut raw = bert();
        raw.as_object_mut().unwrap().remove("id2label");
        raw["num_labels"] = json!(1u64 << 50);
        let err = ModelConfig::from_json(raw, "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_labels"), "{err}");
    }

    #[test]
    fn a_negative_layer_norm_eps_is_refused() {
        // Before: -1 loaded, and the NaN that followed blamed the weights.
        let mut raw = bert();
        raw["layer_norm_eps"] = json!(-1.0);
        let err = ModelConfig::from_json(raw, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config.json: layer_norm_eps is -1"),
            "{err}"
        );
        let mut raw = bert();
        raw["layer_norm_eps"] = json!(1e-5);
        assert_eq!(
            ModelConfig::from_json(raw, "x").unwrap().layer_norm_eps,
            1e-5
        );
    }

    #[test]
    fn parses_uniform_bert() {
        let c = ModelConfig::from_json(bert(), "config.json").unwrap();
        assert_eq!(c.family, Family::Bert);
        assert_eq!(c.structure.head_size, 4);
        assert_eq!(c.labels, vec!["negative", "positive"]);
        assert!(!c.regression);
    }

    #[test]
    fn missing_field_is_named() {
        let mut raw = bert();
        raw.as_object_mut().unwrap().remove("hidden_size");
        let err = ModelConfig::from_json(raw, "config.json")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "config.json: missing field hidden_size");
    }

    #[test]
    fn unknown_model_type_is_refused() {
        let mut raw = bert();
        raw["model_type"] = json!("gpt2");
        let err = ModelConfig::from_json(raw, "c.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown model_type \"gpt2\""), "{err}");
    }

    #[test]
    fn one_label_means_regression() {
        let mut raw = bert();
        raw["id2label"] = json!({"0": "LABEL_0"});
        assert!(ModelConfig::from_json(raw, "c").unwrap().regression);
    }

    #[test]
    fn reads_axcompress_structure() {
        let mut raw = bert();
        raw["axcompress"] = json!({"structure": {"head_size": 4, "original_heads": 2,
            "layers": [{"heads": [1], "ffn_width": 8}, {"heads": null, "ffn_width": null}]}});
        let c = ModelConfig::from_json(raw, "c").unwrap();
        assert_eq!(c.structure.layers[0].heads, Some(vec![1]));
        assert!(c.structure.layers[1].is_removed());
    }
}
