//! Vocabulary pruning: keep the word-embedding rows of the tokens a corpus produces (plus the
//! special tokens), renumber them in their old order and rewrite the tokenizer to match. Every
//! corpus text tokenizes to the same tokens as before, so its logits are unchanged; this is
//! checked on the whole corpus every time, not assumed. A quantized embedding matrix keeps its
//! codes (its rows are quantized independently).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::{EncodeInput, Tokenizer};

use super::journal::Journal;
use super::{Pass, PassOutput, StageContext};
use crate::data::batch::{encode, EncodedSet};
use crate::data::glue::Dataset;
use crate::data::source::TaskData;
use crate::fsutil::{pretty_json, read_text};
use crate::model::Model;
use crate::text::tokenizer::TextEncoder;
use crate::text::vocab::{
    corpus_ids, prune_tokenizer_config, prune_tokenizer_json, vocab_txt, KeptIds, TokenizerFiles,
};

/// Config ids that name tokens and must survive pruning.
const CONFIG_TOKEN_IDS: [&str; 5] = [
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "cls_token_id",
];

crate::settings! {
    /// The settings of a vocabulary stage (`[[stages]] pass = "vocab"`, or `--vocab corpus`).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct VocabSettings;
    {
        /// The corpus: a text file, one text per line, tab-separated fields tokenized separately
        /// (`--vocab-corpus`, relative to the config); unset: the task's train and dev splits.
        corpus: Option<PathBuf> = None, "train + dev";
        /// Also keep only the position-embedding rows inputs of up to the run's max length use
        /// (exact for them; a later `--max-length` above it is refused), for deployment at a fixed
        /// length.
        positions: bool = false, "false";
    }
}

/// `--vocab`: which vocabulary to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum VocabChoice {
    /// The tokens of a corpus: the task's train and dev data, or `--vocab-corpus FILE`.
    Corpus,
}

impl VocabSettings {
    /// The stage `--vocab` and `--vocab-corpus` ask for (a file implies `--vocab corpus`).
    pub fn from_flags(choice: Option<VocabChoice>, file: Option<PathBuf>) -> Option<Self> {
        match (choice, file) {
            (_, Some(path)) => Some(VocabSettings {
                corpus: Some(path),
                ..VocabSettings::default()
            }),
            (Some(VocabChoice::Corpus), None) => Some(VocabSettings::default()),
            (None, None) => None,
        }
    }

    /// The corpus texts, and where they came from (`train+dev` or the file).
    fn texts(&self, data: &TaskData) -> Result<(Vec<String>, String)> {
        match &self.corpus {
            None => {
                let mut sets = Vec::new();
                for split in ["train", "dev"] {
                    sets.extend(data.split(split)?.into_iter().map(|(_, set)| set));
                }
                Ok((dataset_texts(&sets), "train+dev".to_string()))
            }
            Some(path) => Ok((file_texts(path)?, path.display().to_string())),
        }
    }
}

/// What vocabulary pruning kept, and what it did to dev.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VocabReport {
    /// Where the corpus came from: `train+dev` or the file.
    pub corpus: String,
    /// Texts in the corpus (a sentence pair counts twice).
    pub corpus_texts: usize,
    /// Tokens kept, special tokens included.
    pub kept: usize,
    /// Tokens before.
    pub of: usize,
    /// Share of dev input tokens that are the unknown token, before and after.
    pub dev_unknown_rate_before: f64,
    /// The same with the pruned tokenizer.
    pub dev_unknown_rate_after: f64,
    /// With `positions`: the position rows kept and before, when the table was longer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positions: Option<[usize; 2]>,
}

impl VocabReport {
    /// One line: what was kept, and the unknown-token rate on dev.
    pub fn summary(&self) -> String {
        let positions = match self.positions {
            Some([kept, of]) => format!("; position rows: kept {kept} of {of}"),
            None => String::new(),
        };
        format!(
            "vocabulary: kept {} of {} tokens ({} texts of {}); [UNK] on dev {:.3}% -> {:.3}%{positions}",
            self.kept,
            self.of,
            self.corpus_texts,
            self.corpus,
            self.dev_unknown_rate_before * 100.0,
            self.dev_unknown_rate_after * 100.0
        )
    }
}

