//! Training checkpoints: parameters, optimizer moments, the best parameters so far and the log,
//! in one safetensors file written atomically. A run interrupted at any point resumes from its
//! last checkpoint and ends exactly as an uninterrupted run would.
//!
//! The file is streamed to disk tensor by tensor and read back through a memory map, so a
//! checkpoint never needs its own size in memory (BERT-base shape: 1.4 GB). With a checkpoint the
//! best parameters live only there ([`Best::Saved`]): a run does not hold a copy of them beside
//! the parameters it trains.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView, View};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use super::params::Trainable;
use crate::fsutil::write_atomic_with;
use crate::scoring::score::Score;

/// The selection metric after some step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Steps taken (0: the model before training).
    pub step: usize,
    /// Loss and metric on the selection split.
    pub selection: Score,
}

/// What a run has seen so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    /// Loss of every step taken.
    pub losses: Vec<f32>,
    /// Every evaluation on the selection split.
    pub evaluations: Vec<Evaluation>,
    /// The best evaluation (the parameters kept).
    pub best: Evaluation,
}

impl TrainLog {
    /// Evaluations after the best one (0 when the last evaluation is the best).
    pub fn evaluations_since_best(&self) -> usize {
        let best = self
            .evaluations
            .iter()
            .rposition(|e| e.step == self.best.step);
        best.map_or(0, |i| self.evaluations.len() - 1 - i)
    }
}

const METADATA: &str = "axcompress.train";

#[derive(Serialize, Deserialize)]
struct Header {
    key: String,
    log: TrainLog,
}

/// Where the best parameters so far are kept.
#[derive(Debug)]
pub enum Best {
    /// In memory, in the order of the parameters: the run's input values (shared with the input
    /// model, not copied) until an evaluation is saved, or a copy in a run without a checkpoint.
    Values(Vec<Tensor>),
    /// Only in the checkpoint at this path, as its `best/…` tensors.
    Saved(PathBuf),
}

impl Best {
    /// The best values, read from the checkpoint when they are kept there.
    pub fn into_values(self, trainable: &Trainable) -> Result<Vec<Tensor>> {
        match self {
            Best::Values(values) => Ok(values),
            Best::Saved(path) => {
                let file = Mapped::open(&path)?;
                let tensors = file.tensors()?;
                let names = trainable.params.iter().map(|p| &p.name);
                names
                    .map(|name| file.load(&tensors, "best", name))
                    .collect()
            }
        }
    }
}

/// A tensor to write: one of the run's, or one of the previous checkpoint's, as it is on disk.
enum Entry<'a> {
    Tensor(Tensor),
    Saved(TensorView<'a>),
}

impl View for Entry<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Entry::Tensor(t) => View::dtype(t),
            Entry::Saved(v) => View::dtype(v),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Entry::Tensor(t) => View::shape(t),
            Entry::Saved(v) => View::shape(v),
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::Tensor(t) => View::data(t),
            Entry::Saved(v) => View::data(v),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Entry::Tensor(t) => View::data_len(t),
            Entry::Saved(v) => View::data_len(v),
        }
    }
}

/// Writes the state of a run identified by `key` to `path`, with `best` as the best parameters
/// (`None`: the parameters as they are now).
pub fn save(
    path: &Path,
    key: &str,
    trainable: &Trainable,
    optimizer: &AdamW,
    best: Option<&Best>,
    log: &TrainLog,
) -> Result<()> {
    // The previous checkpoint, when the best parameters are carried over from it (mapped, and
    // still readable after the new file is renamed over it).
    let previous = match best {
        Some(Best::Saved(saved)) => Some(Mapped::open(saved)?),
        _ => None,
    };
    let carried = match &previous {
        Some(file) => Some((file, file.tensors()?)),
        None => None,
    };
    let mut entries: Vec<(String, Entry)> = Vec::new();
    for (i, p) in trainable.params.iter().enumerate() {
        let (m, v) = &optimizer.moments[i];
        let value = p.var.as_tensor().detach();
        let kept = match (best, &carried) {
            (None, _) => Entry::Tensor(value.clone()),
            (Some(Best::Values(values)), _) => Entry::Tensor(values[i].clone()),
            (Some(Best::Saved(_)), Some((file, tensors))) => {
                Entry::Saved(file.view(tensors, "best", &p.name)?)
            }
            (Some(Best::Saved(_)), None) => unreachable!("mapped above"),
        };
        entries.push((format!("param/{}", p.name), Entry::Tensor(value)));
        entries.push((format!("m/{}", p.name), Entry::Tensor(m.clone())));
        entries.push((format!("v/{}", p.name), Entry::Tensor(v.clone())));
        entries.push((format!("best/{}", p.name), kept));
    }
    let header = Header {
        key: key.to_string(),
        log: log.clone(),
    };
    let metadata = HashMap::from([(METADATA.to_string(), serde_json::to_string(&header)?)]);
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(entries, Some(metadata), tmp).map_err(std::io::Error::other)
    })
}

