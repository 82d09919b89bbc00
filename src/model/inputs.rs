//! Padded, masked model inputs for one batch, with family-specific position ids.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::config::{Family, ModelConfig};
use crate::text::tokenizer::Sequence;

/// Padded model inputs for one batch.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// `[batch, seq]` u32 token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]` u32 segment ids.
    pub token_type_ids: Tensor,
    /// `[batch, seq]` u32 position ids (family-specific).
    pub position_ids: Tensor,
    /// `[batch, 1, 1, seq]` f32 additive mask: 0 for real tokens, `f32::MIN` for padding.
    pub mask_bias: Tensor,
}

impl Inputs {
    /// Right-pads `seqs` to the longest one and builds masks and position ids.
    pub fn from_sequences(config: &ModelConfig, seqs: &[&Sequence]) -> Result<Self> {
        let len = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        if len == 0 {
            bail!("cannot build a batch from empty sequences");
        }
        let pad = config.pad_token_id;
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut types = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            let n = s.ids.len();
            ids.extend_from_slice(&s.ids);
            ids.extend(std::iter::repeat_n(pad, len - n));
            types.extend_from_slice(&s.type_ids);
            types.extend(std::iter::repeat_n(0, len - n));
            mask.extend(std::iter::repeat_n(1u32, n).chain(std::iter::repeat_n(0, len - n)));
        }
        Self::from_padded(config, seqs.len(), len, ids, mask, types)
    }

    /// Builds inputs from already padded row-major `[batch, seq]` ids, mask (1/0) and types.
    pub fn from_padded(
        config: &ModelConfig,
        batch: usize,
        len: usize,
        ids: Vec<u32>,
        mask: Vec<u32>,
        types: Vec<u32>,
    ) -> Result<Self> {
        if ids.len() != batch * len || mask.len() != batch * len || types.len() != batch * len {
            bail!("inputs must all have batch × seq = {} entries", batch * len);
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= config.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary ({} entries)",
                config.vocab_size
            );
        }
        if len > config.max_input_length() {
            bail!(
                "sequence length {len} exceeds what the model's position table allows ({})",
                config.max_input_length()
            );
        }
        let positions = position_ids(config, len, &mask);
        let bias: Vec<f32> = mask
            .iter()
            .map(|&m| if m == 0 { f32::MIN } else { 0.0 })
            .collect();
        let dev = &Device::Cpu;
        Ok(Inputs {
            input_ids: Tensor::from_vec(ids, (batch, len), dev)?,
            token_type_ids: Tensor::from_vec(types, (batch, len), dev)?,
            position_ids: Tensor::from_vec(positions, (batch, len), dev)?,
            mask_bias: Tensor::from_vec(bias, (batch, 1, 1, len), dev)?,
        })
    }
}

/// BERT/DistilBERT: `0..len`. RoBERTa: `pad + cumsum(mask)` on real tokens, `pad` on padding.
fn position_ids(config: &ModelConfig, len: usize, mask: &[u32]) -> Vec<u32> {
    match config.family {
        Family::Roberta => {
            let pad = config.pad_token_id;
            mask.chunks(len)
                .flat_map(|row| {
                    let mut seen = 0;
                    row.iter()
                        .map(|&m| {
                            seen += m;
                            if m == 0 {
                                pad
                            } else {
                                pad + seen
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        }
        _ => (0..mask.len()).map(|i| (i % len) as u32).collect(),
    }
}
