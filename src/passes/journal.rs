//! The progress of a run, saved beside its output after every decision so that an interrupted
//! run can be resumed without redoing accepted work.
//!
//! A run is a sequence of *steps* (e.g. one pruning level), each with the candidates it visits
//! (computed once — significance analysis is the expensive part) and the verdicts of the trials
//! decided so far. On resume, every step replays its recorded candidates and verdicts instead of
//! recomputing them, then carries on where the run stopped; since the decisions are the same,
//! the result is the same as an uninterrupted run's. A key derived from the model and every
//! setting guards against resuming a different run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil::{read_text, write_atomic};
use crate::interrupt;
use crate::scoring::score::Score;

/// Schema identifier of the progress file.
const SCHEMA: &str = "axcompress.progress.v1";

/// The recorded verdict of one trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    /// What was tried, e.g. `L3.H5`.
    pub label: String,
    /// Whether it was kept.
    pub accepted: bool,
    /// The selection score with it, when the evaluation ran to the end.
    pub score: Option<Score>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    name: String,
    candidates: Value,
    trials: Vec<TrialRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    schema: String,
    key: String,
    steps: Vec<Step>,
}

/// The progress of the current run, and what a resumed run replays.
pub struct Journal {
    path: Option<PathBuf>,
    progress: Progress,
    /// Steps begun by this run; the current step is the last of them.
    begun: usize,
    /// Next recorded trial of the current step to replay.
    replayed: usize,
    /// Whether the progress was read from a saved run.
    resumed: bool,
    /// Checkpoint files handed out (removed when the run finishes).
    checkpoints: Vec<PathBuf>,
}

impl Journal {
    /// A journal that saves nothing (library use, tests).
    pub fn in_memory() -> Self {
        Self::fresh(None, String::new())
    }

    /// Opens the progress file at `path` for a run identified by `key`: with `resume`, the saved
    /// progress is replayed; otherwise an existing file is an error (an interrupted run that the
    /// user should resume or discard).
    pub fn open(path: &Path, key: &str, resume: bool) -> Result<Self> {
        interrupt::set_progress(Some(path));
        if !path.exists() {
            return Ok(Self::fresh(Some(path.to_path_buf()), key.to_string()));
        }
        if !resume {
            bail!(
                "{}: an interrupted run left its progress here; pass --resume to continue it, or --force to start over",
                path.display()
            );
        }
        let text = read_text(path)?;
        let progress: Progress = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a progress file of axcompress", path.display()))?;
        if progress.schema != SCHEMA || progress.key != key {
            bail!(
                "{}: the saved progress belongs to another run (different model, data or settings); pass --force to start over",
                path.display()
            );
        }
        Ok(Journal {
            path: Some(path.to_path_buf()),
            progress,
            begun: 0,
            replayed: 0,
            resumed: true,
            checkpoints: Vec::new(),
        })
    }

    fn fresh(path: Option<PathBuf>, key: String) -> Self {
        Journal {
            path,
            progress: Progress {
                schema: SCHEMA.to_string(),
                key,
                steps: Vec::new(),
            },
            begun: 0,
            replayed: 0,
            resumed: false,
            checkpoints: Vec::new(),
        }
    }

