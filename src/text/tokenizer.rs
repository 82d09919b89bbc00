//! Text → token ids: `tokenizer.json`, or a BERT WordPiece tokenizer built from `vocab.txt`
//! (+ `do_lower_case` from `tokenizer_config.json`). Padding and truncation baked into a
//! tokenizer.json are replaced by ours: no padding (batching pads), longest-first truncation.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{EncodeInput, ModelWrapper, Tokenizer, TruncationParams, TruncationStrategy};

use crate::fsutil::read_text;

/// One tokenised example: token ids and segment ids of equal length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids including special tokens.
    pub ids: Vec<u32>,
    /// Segment (token type) ids.
    pub type_ids: Vec<u32>,
}

/// A tokenizer configured for classification inputs of at most `max_length` tokens.
pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    /// Loads the tokenizer of the model in `dir`.
    pub fn load(dir: &Path, max_length: usize) -> Result<Self> {
        Self::configured(source_tokenizer(dir)?, max_length)
    }

    /// `tokenizer`, with our padding and truncation to `max_length` tokens.
    pub fn configured(mut tokenizer: Tokenizer, max_length: usize) -> Result<Self> {
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("cannot set truncation to {max_length}: {e}"))?;
        Ok(TextEncoder { tokenizer })
    }

    /// The id of a WordPiece tokenizer's unknown token (vocabulary pruning takes no other).
    pub fn unknown_id(&self) -> Option<u32> {
        match self.tokenizer.get_model() {
            ModelWrapper::WordPiece(w) => self.tokenizer.token_to_id(&w.unk_token),
            _ => None,
        }
    }

    /// Tokenises single sentences or sentence pairs (in parallel), with special tokens.
    pub fn encode(&self, texts: &[(String, Option<String>)]) -> Result<Vec<Sequence>> {
        let inputs: Vec<EncodeInput> = texts
            .iter()
            .map(|(a, b)| match b {
                Some(b) => (a.as_str(), b.as_str()).into(),
                None => a.as_str().into(),
            })
            .collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(encodings
            .into_iter()
            .map(|e| Sequence {
                ids: e.get_ids().to_vec(),
                type_ids: e.get_type_ids().to_vec(),
            })
            .collect())
    }
}

/// The tokenizer of the model in `dir` as its files describe it: `tokenizer.json`, else a
/// WordPiece tokenizer built from `vocab.txt`.
pub fn source_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    let vocab = dir.join("vocab.txt");
    for file in [&json, &vocab] {
        if std::fs::symlink_metadata(file).is_ok() && !file.is_file() {
            bail!(
                "{}: not a readable file (a directory or a broken link); remove it or replace it with the tokenizer file",
                file.display()
            );
        }
    }
    if json.is_file() {
        Tokenizer::from_bytes(read_text(&json)?)
            .map_err(|e| anyhow!("{}: cannot load tokenizer ({e})", json.display()))
    } else if vocab.is_file() {
        wordpiece_from_vocab(dir, &vocab)
    } else {
        bail!(
            "{}: no tokenizer found; expected tokenizer.json or vocab.txt in the model directory",
            dir.display()
        );
    }
}

fn wordpiece_from_vocab(dir: &Path, vocab: &Path) -> Result<Tokenizer> {
    let settings = dir.join("tokenizer_config.json");
    let config: serde_json::Value = match read_text(&settings) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", settings.display()))?,
        Err(_) => serde_json::Value::Null,
    };
    let flag = |name: &str| config.get(name).and_then(serde_json::Value::as_bool);
    let token = |name: &str, default: &str| {
        config
            .get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let lowercase = flag("do_lower_case").unwrap_or(true);
    let (unk, cls, sep) = (
        token("unk_token", "[UNK]"),
        token("cls_token", "[CLS]"),
        token("sep_token", "[SEP]"),
    );
    let model = WordPiece::builder()
        .vocab(
            WordPiece::read_bytes(read_text(vocab)?.as_bytes())
                .map_err(|e| anyhow!("{}: cannot read vocabulary ({e})", vocab.display()))?,
        )
        .unk_token(unk)
        .build()
        .map_err(|e| anyhow!("{}: cannot read vocabulary ({e})", vocab.display()))?;
    let id = |t: &str| {
        tokenizers::Model::token_to_id(&model, t).with_context(|| {
            format!(
                "{}: special token {t} is not in the vocabulary",
                vocab.display()
            )
        })
    };
    let (cls_id, sep_id) = (id(&cls)?, id(&sep)?);
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(
            true,
            flag("tokenize_chinese_chars").unwrap_or(true),
            flag("strip_accents"),
            lowercase,
        )))
        .map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new((sep, sep_id), (cls, cls_id))));
    Ok(tokenizer)
}
