//! Step 4b of a run: vocabulary pruning after the stages. It is exact on its corpus, so it takes
//! no decision; the data is then encoded anew with the pruned tokenizer, so the compressed model
//! is judged exactly as it will run (a text outside the corpus may now hold `[UNK]`s).

use anyhow::Result;
use serde::Serialize;

use super::evaluation::ModelOnData;
use super::{read_test, RunSettings};
use crate::data::batch::EncodedSet;
use crate::data::splits::Splits;
use crate::model::Model;
use crate::passes::vocab::{dataset_texts, file_texts, prune_vocabulary, VocabCorpus};
use crate::setup::TaskSetup;
use crate::text::tokenizer::TextEncoder;

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
}

impl VocabReport {
    /// One line: what was kept, and the unknown-token rate on dev.
    pub fn summary(&self) -> String {
        format!(
            "vocabulary: kept {} of {} tokens ({} texts of {}); [UNK] on dev {:.3}% -> {:.3}%",
            self.kept,
            self.of,
            self.corpus_texts,
            self.corpus,
            self.dev_unknown_rate_before * 100.0,
            self.dev_unknown_rate_after * 100.0
        )
    }
}

/// The compressed model with a pruned vocabulary, and the data as its tokenizer encodes it.
pub struct Pruned {
    /// The model.
    pub model: Model,
    /// Its report.
    pub report: VocabReport,
    /// Selection, report and dev, re-encoded.
    pub splits: Splits,
    /// `--test`, re-encoded.
    pub test: Option<EncodedSet>,
}

impl Pruned {
    /// The model with its data, for the judge.
    pub fn subject(&self) -> ModelOnData<'_> {
        ModelOnData {
            model: &self.model,
            splits: &self.splits,
            test: self.test.as_ref(),
        }
    }
}

/// Prunes `model`'s vocabulary to `corpus` and re-encodes the run's data with its tokenizer.
pub fn prune(
    corpus: &VocabCorpus,
    model: &Model,
    spec: &RunSettings,
    setup: &TaskSetup,
    splits: &Splits,
) -> Result<Pruned> {
    let (texts, name) = match corpus {
        VocabCorpus::Task => {
            let mut sets = Vec::new();
            for split in ["train", "dev"] {
                sets.extend(setup.data.split(split)?.into_iter().map(|(_, set)| set));
            }
            (dataset_texts(&sets), "train+dev".to_string())
        }
        VocabCorpus::File(path) => (file_texts(path)?, path.display().to_string()),
    };
    let (pruned, kept) = prune_vocabulary(model, &texts)?;
    let encoder = pruned.text_encoder(setup.max_length)?;
    // The same examples as before: a selection labelled by the input model keeps its labels.
    let same_labels = |_: &EncodedSet| Ok(splits.selection.set.targets.clone());
    let new_splits = Splits::load(&spec.selection, &setup.data, &encoder, &same_labels)?;
    let new_splits = match &splits.check {
        Some(check) => {
            let same_check_labels = |_: &EncodedSet| Ok(check.set.targets.clone());
            new_splits.with_check(&spec.selection, &setup.data, &encoder, &same_check_labels)?
        }
        None => new_splits,
    };
    let test = spec
        .test
        .as_deref()
        .map(|p| read_test(spec.task, p, &encoder))
        .transpose()?;
    let report = VocabReport {
        corpus: name,
        corpus_texts: texts.len(),
        kept: kept.len(),
        of: model.config.vocab_size,
        dev_unknown_rate_before: unknown_rate(&splits.dev, &setup.encoder),
        dev_unknown_rate_after: unknown_rate(&new_splits.dev, &encoder),
    };
    Ok(Pruned {
        model: pruned,
        report,
        splits: new_splits,
        test,
    })
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
