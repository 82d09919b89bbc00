//! The model's tokenizer: its pruned vocabulary's, else the one in its directory.

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

use super::Model;
use crate::text::tokenizer::{source_tokenizer, TextEncoder};

impl Model {
    /// The tokenizer as the model's files describe it: those of its pruned vocabulary, else those
    /// in its directory.
    pub fn load_tokenizer(&self) -> Result<Tokenizer> {
        match self
            .tokenizer
            .as_ref()
            .and_then(|f| f.get("tokenizer.json"))
        {
            Some(json) => Tokenizer::from_bytes(json)
                .map_err(|e| anyhow!("cannot load the pruned tokenizer ({e})")),
            None => source_tokenizer(&self.dir),
        }
    }

    /// The model's tokenizer configured for inputs of at most `max_length` tokens.
    pub fn text_encoder(&self, max_length: usize) -> Result<TextEncoder> {
        TextEncoder::configured(self.load_tokenizer()?, max_length)
    }
}
