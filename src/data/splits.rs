//! Honest data: the *selection* split that decisions are taken on, and the *report* split and the
//! whole dev split that show how the decisions hold on data they did not see.
//!
//! A fine-tuned model has usually seen every training example, so by default the selection data
//! is a seeded part (`select_fraction`) of the dev/validation split and the rest of dev is the
//! report split. `train-holdout` (a seeded sample of train) is for models known never to have
//! seen those examples. `train-perturbed` takes such a sample, replaces a fifth of its words
//! ([`replace_words`]) and labels the new sentences with the input model's own predictions: the
//! selection metric is then agreement with the input on text it has not seen, and all of dev is
//! the report split. A labelled file can be given too.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::batch::{encode, EncodedSet};
use super::glue::{self, Dataset, Target};
use super::perturb::{replace_words, REPLACED_SHARE};
use super::sample::sample_indices;
use super::source::TaskData;
use crate::text::tokenizer::TextEncoder;

/// Which data decisions are taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectOn {
    /// A seeded part of the dev split; the rest is the report split.
    Dev,
    /// A seeded sample of the train split (only honest when the model never saw it).
    TrainHoldout,
    /// A seeded sample of the train split with words replaced, labelled by the input model.
    TrainPerturbed,
    /// A labelled TSV file of the task.
    File(PathBuf),
}

impl SelectOn {
    /// The sources that are not files, by name.
    const NAMED: [(&'static str, SelectOn); 3] = [
        ("dev", SelectOn::Dev),
        ("train-holdout", SelectOn::TrainHoldout),
        ("train-perturbed", SelectOn::TrainPerturbed),
    ];

    /// Parses `dev`, `train-holdout`, `train-perturbed` or a file path: a value with a `/`, `\`
    /// or `.` in it. Anything else is refused as a mistyped name, not read as a file.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let named = |wanted: &str| Self::NAMED.into_iter().find(|(name, _)| *name == wanted);
        if let Some((_, on)) = named(s) {
            return Ok(on);
        }
        if s.contains(['/', '\\', '.']) {
            return Ok(SelectOn::File(PathBuf::from(s)));
        }
        let hint = named(&s.to_lowercase().replace('_', "-")).map_or(String::new(), |(name, _)| {
            format!(" (did you mean `{name}`?)")
        });
        let names: Vec<&str> = Self::NAMED.iter().map(|(name, _)| *name).collect();
        let (last, others) = names.split_last().expect("named sources");
        Err(format!(
            "`{s}` is not {} or {last}{hint}; a labelled TSV file needs a path with a `/` or an \
             extension, e.g. ./{s}.tsv",
            others.join(", ")
        ))
    }
}

/// How the selection data is drawn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelectionSpec {
    /// The source.
    pub on: SelectOn,
    /// Under [`SelectOn::Dev`]: the fraction of dev used for selection (0 < f ≤ 1).
    pub select_fraction: f64,
    /// Under [`SelectOn::TrainHoldout`] and [`SelectOn::TrainPerturbed`]: examples sampled from
    /// train.
    pub holdout: usize,
    /// Seed of the dev split or the train sample.
    pub seed: u64,
    /// Keep only the first N selection examples (quick looks).
    pub limit: Option<usize>,
}

impl Default for SelectionSpec {
    /// Half of dev, seed 0 (a train hold-out would be 2000 examples).
    fn default() -> Self {
        SelectionSpec {
            on: SelectOn::Dev,
            select_fraction: 0.5,
            holdout: 2000,
            seed: 0,
            limit: None,
        }
    }
}

/// Which data a part is and where it came from (recorded in every report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// `dev-split` (seeded part of dev), `dev-rest` (the dev examples not selected), `dev`,
    /// `train-holdout`, `train-perturbed` (labelled by the input model) or `file`.
    pub source: String,
    /// The file read (a TSV file, or the first parquet file of a hub split).
    pub path: String,
    /// Examples used.
    pub examples: usize,
    /// Examples the file holds.
    pub available: usize,
    /// Sampling seed (seeded parts only).
    pub seed: Option<u64>,
    /// Fraction of dev drawn for selection (`dev-split` only).
    #[serde(default)]
    pub fraction: Option<f64>,
}

/// One tokenised part of the data with its description.
#[derive(Debug, Clone)]
pub struct Part {
    /// The examples, tokenised.
    pub set: EncodedSet,
    /// What they are.
    pub info: DataInfo,
    /// Positions of the examples in the dev split, when they are a part of it.
    pub dev_indices: Option<Vec<usize>>,
    /// Positions of the examples in the train split, when drawn from it: training in the run
    /// leaves them out, so the data that judges a training run is not trained on.
    pub train_indices: Option<Vec<usize>>,
}

