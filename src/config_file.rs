//! `compress` configs: a TOML file declaring a whole run — model, task, data, selection,
//! tolerance, the stages in order with their settings, and the output — turned into the same
//! [`RunSettings`] the command-line flags build. Unknown keys are errors naming the key, the
//! file and the line. Relative paths are relative to the config file's directory.
//!
//! ```toml
//! model = "../models/minilm-l6-sst2"   # directory or hub id
//! task = "sst2"
//! max_drop = 1.0                       # points, or "2%"
//! confidence = 0.9                     # of the one-sided bound every decision keeps
//! vocab = "corpus"                     # optional: keep the train + dev vocabulary
//!
//! [selection]
//! on = "dev"
//! select_fraction = 0.5
//!
//! [[stages]]
//! pass = "prune"
//! mode = "size"
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::data::splits::{SelectOn, SelectionSpec};
use crate::data::task::Task;
use crate::fsutil::read_text;
use crate::model::runtime::Runtime;
use crate::model::source::HubAccess;
use crate::model::storage::StorageDtype;
use crate::passes::vocab::{VocabChoice, VocabSettings};
use crate::pipeline::tolerance::MaxDrop;
use crate::pipeline::{default_selection, with_vocab, RunSettings, StageSpec};
use crate::scoring::guard::DEFAULT_CONFIDENCE;

/// A config as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    model: String,
    task: Task,
    data: Option<PathBuf>,
    #[serde(default)]
    offline: bool,
    revision: Option<String>,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    max_length: Option<usize>,
    max_drop: Option<MaxDrop>,
    confidence: Option<f64>,
    vocab: Option<VocabChoice>,
    vocab_corpus: Option<PathBuf>,
    dtype: Option<StorageDtype>,
    #[serde(default)]
    onnx: bool,
    out: Option<PathBuf>,
    #[serde(default)]
    selection: Selection,
    stages: Vec<StageSpec>,
}

/// The `[selection]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    on: Option<String>,
    select_fraction: Option<f64>,
    holdout: Option<usize>,
    seed: Option<u64>,
    limit: Option<usize>,
    test: Option<PathBuf>,
}

fn default_batch_size() -> usize {
    32
}

/// A loaded config: the run's settings and the output directory it names, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The run.
    pub settings: RunSettings,
    /// `out`, when the file gives one.
    pub out: Option<PathBuf>,
}

/// Reads a config file.
pub fn load(path: &Path) -> Result<Config> {
    let text = read_text(path).context("cannot read the config")?;
    parse(&text, path)
}

/// Parses the text of the config file at `path` (relative paths in it are taken from its
/// directory).
pub fn parse(text: &str, path: &Path) -> Result<Config> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1)
            .map_or(String::new(), |l| format!(":{l}"));
        anyhow::anyhow!(
            "{}{line}: {}",
            path.display(),
            e.message().lines().next().unwrap_or_default()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    file.resolve(base)
        .with_context(|| format!("config {}", path.display()))
}

impl File {
    fn resolve(self, base: &Path) -> Result<Config> {
        if self.stages.is_empty() {
            bail!("no [[stages]]: add at least one stage, e.g. [[stages]] pass = \"prune\"");
        }
        let rel = |p: PathBuf| base.join(p);
        let stages: Vec<StageSpec> = self
            .stages
            .into_iter()
            .map(|stage| stage.with_paths_from(base))
            .collect();
        let defaults = default_selection(&stages);
        let s = self.selection;
        let on = s.on.as_deref().map(SelectOn::parse).transpose();
        let on = on.map_err(|e| anyhow::anyhow!("[selection] on: {e}"))?;
        let on = match on {
            Some(SelectOn::File(f)) => SelectOn::File(rel(f)),
            Some(other) => other,
            None => defaults.on,
        };
        let selection = SelectionSpec {
            on,
            select_fraction: s.select_fraction.unwrap_or(defaults.select_fraction),
            holdout: s.holdout.unwrap_or(defaults.holdout),
            seed: s.seed.unwrap_or(defaults.seed),
            limit: s.limit,
        };
        Ok(Config {
            settings: RunSettings {
                model: model_spec(base, &self.model),
                hub: HubAccess {
                    offline: self.offline,
                    revision: self.revision,
                },
                task: self.task,
                data: self.data.map(rel),
                batch_size: self.batch_size,
                max_length: self.max_length,
                selection,
                test: s.test.map(rel),
                max_drop: self.max_drop,
                confidence: self.confidence.unwrap_or(DEFAULT_CONFIDENCE),
                stages: with_vocab(
                    stages,
                    VocabSettings::from_flags(self.vocab, self.vocab_corpus.map(rel)),
                ),
                dtype: self.dtype,
                onnx: self.onnx,
                runtime: Runtime::default(),
            },
            out: self.out.map(rel),
        })
    }
}