/// Vocabulary pruning as a stage of a pipeline: exact on its corpus, so it takes no decision. It
/// changes the tokenizer, so it is the last stage, and the pipeline encodes the run's data anew
/// to judge the result as it will run.
pub struct Vocab {
    settings: VocabSettings,
}

impl Vocab {
    /// The stage.
    pub fn new(settings: VocabSettings) -> Self {
        Vocab { settings }
    }
}

impl Pass for Vocab {
    type Settings = VocabSettings;
    type Report = VocabReport;

    fn name(&self) -> &'static str {
        "vocab"
    }

    fn settings(&self) -> &VocabSettings {
        &self.settings
    }

    fn run(
        &self,
        model: Model,
        ctx: &StageContext,
        _journal: &mut Journal,
    ) -> Result<PassOutput<VocabReport>> {
        let (texts, corpus) = self.settings.texts(ctx.data)?;
        let (mut pruned, kept) = prune_vocabulary(&model, &texts)?;
        let positions = match self.settings.positions {
            true => cut_positions(&mut pruned, ctx.max_length)?,
            false => None,
        };
        let dev = ctx.data.first("dev")?;
        let after = pruned.text_encoder(ctx.max_length)?;
        let report = VocabReport {
            corpus,
            corpus_texts: texts.len(),
            kept: kept.len(),
            of: model.config.vocab_size,
            dev_unknown_rate_before: unknown_rate(&encode(&dev, "", ctx.encoder)?, ctx.encoder),
            dev_unknown_rate_after: unknown_rate(&encode(&dev, "", &after)?, &after),
            positions,
        };
        ctx.log(&report.summary());
        Ok(PassOutput {
            model: pruned,
            details: report,
            alternatives: Vec::new(),
            files: Vec::new(),
        })
    }

    fn retokenizes(&self) -> bool {
        true
    }

    fn summary(&self, report: &VocabReport) -> Option<String> {
        Some(report.summary())
    }
}

/// Share of the tokens of `set` that are `encoder`'s unknown token.
fn unknown_rate(set: &EncodedSet, encoder: &TextEncoder) -> f64 {
    let Some(unk) = encoder.unknown_id() else {
        return 0.0;
    };
    let ids = set.sequences.iter().flat_map(|s| &s.ids);
    let (unknown, total) = ids.fold((0usize, 0usize), |(u, t), &i| {
        (u + usize::from(i == unk), t + 1)
    });
    if total == 0 {
        0.0
    } else {
        unknown as f64 / total as f64
    }
}

/// The texts of `sets`: every sentence of every example.
pub fn dataset_texts(sets: &[Dataset]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| &s.examples)
        .flat_map(|e| std::iter::once(e.text_a.clone()).chain(e.text_b.clone()))
        .collect()
}

/// The texts of a corpus file: every tab-separated field of every non-empty line.
pub fn file_texts(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path).with_context(|| {
        format!(
            "--vocab-corpus {}: cannot read it; pass a UTF-8 text file, one text per line",
            path.display()
        )
    })?;
    let texts: Vec<String> = text
        .lines()
        .flat_map(|l| l.split('\t'))
        .filter(|t| !t.trim().is_empty())
        .map(str::to_string)
        .collect();
    if texts.is_empty() {
        bail!(
            "--vocab-corpus {}: the file has no text; pass one text per line",
            path.display()
        );
    }
    Ok(texts)
}

/// `model` with only the vocabulary `texts` need; the tokenizer files travel with the model.
pub fn prune_vocabulary(model: &Model, texts: &[String]) -> Result<(Model, KeptIds)> {
    let tokenizer = model.load_tokenizer()?;
    let vocab_size = model.config.vocab_size;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let kept = corpus_ids(&tokenizer, &refs, &config_token_ids(&model.config.raw))?;
    if let Some(&bad) = kept.old_ids().iter().find(|&&i| i as usize >= vocab_size) {
        bail!("the tokenizer produces token id {bad}, beyond the model's vocab_size {vocab_size}");
    }
    let files = tokenizer_files(model, &tokenizer, &kept)?;
    let pruned = Tokenizer::from_bytes(files.get("tokenizer.json").unwrap_or_default())
        .map_err(|e| anyhow!("the pruned tokenizer does not load ({e})"))?;
    check_unchanged(&tokenizer, &pruned, &refs, &kept)?;
    let rows: Vec<usize> = kept.old_ids().iter().map(|&i| i as usize).collect();
    let mut out = model.clone();
    out.embeddings.word = model.embeddings.word.select(0, &rows)?;
    out.config.vocab_size = kept.len();
    renumber_config(&mut out.config.raw, &kept)?;
    out.tokenizer = Some(Arc::new(files));
    Ok((out, kept))
}