/// Restores the state saved at `path` into `trainable` and `optimizer`; returns the log (the
/// best parameters stay in the file: [`Best::Saved`]). Refuses a checkpoint of another run.
pub fn load(
    path: &Path,
    key: &str,
    trainable: &Trainable,
    optimizer: &mut AdamW,
) -> Result<TrainLog> {
    let file = Mapped::open(path)?;
    let header = file.header()?;
    if header.key != key {
        bail!(
            "{} is the checkpoint of another run; pass --force to start over",
            path.display()
        );
    }
    let tensors = file.tensors()?;
    let mut params = Vec::new();
    for (i, p) in trainable.params.iter().enumerate() {
        params.push(file.load(&tensors, "param", &p.name)?);
        let m = file.load(&tensors, "m", &p.name)?;
        optimizer.moments[i] = (m, file.load(&tensors, "v", &p.name)?);
    }
    trainable.restore(&params)?;
    optimizer.step = header.log.losses.len();
    Ok(header.log)
}

/// A checkpoint file mapped into memory.
struct Mapped {
    bytes: memmap2::Mmap,
    shown: String,
}

impl Mapped {
    fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).with_context(|| format!("cannot read {shown}"))?;
        // SAFETY: the checkpoint is this run's own file; axcompress replaces it only by renaming
        // a new file over it, which leaves the mapped one as it was.
        let bytes =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot read {shown}"))?;
        Ok(Mapped { bytes, shown })
    }

    /// The error of a file that is not a checkpoint.
    fn unreadable(&self) -> String {
        format!(
            "{}: not a safetensors checkpoint; pass --force to start over",
            self.shown
        )
    }

    /// The tensors of the file.
    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).with_context(|| self.unreadable())
    }

    /// The run's key and log, from the file's metadata.
    fn header(&self) -> Result<Header> {
        let shown = &self.shown;
        let (_, meta) =
            SafeTensors::read_metadata(&self.bytes).with_context(|| self.unreadable())?;
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA))
            .and_then(|h| serde_json::from_str(h).ok())
            .with_context(|| format!("{shown}: no training state; pass --force to start over"))
    }

    /// The tensor `kind/name` (`param`, `m`, `v` or `best`) as it is in the file.
    fn view<'t>(
        &self,
        tensors: &SafeTensors<'t>,
        kind: &str,
        name: &str,
    ) -> Result<TensorView<'t>> {
        tensors.tensor(&format!("{kind}/{name}")).with_context(|| {
            format!(
                "{}: no {kind}/{name}; pass --force to start over",
                self.shown
            )
        })
    }

    /// The tensor `kind/name`, copied into memory.
    fn load(&self, tensors: &SafeTensors, kind: &str, name: &str) -> Result<Tensor> {
        Ok(self.view(tensors, kind, name)?.load(&Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(step: usize, metric: f64) -> Evaluation {
        Evaluation {
            step,
            selection: Score::point(0.0, metric),
        }
    }

    /// Every parameter of `trainable` set to `value`.
    fn set_all(trainable: &Trainable, value: f64) -> Vec<Tensor> {
        let values: Vec<Tensor> = trainable
            .params
            .iter()
            .map(|p| (p.var.as_tensor().ones_like().unwrap() * value).unwrap())
            .collect();
        trainable.restore(&values).unwrap();
        values
    }

    fn same(a: &[Tensor], b: &[Tensor]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| crate::testing::max_abs_diff(x, y) == 0.0)
    }

    #[test]
    fn the_best_parameters_are_carried_from_checkpoint_to_checkpoint_and_read_back() {
        let model = crate::testing::random_model("bert", 2, 2, 4, 8);
        let trainable = Trainable::new(&model).unwrap();
        let mut optimizer = AdamW::new(&trainable.params, Default::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.safetensors");
        let log = TrainLog {
            losses: vec![0.5; 3],
            evaluations: vec![at(0, 0.9), at(3, 0.95)],
            best: at(3, 0.95),
        };
        let first = set_all(&trainable, 0.25);
        save(&path, "k", &trainable, &optimizer, None, &log).unwrap();
        let second = set_all(&trainable, -2.0);
        let saved = Best::Saved(path.clone());
        save(&path, "k", &trainable, &optimizer, Some(&saved), &log).unwrap();
        assert!(same(&saved.into_values(&trainable).unwrap(), &first));

        set_all(&trainable, 7.0);
        assert_eq!(load(&path, "k", &trainable, &mut optimizer).unwrap(), log);
        assert!(same(&trainable.snapshot().unwrap(), &second));
        assert_eq!(optimizer.step, 3);
        let other = load(&path, "another run", &trainable, &mut optimizer).unwrap_err();
        assert!(format!("{other:#}").contains("another run"), "{other:#}");

        let start = Best::Values(first.clone());
        save(&path, "k", &trainable, &optimizer, Some(&start), &log).unwrap();
        let kept = Best::Saved(path).into_values(&trainable).unwrap();
        assert!(same(&kept, &first));
    }

    #[test]
    fn evaluations_since_best_counts_those_after_the_kept_one() {
        let evaluations = vec![at(0, 0.9), at(10, 0.95), at(20, 0.93), at(30, 0.94)];
        let mut log = TrainLog {
            losses: Vec::new(),
            evaluations: evaluations.clone(),
            best: evaluations[1],
        };
        assert_eq!(log.evaluations_since_best(), 2);
        log.best = evaluations[3];
        assert_eq!(log.evaluations_since_best(), 0);
        log.best = evaluations[0];
        assert_eq!(log.evaluations_since_best(), 3);
    }
}