/// A model named in a config: a directory relative to the config, unless it is a hub id.
fn model_spec(base: &Path, model: &str) -> String {
    let joined = base.join(model);
    if joined.exists() || !crate::model::source::looks_like_hub_id(model) {
        joined.display().to_string()
    } else {
        model.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::goal::Mode;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_a_config_with_paths_relative_to_it() {
        let (dir, path) = write(
            "model = \"../models/m\"\ntask = \"sst2\"\nmax_drop = \"2%\"\n\
             [selection]\nselect_fraction = 0.25\ntest = \"t.tsv\"\n\
             [[stages]]\npass = \"prune\"\nmode = \"size\"\nbudget = 4\n",
        );
        let c = load(&path).unwrap();
        let s = &c.settings;
        assert_eq!(
            s.model,
            dir.path().join("../models/m").display().to_string()
        );
        assert_eq!(s.task, Task::Sst2);
        assert_eq!(s.max_drop, Some(MaxDrop::Relative(0.02)));
        assert_eq!(s.selection.select_fraction, 0.25);
        // A size-mode prune decides on perturbed train sentences unless the config says otherwise.
        assert_eq!(s.selection.on, SelectOn::TrainPerturbed);
        assert_eq!(s.test, Some(dir.path().join("t.tsv")));
        let StageSpec::Prune(p) = &s.stages[0] else {
            panic!("the first stage is prune: {:?}", s.stages[0]);
        };
        assert_eq!((p.mode, p.budget, p.patience), (Mode::Size, Some(4), 20));
        assert_eq!(c.out, None);
    }

    #[test]
    fn every_prune_mode_decides_on_perturbed_train_sentences_unless_told_otherwise() {
        let stages = "[[stages]]\npass = \"prune\"\nmode = \"accuracy\"\n";
        let (_dir, path) = write(&format!("model = \"m\"\ntask = \"sst2\"\n{stages}"));
        let on = load(&path).unwrap().settings.selection.on;
        assert_eq!(on, SelectOn::TrainPerturbed);
        let quantize = "[[stages]]\npass = \"quantize\"\n";
        let (_dir, path) = write(&format!("model = \"m\"\ntask = \"sst2\"\n{quantize}"));
        assert_eq!(load(&path).unwrap().settings.selection.on, SelectOn::Dev);
        let told = format!("model = \"m\"\ntask = \"sst2\"\n[selection]\non = \"dev\"\n{stages}");
        let (_dir, path) = write(&told.replace("accuracy", "speed"));
        assert_eq!(load(&path).unwrap().settings.selection.on, SelectOn::Dev);
    }

    #[test]
    fn hub_ids_stay_hub_ids() {
        let (_dir, path) =
            write("model = \"org/name\"\ntask = \"rte\"\n[[stages]]\npass = \"prune\"\n");
        assert_eq!(load(&path).unwrap().settings.model, "org/name");
    }

    #[test]
    fn a_mistyped_selection_source_is_an_error_not_a_file() {
        let text = "model = \"m\"\ntask = \"sst2\"\n[selection]\non = \"train_holdout\"\n[[stages]]\npass = \"prune\"\n";
        let (_dir, path) = write(text);
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("[selection] on: `train_holdout`"), "{err}");
        assert!(err.contains("did you mean `train-holdout`"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        let (_dir, path) = write(&text.replace("train_holdout", "mine.tsv"));
        let on = load(&path).unwrap().settings.selection.on;
        assert_eq!(on, SelectOn::File(path.parent().unwrap().join("mine.tsv")));
    }

    #[test]
    fn unknown_keys_name_the_key_file_and_line() {
        for (text, key, line) in [
            ("model = \"m\"\ntask = \"sst2\"\nmax_dorp = 1\n[[stages]]\npass = \"prune\"\n", "max_dorp", 3),
            // Inside a stage, the line is the stage's `[[stages]]` header.
            ("model = \"m\"\ntask = \"sst2\"\n[[stages]]\npass = \"prune\"\nbudgt = 3\n", "budgt", 3),
            ("model = \"m\"\ntask = \"sst2\"\n[selection]\nfraction = 0.5\n[[stages]]\npass = \"prune\"\n", "fraction", 4),
        ] {
            let (_dir, path) = write(text);
            let err = format!("{:#}", load(&path).unwrap_err());
            assert!(err.contains(key), "{err}");
            assert!(err.contains(&format!("run.toml:{line}:")), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn a_config_without_stages_or_with_an_unknown_pass_is_refused() {
        let (_dir, path) = write("model = \"m\"\ntask = \"sst2\"\nstages = []\n");
        assert!(format!("{:#}", load(&path).unwrap_err()).contains("no [[stages]]"));
        let (_dir, path) = write("model = \"m\"\ntask = \"sst2\"\n[[stages]]\npass = \"shrink\"\n");
        assert!(format!("{:#}", load(&path).unwrap_err()).contains("shrink"));
    }
}
