//! The per-layer [`Structure`] of a model: the single source of truth for what each encoder layer
//! keeps. Gates, physical slicing, export and the `axcompress` section of `config.json` are all
//! views of it.
//!
//! # What removed parts compute
//! With `x` the hidden states entering a block:
//! - **Attention block present with heads `H`**: `LayerNorm(x + W_o · concat_{h∈H}(head_h(x)) + b_o)`.
//!   With `H` empty this is `LayerNorm(x + b_o)`: removing every head leaves the output bias and
//!   the residual LayerNorm, exactly what gating every head to zero computes.
//! - **Attention block removed** (`heads: None`): the identity, `x`. No LayerNorm is applied.
//! - **FFN block present with width `F`**: `LayerNorm(x + W_2 · act(W_1 x + b_1) + b_2)`; with `F = 0`
//!   this is `LayerNorm(x + b_2)`.
//! - **FFN block removed** (`ffn_width: None`): the identity.
//! - **Layer removed**: both blocks removed, so the layer is the identity.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::kernels::attention_mode::ApproxAttention;

/// What one encoder layer keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Kept attention heads as indices into the original model's heads, ascending;
    /// `None` when the whole attention block is removed.
    pub heads: Option<Vec<usize>>,
    /// FFN (intermediate) width; `None` when the whole FFN block is removed.
    pub ffn_width: Option<usize>,
    /// The attention's approximation; `None` (absent from the JSON) for dense attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_mode: Option<ApproxAttention>,
}

impl LayerShape {
    /// True when neither block is present, so the layer is the identity.
    pub fn is_removed(&self) -> bool {
        self.heads.is_none() && self.ffn_width.is_none()
    }

    /// Number of heads the attention block keeps (0 when it is removed).
    pub fn head_count(&self) -> usize {
        self.heads.as_ref().map_or(0, Vec::len)
    }
}

/// Per-layer shapes of a BERT-family encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Structure {
    /// Size of every attention head (hidden / heads in the original model).
    pub head_size: usize,
    /// Number of heads per layer in the original, unpruned model.
    pub original_heads: usize,
    /// One entry per encoder layer of the original model, in order.
    pub layers: Vec<LayerShape>,
}

impl Structure {
    /// The structure of an unpruned model: every layer keeps all heads and the full FFN.
    pub fn uniform(layers: usize, heads: usize, head_size: usize, ffn_width: usize) -> Self {
        let shape = LayerShape {
            heads: Some((0..heads).collect()),
            ffn_width: Some(ffn_width),
            attention_mode: None,
        };
        Structure {
            head_size,
            original_heads: heads,
            layers: vec![shape; layers],
        }
    }

    /// Checks internal consistency; `source` names where the structure came from for errors.
    pub fn validate(&self, source: &str) -> Result<()> {
        if self.head_size == 0 {
            bail!("{source}: head_size must be positive");
        }
        for (l, layer) in self.layers.iter().enumerate() {
            if let Some(heads) = &layer.heads {
                if heads.windows(2).any(|w| w[0] >= w[1]) {
                    bail!("{source}: layer {l} heads must be strictly ascending, got {heads:?}");
                }
                if let Some(&h) = heads.iter().find(|&&h| h >= self.original_heads) {
                    bail!(
                        "{source}: layer {l} keeps head {h}, but the model had {} heads",
                        self.original_heads
                    );
                }
            }
            if let Some(mode) = &layer.attention_mode {
                if !mode.k.is_valid() {
                    bail!("{source}: layer {l} attention_mode k = {} must be a number of keys ≥ 1 or a fraction in (0, 1]", mode.k);
                }
                if layer.head_count() == 0 {
                    bail!("{source}: layer {l} has an attention_mode but no attention heads; remove attention_mode");
                }
            }
        }
        Ok(())
    }

    /// Layers whose attention is approximate, with their approximation.
    pub fn approximate_attention(&self) -> Vec<(usize, ApproxAttention)> {
        let modes = self.layers.iter().map(|l| l.attention_mode).enumerate();
        modes.filter_map(|(i, m)| Some((i, m?))).collect()
    }

    /// True when every layer keeps all original heads and the same FFN width, so a stock
    /// Hugging Face config can describe the model (after dropping removed layers).
    pub fn uniform_ffn_width(&self) -> Option<usize> {
        let mut widths = self.layers.iter().filter(|l| !l.is_removed());
        let first = widths.next()?.ffn_width?;
        let all_full = self
            .layers
            .iter()
            .filter(|l| !l.is_removed())
            .all(|l| l.ffn_width == Some(first) && l.head_count() == self.original_heads);
        all_full.then_some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_structure_is_valid_and_stock() {
        let s = Structure::uniform(3, 4, 8, 64);
        s.validate("test").unwrap();
        assert_eq!(s.uniform_ffn_width(), Some(64));
    }

    #[test]
    fn pruned_heads_are_not_stock() {
        let mut s = Structure::uniform(2, 4, 8, 64);
        s.layers[1].heads = Some(vec![0, 2]);
        assert_eq!(s.uniform_ffn_width(), None);
    }

    #[test]
    fn rejects_unsorted_or_out_of_range_heads() {
        let mut s = Structure::uniform(1, 4, 8, 64);
        s.layers[0].heads = Some(vec![2, 1]);
        assert!(s.validate("x").is_err());
        s.layers[0].heads = Some(vec![1, 4]);
        assert!(s.validate("x").unwrap_err().to_string().contains("head 4"));
    }

    #[test]
    fn removed_layer_is_both_blocks_removed() {
        let l = LayerShape {
            heads: None,
            ffn_width: None,
            attention_mode: None,
        };
        assert!(l.is_removed());
        assert_eq!(l.head_count(), 0);
    }
}