/// Keeps the position-embedding rows that inputs of up to `max_length` tokens use (RoBERTa's
/// start after the padding id) and says so in `config.json`; returns `[kept, before]` when the
/// table was longer. Exact for such inputs, and the runtime refuses a longer `--max-length`.
fn cut_positions(model: &mut Model, max_length: usize) -> Result<Option<[usize; 2]>> {
    let before = model.config.max_position_embeddings;
    let offset = before - model.config.max_input_length();
    let rows = (max_length + offset).min(before);
    if rows == before {
        return Ok(None);
    }
    let table = &model.embeddings.position;
    model.embeddings.position = table.narrow(0, 0, rows)?.contiguous()?;
    model.config.max_position_embeddings = rows;
    let obj = model
        .config
        .raw
        .as_object_mut()
        .context("config.json is an object")?;
    obj.insert("max_position_embeddings".into(), Value::from(rows));
    Ok(Some([rows, before]))
}

/// Token ids `config.json` names (`pad_token_id`…).
fn config_token_ids(raw: &Value) -> Vec<u32> {
    CONFIG_TOKEN_IDS
        .iter()
        .filter_map(|k| raw.get(k).and_then(Value::as_u64))
        .filter_map(|id| u32::try_from(id).ok())
        .collect()
}

/// `config.json` with its vocabulary size and token ids renumbered.
fn renumber_config(raw: &mut Value, kept: &KeptIds) -> Result<()> {
    let obj = raw.as_object_mut().context("config.json is an object")?;
    obj.insert("vocab_size".into(), Value::from(kept.len()));
    for key in CONFIG_TOKEN_IDS {
        if let Some(id) = obj.get(key).and_then(Value::as_u64) {
            let new = u32::try_from(id)
                .ok()
                .and_then(|i| kept.new_id(i))
                .with_context(|| format!("config.json {key} {id} is not kept"))?;
            obj.insert(key.into(), Value::from(new));
        }
    }
    Ok(())
}

/// `tokenizer.json` (always), and `vocab.txt` / `tokenizer_config.json` where the model had them.
fn tokenizer_files(model: &Model, tokenizer: &Tokenizer, kept: &KeptIds) -> Result<TokenizerFiles> {
    let json: Value = serde_json::from_str(
        &tokenizer
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))?,
    )?;
    let mut files = BTreeMap::new();
    files.insert(
        "tokenizer.json",
        pretty_json(&prune_tokenizer_json(&json, kept)?)?,
    );
    if model.dir.join("vocab.txt").is_file() {
        files.insert("vocab.txt", vocab_txt(tokenizer, kept)?);
    }
    let config = model.dir.join("tokenizer_config.json");
    if let Ok(text) = read_text(&config) {
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config.display()))?;
        files.insert(
            "tokenizer_config.json",
            pretty_json(&prune_tokenizer_config(&value, kept)?)?,
        );
    }
    Ok(TokenizerFiles(files))
}

/// Fails unless every text tokenizes with `pruned` to the renumbered tokens of `original`.
fn check_unchanged(
    original: &Tokenizer,
    pruned: &Tokenizer,
    texts: &[&str],
    kept: &KeptIds,
) -> Result<()> {
    let encode = |t: &Tokenizer| {
        let inputs: Vec<EncodeInput> = texts.iter().map(|&s| s.into()).collect();
        t.encode_batch(inputs, true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))
    };
    let (before, after) = (encode(original)?, encode(pruned)?);
    for ((text, a), b) in texts.iter().zip(&before).zip(&after) {
        let renumbered: Option<Vec<u32>> = a.get_ids().iter().map(|&i| kept.new_id(i)).collect();
        if renumbered.as_deref() != Some(b.get_ids()) {
            bail!(
                "vocabulary pruning would change the tokenization of {text:?}; please report this"
            );
        }
    }
    Ok(())
}