/// Selection, report and dev data of one run.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Decisions are taken on this.
    pub selection: Part,
    /// Dev examples the decisions did not see (`None` when selection took all of dev).
    pub report: Option<Part>,
    /// The whole dev split (MNLI: the matched file).
    pub dev: EncodedSet,
    /// Perturbed train sentences labelled by the input model that no decision sees, for the
    /// run's final check of its floor ([`Splits::with_check`]); training leaves their originals
    /// out too.
    pub check: Option<Part>,
}

/// Sentences of the check split, at most (and at most half of the train sentences outside the
/// selection, so training keeps the other half).
pub const CHECK_SENTENCES: usize = 2000;

/// The input model's answers for a tokenised set (labels of a `train-perturbed` selection).
pub type Labeller<'a> = &'a dyn Fn(&EncodedSet) -> Result<Vec<Target>>;

impl Splits {
    /// Reads, splits and tokenises the data of a run; `label` answers for the input model when
    /// the selection is labelled by it.
    pub fn load(
        spec: &SelectionSpec,
        data: &TaskData,
        encoder: &TextEncoder,
        label: Labeller,
    ) -> Result<Self> {
        if !(spec.select_fraction > 0.0 && spec.select_fraction <= 1.0) {
            bail!(
                "--select-fraction {} is out of range: use a fraction in (0, 1], e.g. 0.5",
                spec.select_fraction
            );
        }
        let dev_data = data.first("dev")?;
        let dev = encode(&dev_data, "", encoder)?;
        let n = dev.sequences.len();
        let (mut selection, chosen) = match &spec.on {
            SelectOn::Dev => {
                let k = ((n as f64 * spec.select_fraction).round() as usize).clamp(1, n);
                let picked = sample_indices(n, k, spec.seed);
                let info = info("dev-split", &dev_data, k, Some(spec.seed));
                let part = Part {
                    set: dev.subset(&picked),
                    info: DataInfo {
                        fraction: Some(spec.select_fraction),
                        ..info
                    },
                    dev_indices: Some(picked.clone()),
                    train_indices: None,
                };
                (part, picked)
            }
            SelectOn::TrainHoldout => (train_holdout(spec, data, encoder, false)?, Vec::new()),
            SelectOn::TrainPerturbed => (train_holdout(spec, data, encoder, true)?, Vec::new()),
            SelectOn::File(path) => (labelled_file(path, data, encoder)?, Vec::new()),
        };
        if let Some(limit) = spec.limit {
            selection.truncate(limit);
        }
        if selection.set.sequences.is_empty() {
            bail!(
                "{}: the selection data is empty (check --limit / --holdout)",
                selection.info.path
            );
        }
        if spec.on == SelectOn::TrainPerturbed {
            selection.set.targets = label(&selection.set)?;
        }
        let rest_of_split = (spec.on == SelectOn::Dev).then_some(spec.seed);
        let report = report_part(&dev, &dev_data, &chosen, rest_of_split);
        Ok(Splits {
            selection,
            report,
            dev,
            check: None,
        })
    }

    /// Adds the check split: up to [`CHECK_SENTENCES`] train sentences outside the selection,
    /// drawn and perturbed like `train-perturbed` with their own seed, labelled by `label` (the
    /// input model). None when the task has no train split or nothing is left of it.
    pub fn with_check(
        mut self,
        spec: &SelectionSpec,
        data: &TaskData,
        encoder: &TextEncoder,
        label: Labeller,
    ) -> Result<Self> {
        let Ok(train) = data.first("train") else {
            return Ok(self);
        };
        let held_out = self.selection.train_indices.as_deref().unwrap_or_default();
        let left = train.examples.len().saturating_sub(held_out.len());
        let k = CHECK_SENTENCES.min(left / 2);
        if k == 0 {
            return Ok(self);
        }
        let seed = spec.seed ^ CHECK_SEED;
        let picked = draw(train.examples.len(), Some(k), seed, held_out);
        let subset = replace_words(&train.subset(&picked), REPLACED_SHARE, seed);
        let mut set = encode(&subset, "", encoder)?;
        set.targets = label(&set)?;
        let mut info = info("check", &subset, k, Some(seed));
        info.available = train.examples.len();
        self.check = Some(Part {
            set,
            info,
            dev_indices: None,
            train_indices: Some(picked),
        });
        Ok(self)
    }

