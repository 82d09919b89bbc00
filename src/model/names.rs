//! Hugging Face tensor names of each family, without the base-model prefix.

use super::config::Family;

/// Names of one encoder layer's tensors (each a module path; append `.weight` / `.bias`).
pub struct LayerNames {
    /// Query, key and value projections.
    pub qkv: [String; 3],
    /// Attention output projection.
    pub attention_output: String,
    /// LayerNorm after attention.
    pub attention_norm: String,
    /// First FFN projection.
    pub intermediate: String,
    /// Second FFN projection.
    pub ffn_output: String,
    /// LayerNorm after the FFN.
    pub ffn_norm: String,
}

/// The base-model prefix of a family (e.g. `bert.`).
pub fn prefix(family: Family) -> &'static str {
    match family {
        Family::Bert => "bert.",
        Family::Roberta => "roberta.",
        Family::DistilBert => "distilbert.",
    }
}

/// Names of layer `i`'s tensors.
pub fn layer(family: Family, i: usize) -> LayerNames {
    match family {
        Family::DistilBert => {
            let p = format!("transformer.layer.{i}.");
            LayerNames {
                qkv: ["q_lin", "k_lin", "v_lin"].map(|n| format!("{p}attention.{n}")),
                attention_output: format!("{p}attention.out_lin"),
                attention_norm: format!("{p}sa_layer_norm"),
                intermediate: format!("{p}ffn.lin1"),
                ffn_output: format!("{p}ffn.lin2"),
                ffn_norm: format!("{p}output_layer_norm"),
            }
        }
        _ => {
            let p = format!("encoder.layer.{i}.");
            LayerNames {
                qkv: ["query", "key", "value"].map(|n| format!("{p}attention.self.{n}")),
                attention_output: format!("{p}attention.output.dense"),
                attention_norm: format!("{p}attention.output.LayerNorm"),
                intermediate: format!("{p}intermediate.dense"),
                ffn_output: format!("{p}output.dense"),
                ffn_norm: format!("{p}output.LayerNorm"),
            }
        }
    }
}

/// True for the task head's modules and tensors that live outside the base model
/// (`classifier`, `classifier.*`, `pre_classifier`, `pre_classifier.*`), which carry no
/// base-model prefix.
pub fn is_task_head(name: &str) -> bool {
    ["classifier", "pre_classifier"].iter().any(|h| {
        name.strip_prefix(h)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

/// The name as Hugging Face writes it: base-model tensors carry the family prefix.
pub fn full_name(family: Family, name: &str) -> String {
    if is_task_head(name) {
        name.to_string()
    } else {
        format!("{}{name}", prefix(family))
    }
}
