//! Where a task's data comes from. First hit wins, and reports record which:
//! 1. `--data DIR|FILE` (GLUE TSV layout);
//! 2. `$GLUE_DIR/<TaskDir>` (the classic GLUE layout: `SST-2`, `CoLA`, `MRPC`, …);
//! 3. the hub dataset `nyu-mll/glue` (parquet), local Hugging Face cache first, the network only
//!    when not offline.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use super::glue::{self, Dataset};
use super::hub;
use super::task::Task;
use crate::model::source::{env_flag, hub_cache_dir};

/// Which of the places in the resolution order the data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// `--data` (or the `data` key of a config).
    Argument,
    /// `$GLUE_DIR/<TaskDir>`.
    GlueDir,
    /// The hub dataset `nyu-mll/glue`.
    Hub,
}

impl Origin {
    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Argument => "--data or the config",
            Origin::GlueDir => "$GLUE_DIR",
            Origin::Hub => "hub cache or download",
        }
    }
}

/// The resolved data of one task.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// The task.
    pub task: Task,
    /// Where it was found.
    pub origin: Origin,
    location: Location,
}

#[derive(Debug, Clone)]
enum Location {
    /// A GLUE task directory or a single TSV file.
    Tsv(PathBuf),
    /// The hub dataset; downloads allowed unless offline.
    Hub { offline: bool },
}

impl TaskData {
    /// Resolves the data of `task`: `data` if given, else `$GLUE_DIR/<TaskDir>`, else the hub
    /// dataset (cache first; the network unless `offline` or `HF_HUB_OFFLINE=1`).
    pub fn resolve(task: Task, data: Option<&Path>, offline: bool) -> Result<Self> {
        if let Some(path) = data {
            return Ok(Self::tsv(task, Origin::Argument, path));
        }
        let glue_dir = std::env::var_os("GLUE_DIR").map(|d| PathBuf::from(d).join(task.glue_dir()));
        if let Some(dir) = glue_dir.as_ref().filter(|d| d.is_dir()) {
            return Ok(Self::tsv(task, Origin::GlueDir, dir));
        }
        let offline = offline || env_flag("HF_HUB_OFFLINE");
        if hub::split_files(task, "dev", offline)?.is_some() {
            return Ok(TaskData {
                task,
                origin: Origin::Hub,
                location: Location::Hub { offline },
            });
        }
        let glue = match glue_dir {
            Some(d) => format!("{} does not exist", d.display()),
            None => "GLUE_DIR is not set".to_string(),
        };
        bail!(
            "no data for task {task}: no --data given, {glue}, and the hub dataset {} ({}) is not in the cache at {}{}; pass --data DIR (GLUE TSV layout) or set GLUE_DIR",
            hub::DATASET,
            task.name(),
            hub_cache_dir().display(),
            if offline { " (offline, so not downloaded)" } else { " and could not be downloaded" }
        )
    }

    fn tsv(task: Task, origin: Origin, path: &Path) -> Self {
        TaskData {
            task,
            origin,
            location: Location::Tsv(path.to_path_buf()),
        }
    }

    /// The datasets of `split` (`train`, `dev`; MNLI also `dev_matched`, `dev_mismatched`), each
    /// with its metric-name suffix (MNLI dev: `matched`, `mismatched`; otherwise empty).
    pub fn split(&self, split: &str) -> Result<Vec<(&'static str, Dataset)>> {
        match &self.location {
            Location::Tsv(path) => glue::split_paths(self.task, path, split)?
                .into_iter()
                .map(|(suffix, file)| Ok((suffix, glue::read(self.task, &file)?)))
                .collect(),
            Location::Hub { offline } => {
                let Some(files) = hub::split_files(self.task, split, *offline)? else {
                    bail!(
                        "the hub dataset {} has no {split} split of {} in the cache at {}",
                        hub::DATASET,
                        self.task,
                        hub_cache_dir().display()
                    );
                };
                files
                    .into_iter()
                    .map(|(suffix, paths)| Ok((suffix, hub::read(self.task, &paths)?)))
                    .collect()
            }
        }
    }

    /// Every file the task's train and dev splits are read from (those that exist), in a fixed
    /// order: what a run's decisions depend on, for its resume key.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for split in ["train", "dev"] {
            match &self.location {
                Location::Tsv(path) => files.extend(
                    glue::split_paths(self.task, path, split)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(_, file)| file),
                ),
                Location::Hub { .. } => files.extend(
                    hub::split_files(self.task, split, true)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                        .into_iter()
                        .flat_map(|(_, paths)| paths),
                ),
            }
        }
        files.retain(|f| f.is_file());
        files
    }

    /// The first dataset of `split` (MNLI dev: the matched one).
    pub fn first(&self, split: &str) -> Result<Dataset> {
        Ok(self.split(split)?.remove(0).1)
    }

    /// Where the data is, for logs and reports.
    pub fn location(&self) -> String {
        match &self.location {
            Location::Tsv(path) => path.display().to_string(),
            Location::Hub { .. } => format!("hub:{}/{}", hub::DATASET, self.task.name()),
        }
    }
}