    /// The train positions no training may use: the selection's and the check's originals.
    pub fn held_out_train(&self) -> Vec<usize> {
        std::iter::once(&self.selection)
            .chain(&self.check)
            .flat_map(|p| p.train_indices.iter().flatten().copied())
            .collect()
    }
}

/// Mixed into the selection seed for the check split's draw and perturbation.
const CHECK_SEED: u64 = 0x00c4_ec4e;

impl Part {
    /// Keeps the first `limit` examples.
    fn truncate(&mut self, limit: usize) {
        let keep: Vec<usize> = (0..self.set.sequences.len().min(limit)).collect();
        self.set = self.set.subset(&keep);
        self.info.examples = keep.len();
        for idx in [&mut self.dev_indices, &mut self.train_indices]
            .into_iter()
            .flatten()
        {
            idx.truncate(keep.len());
        }
    }
}

/// The dev examples not in `chosen` (all of dev when selection came from elsewhere); `split_seed`
/// is the seed of the dev split when selection took part of dev.
fn report_part(
    dev: &EncodedSet,
    file: &Dataset,
    chosen: &[usize],
    split_seed: Option<u64>,
) -> Option<Part> {
    let others = complement(dev.sequences.len(), chosen);
    if others.is_empty() {
        return None;
    }
    let source = if split_seed.is_some() {
        "dev-rest"
    } else {
        "dev"
    };
    Some(Part {
        set: dev.subset(&others),
        info: info(source, file, others.len(), split_seed),
        dev_indices: Some(others),
        train_indices: None,
    })
}

/// A seeded sample of train; `perturbed`: with a share of its words replaced (seeded too).
fn train_holdout(
    spec: &SelectionSpec,
    data: &TaskData,
    encoder: &TextEncoder,
    perturbed: bool,
) -> Result<Part> {
    let train = data.first("train").context(
        "the selection data is sampled from the task's train split (--on train-perturbed is the \
         default under size and speed modes); add the train split, or pass --on dev",
    )?;
    let picked = draw(train.examples.len(), Some(spec.holdout), spec.seed, &[]);
    let mut subset = train.subset(&picked);
    let source = if perturbed {
        subset = replace_words(&subset, REPLACED_SHARE, spec.seed);
        "train-perturbed"
    } else {
        "train-holdout"
    };
    let mut info = info(source, &subset, subset.examples.len(), Some(spec.seed));
    info.available = train.examples.len();
    Ok(Part {
        set: encode(&subset, "", encoder)?,
        info,
        dev_indices: None,
        train_indices: Some(picked),
    })
}

/// `k` examples of the train split drawn with `seed` from those not in `held_out` (positions in
/// the train split), in file order (all of them when `k` is `None` or larger), and the number
/// there were to draw from.
pub fn train_sample(
    data: &TaskData,
    k: Option<usize>,
    seed: u64,
    held_out: &[usize],
) -> Result<(Dataset, usize)> {
    let train = data.first("train")?;
    let n = train.examples.len();
    let picked = draw(n, k, seed, held_out);
    Ok((train.subset(&picked), n - held_out.len()))
}

/// Positions of `k` of `0..n` outside `held_out`, drawn with `seed`, ascending (all of them when
/// `k` is `None` or larger); with nothing held out, exactly [`sample_indices`]`(n, k, seed)`.
fn draw(n: usize, k: Option<usize>, seed: u64, held_out: &[usize]) -> Vec<usize> {
    let pool = complement(n, held_out);
    sample_indices(pool.len(), k.unwrap_or(pool.len()), seed)
        .into_iter()
        .map(|i| pool[i])
        .collect()
}

/// The positions of `0..n` not in `taken`, ascending.
fn complement(n: usize, taken: &[usize]) -> Vec<usize> {
    let mut is_taken = vec![false; n];
    for &i in taken {
        is_taken[i] = true;
    }
    (0..n).filter(|&i| !is_taken[i]).collect()
}

fn labelled_file(path: &std::path::Path, data: &TaskData, encoder: &TextEncoder) -> Result<Part> {
    if !path.is_file() {
        bail!(
            "--on {}: no such file; use dev, train-holdout, train-perturbed or a labelled TSV file",
            path.display()
        );
    }
    let file = glue::read(data.task, path)?;
    Ok(Part {
        set: encode(&file, "", encoder)?,
        info: info("file", &file, file.examples.len(), None),
        dev_indices: None,
        train_indices: None,
    })
}