    /// Starts the next step: returns its recorded candidates, or computes, records and returns
    /// them.
    pub fn begin_step<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        compute: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let index = self.begun;
        self.begun += 1;
        self.replayed = 0;
        if let Some(step) = self.progress.steps.get(index) {
            if step.name != name {
                bail!("the saved progress has step \"{}\" where this run has \"{name}\"; pass --force to start over", step.name);
            }
            return serde_json::from_value(step.candidates.clone())
                .context("the saved progress holds malformed candidates");
        }
        let candidates = compute()?;
        self.progress.steps.push(Step {
            name: name.to_string(),
            candidates: serde_json::to_value(&candidates)?,
            trials: Vec::new(),
        });
        self.save()?;
        Ok(candidates)
    }

    /// The recorded verdict of the next trial of this step, if the saved run got that far.
    pub fn replay(&mut self, label: &str) -> Result<Option<TrialRecord>> {
        let Some(record) = self.current()?.trials.get(self.replayed).cloned() else {
            return Ok(None);
        };
        if record.label != label {
            bail!(
                "the saved progress tried {} where this run tries {label}; pass --force to start over",
                record.label
            );
        }
        self.replayed += 1;
        Ok(Some(record))
    }

    /// Records a new verdict of this step and saves the progress.
    pub fn record(&mut self, record: TrialRecord) -> Result<()> {
        self.current_mut()?.trials.push(record);
        self.replayed += 1;
        self.save()
    }

    /// Where the current step keeps a checkpoint (`<out>.progress.<tag>.safetensors`, beside
    /// the progress file) and the key naming this run in it; `None` for an in-memory journal. A
    /// run that is not resumed starts without the checkpoint an earlier run left there.
    pub fn checkpoint(&mut self, tag: &str) -> Result<Option<(PathBuf, String)>> {
        let Some(progress) = &self.path else {
            return Ok(None);
        };
        let path = progress.with_extension(format!("{tag}.safetensors"));
        if !self.resumed && path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        self.checkpoints.push(path.clone());
        Ok(Some((path, format!("{}:{tag}", self.progress.key))))
    }

    /// Deletes the progress file and the checkpoints (the run finished).
    pub fn finish(self) -> Result<()> {
        interrupt::set_progress(None);
        for c in self.checkpoints.iter().filter(|c| c.exists()) {
            std::fs::remove_file(c).with_context(|| format!("cannot remove {}", c.display()))?;
        }
        match &self.path {
            Some(p) if p.exists() => {
                std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))
            }
            _ => Ok(()),
        }
    }

    fn current(&self) -> Result<&Step> {
        let index = self.begun.checked_sub(1);
        index
            .and_then(|i| self.progress.steps.get(i))
            .context("no step begun in the progress journal")
    }

    fn current_mut(&mut self) -> Result<&mut Step> {
        let index = self.begun.checked_sub(1);
        index
            .and_then(|i| self.progress.steps.get_mut(i))
            .context("no step begun in the progress journal")
    }

    fn save(&self) -> Result<()> {
        match &self.path {
            Some(path) => write_atomic(path, serde_json::to_string(&self.progress)?.as_bytes())
                .context("cannot save the progress of the run"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: &str, accepted: bool) -> TrialRecord {
        TrialRecord {
            label: label.to_string(),
            accepted,
            score: None,
        }
    }

    #[test]
    fn resumed_journal_replays_candidates_and_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.progress.json");
        let mut j = Journal::open(&path, "k", false).unwrap();
        let c: Vec<u32> = j.begin_step("a", || Ok(vec![1, 2, 3])).unwrap();
        assert_eq!(c, vec![1, 2, 3]);
        assert_eq!(j.replay("x").unwrap(), None);
        j.record(record("x", true)).unwrap();
        drop(j);

        let mut j = Journal::open(&path, "k", true).unwrap();
        let c: Vec<u32> = j
            .begin_step("a", || -> Result<Vec<u32>> { panic!("must replay") })
            .unwrap();
        assert_eq!(c, vec![1, 2, 3]);
        assert_eq!(j.replay("x").unwrap(), Some(record("x", true)));
        assert_eq!(j.replay("y").unwrap(), None);
        j.record(record("y", false)).unwrap();
        j.finish().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn progress_of_another_run_or_without_resume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let mut j = Journal::open(&path, "k", false).unwrap();
        let _: Vec<u32> = j.begin_step("a", || Ok(vec![])).unwrap();
        let err = Journal::open(&path, "k", false).err().unwrap().to_string();
        assert!(err.contains("pass --resume"), "{err}");
        let err = Journal::open(&path, "other", true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("belongs to another run"), "{err}");
    }

    #[test]
    fn a_different_trial_order_is_refused() {
        let mut j = Journal::in_memory();
        let _: Vec<u32> = j.begin_step("a", || Ok(vec![])).unwrap();
        j.record(record("x", false)).unwrap();
        j.begun = 0;
        let _: Vec<u32> = j.begin_step("a", || Ok(vec![])).unwrap();
        assert!(j.replay("y").is_err());
    }
}