fn info(source: &str, file: &Dataset, examples: usize, seed: Option<u64>) -> DataInfo {
    DataInfo {
        source: source.to_string(),
        path: file.path.display().to_string(),
        examples,
        available: file.examples.len(),
        seed,
        fraction: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::task::Task;

    /// A GLUE SST-2 directory with `n` dev and `n` train rows, and a WordPiece tokenizer for them.
    fn fixture(n: usize) -> (tempfile::TempDir, TaskData, TextEncoder) {
        let dir = tempfile::tempdir().unwrap();
        for split in ["dev", "train"] {
            let rows: String = (0..n)
                .map(|i| format!("{} film {i}\t{}\n", ["good", "bad"][i % 2], 1 - i % 2))
                .collect();
            std::fs::write(
                dir.path().join(format!("{split}.tsv")),
                format!("sentence\tlabel\n{rows}"),
            )
            .unwrap();
        }
        let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\ngood\nbad\nfilm\n";
        std::fs::write(dir.path().join("vocab.txt"), vocab).unwrap();
        let data = TaskData::resolve(Task::Sst2, Some(dir.path()), true).unwrap();
        let encoder = TextEncoder::load(dir.path(), 16).unwrap();
        (dir, data, encoder)
    }

    /// The labeller of runs whose selection has gold labels: never asked.
    fn unlabelled(_: &EncodedSet) -> Result<Vec<Target>> {
        panic!("only a train-perturbed selection asks the input model for labels")
    }

    fn spec(on: SelectOn, fraction: f64, seed: u64) -> SelectionSpec {
        SelectionSpec {
            on,
            select_fraction: fraction,
            seed,
            ..SelectionSpec::default()
        }
    }

    #[test]
    fn dev_split_is_seeded_and_the_report_split_is_the_rest() {
        let (_dir, data, encoder) = fixture(40);
        let s = Splits::load(&spec(SelectOn::Dev, 0.25, 7), &data, &encoder, &unlabelled).unwrap();
        let chosen = s.selection.dev_indices.clone().unwrap();
        let rest = s.report.as_ref().unwrap().dev_indices.clone().unwrap();
        assert_eq!((chosen.len(), rest.len()), (10, 30));
        let mut all: Vec<usize> = chosen.iter().chain(&rest).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
        assert_eq!(s.selection.set.targets[0], s.dev.targets[chosen[0]]);
        assert_eq!(s.selection.info.source, "dev-split");
        assert_eq!(s.report.as_ref().unwrap().info.source, "dev-rest");
        let again =
            Splits::load(&spec(SelectOn::Dev, 0.25, 7), &data, &encoder, &unlabelled).unwrap();
        assert_eq!(again.selection.dev_indices, Some(chosen.clone()));
        let other =
            Splits::load(&spec(SelectOn::Dev, 0.25, 8), &data, &encoder, &unlabelled).unwrap();
        assert_ne!(other.selection.dev_indices, Some(chosen));
    }

    /// The splits of a 12-row fixture with a train-holdout of 5 drawn with `seed`.
    fn holdout_of_5(seed: u64) -> (tempfile::TempDir, TaskData, Splits) {
        let (dir, data, encoder) = fixture(12);
        let mut s = spec(SelectOn::TrainHoldout, 0.5, seed);
        s.holdout = 5;
        let splits = Splits::load(&s, &data, &encoder, &unlabelled).unwrap();
        (dir, data, splits)
    }

    #[test]
    fn train_holdout_leaves_all_of_dev_for_the_report() {
        let (_dir, _data, s) = holdout_of_5(0);
        assert_eq!(s.selection.info.source, "train-holdout");
        assert_eq!(s.selection.set.sequences.len(), 5);
        assert_eq!(s.report.unwrap().set.sequences.len(), 12);
    }

    #[test]
    fn train_perturbed_changes_words_takes_the_model_labels_and_is_held_out_of_training() {
        let (_dir, data, encoder) = fixture(40);
        let mut s = spec(SelectOn::TrainPerturbed, 0.5, 4);
        (s.holdout, s.limit) = (20, Some(15));
        let asked = std::cell::Cell::new(0);
        let label = |set: &EncodedSet| -> Result<Vec<Target>> {
            asked.set(set.sequences.len());
            Ok(vec![Target::Class(0); set.sequences.len()])
        };
        let splits = Splits::load(&s, &data, &encoder, &label).unwrap();
        let selection = &splits.selection;
        assert_eq!(selection.info.source, "train-perturbed");
        assert_eq!(asked.get(), 15, "labelled after --limit");
        assert!(selection.set.targets.iter().all(|t| *t == Target::Class(0)));
        let picked = selection.train_indices.clone().unwrap();
        assert_eq!(picked, sample_indices(40, 20, 4)[..15]);
        let original = encode(&data.first("train").unwrap().subset(&picked), "", &encoder);
        let changed = (original.unwrap().sequences.iter())
            .zip(&selection.set.sequences)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            (1..15).contains(&changed),
            "{changed} of 15 sentences changed"
        );
        assert_eq!(splits.report.unwrap().set.sequences.len(), 40);
    }

    #[test]
    fn the_check_split_takes_half_of_the_train_left_perturbed_labelled_and_held_out_of_training() {
        let (_dir, data, encoder) = fixture(40);
        let mut s = spec(SelectOn::TrainPerturbed, 0.5, 4);
        s.holdout = 10;
        let label = |set: &EncodedSet| Ok(vec![Target::Class(1); set.sequences.len()]);
        let splits = Splits::load(&s, &data, &encoder, &label).unwrap();
        assert!(splits.check.is_none(), "only with_check draws it");
        let splits = splits.with_check(&s, &data, &encoder, &label).unwrap();
        let check = splits.check.as_ref().unwrap();
        assert_eq!(check.info.source, "check");
        // 30 train sentences are left outside the selection: the check takes 15.
        let picked = check.train_indices.clone().unwrap();
        assert_eq!(picked.len(), 15);
        let selection = splits.selection.train_indices.clone().unwrap();
        assert!(
            picked.iter().all(|i| !selection.contains(i)),
            "{picked:?} {selection:?}"
        );
        assert!(check.set.targets.iter().all(|t| *t == Target::Class(1)));
        let original = encode(&data.first("train").unwrap().subset(&picked), "", &encoder);
        assert_ne!(
            original.unwrap().sequences,
            check.set.sequences,
            "perturbed"
        );
        let mut held = splits.held_out_train();
        held.sort_unstable();
        let mut both: Vec<usize> = selection.iter().chain(&picked).copied().collect();
        both.sort_unstable();
        assert_eq!(held, both);
        // Seeded: the same spec draws the same check; dev selection draws from all of train.
        let again = Splits::load(&s, &data, &encoder, &label)
            .unwrap()
            .with_check(&s, &data, &encoder, &label)
            .unwrap();
        assert_eq!(again.check.unwrap().train_indices, Some(picked));
        let dev = spec(SelectOn::Dev, 0.5, 4);
        let on_dev = Splits::load(&dev, &data, &encoder, &unlabelled)
            .unwrap()
            .with_check(&dev, &data, &encoder, &label)
            .unwrap();
        assert_eq!(on_dev.held_out_train().len(), 20);
        assert_eq!(on_dev.check.unwrap().set.sequences.len(), 20);
    }

    #[test]
    fn training_samples_leave_the_train_holdout_out_and_are_unchanged_without_one() {
        let (_dir, data, s) = holdout_of_5(3);
        let train = data.first("train").unwrap();
        let texts = |idx: &[usize]| -> Vec<String> {
            idx.iter()
                .map(|&i| train.examples[i].text_a.clone())
                .collect()
        };
        let held_out = s.selection.train_indices.clone().unwrap();
        assert_eq!(held_out, sample_indices(12, 5, 3));
        let (rest, available) = train_sample(&data, None, 0, &held_out).unwrap();
        assert_eq!((rest.examples.len(), available), (7, 7));
        let held = texts(&held_out);
        assert!(rest.examples.iter().all(|e| !held.contains(&e.text_a)));
        let (plain, n) = train_sample(&data, Some(4), 9, &[]).unwrap();
        let drawn: Vec<String> = plain.examples.iter().map(|e| e.text_a.clone()).collect();
        assert_eq!((drawn, n), (texts(&sample_indices(12, 4, 9)), 12));
    }

    #[test]
    fn all_of_dev_leaves_no_report_split_and_bad_fractions_are_refused() {
        let (_dir, data, encoder) = fixture(6);
        let s = Splits::load(&spec(SelectOn::Dev, 1.0, 0), &data, &encoder, &unlabelled).unwrap();
        assert!(s.report.is_none());
        for bad in [0.0, 1.5, f64::NAN] {
            let err = Splits::load(&spec(SelectOn::Dev, bad, 0), &data, &encoder, &unlabelled)
                .unwrap_err();
            assert!(err.to_string().contains("--select-fraction"), "{err}");
        }
    }
}
