//! Reading checkpoint tensors: `model.safetensors`, sharded `model.safetensors.index.json`, and
//! `pytorch_model.bin`, with shape checks against `config.json` and per-dtype accounting.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use safetensors::{Dtype, SafeTensors};

use super::linear::Weight;
use super::runtime::{Nonfinite, Runtime};
use super::source::WEIGHT_FILES;
use crate::formats::compressed_tensors::{
    dequantize_with_zero_points, read_codes, read_stripe_ints, read_zero_points,
};
use crate::formats::quant::{Bits, Codes, Precision, QuantMatrix};
use crate::formats::striped::Striped;
use crate::fsutil::read_text;

/// Parameter count and bytes of the tensors read, grouped by their dtype on disk.
pub type DtypeStats = BTreeMap<String, (usize, usize)>;

/// A tensor kept as bytes: integer tensors of quantized modules (candle has no I8).
type Raw = (Dtype, Vec<usize>, Vec<u8>);

/// A quantized module as the checkpoint stores it: its full name, precision, columns and the
/// entries sharing one scale.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredQuantized {
    /// Full tensor-name prefix (`bert.encoder.layer.0.attention.self.query`).
    pub module: String,
    /// Precision of its codes.
    pub bits: Bits,
    /// Inner dimension.
    pub cols: usize,
    /// Entries per scale.
    pub group: usize,
}

/// All tensors of a checkpoint, looked up by Hugging Face name.
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
    raw: HashMap<String, Raw>,
    file: String,
    prefix: &'static str,
    /// How the matrices it builds run.
    runtime: Runtime,
    used: RefCell<DtypeStats>,
    /// Names of the tensors fetched so far.
    read: RefCell<BTreeSet<String>>,
    quantized: RefCell<Vec<StoredQuantized>>,
    /// Whether the warning about zero points was printed (once per checkpoint).
    warned_zero_points: std::cell::Cell<bool>,
}

impl WeightStore {
    /// Loads the weights found in `dir`; `prefix` is the family's base-model prefix (e.g. `bert.`).
    pub fn load(dir: &Path, prefix: &'static str, runtime: Runtime) -> Result<Self> {
        let Some(file) = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
        else {
            if dir.join("model.onnx").is_file() {
                bail!(
                    "{}: holds only model.onnx, an ONNX export that runs in ONNX Runtime (see scripts/onnx_check.py); pass the model directory it was exported from",
                    dir.display()
                );
            }
            bail!(
                "{}: no weights found; expected one of {}",
                dir.display(),
                WEIGHT_FILES.join(", ")
            );
        };
        let (tensors, raw) = read_file(&file)?;
        if runtime.nonfinite == Nonfinite::Refuse {
            refuse_nonfinite(&tensors, &file)?;
        }
        Ok(WeightStore {
            tensors,
            raw,
            file: file.display().to_string(),
            prefix,
            runtime,
            used: RefCell::new(BTreeMap::new()),
            read: RefCell::new(BTreeSet::new()),
            warned_zero_points: std::cell::Cell::new(false),
            quantized: RefCell::new(Vec::new()),
        })
    }

    /// Builds a store from tensors already in memory (tests).
    #[cfg(test)]
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        file: &str,
        prefix: &'static str,
    ) -> Self {
        WeightStore {
            tensors,
            raw: HashMap::new(),
            file: file.to_string(),
            prefix,
            runtime: Runtime::default(),
            used: RefCell::new(BTreeMap::new()),
            read: RefCell::new(BTreeSet::new()),
            warned_zero_points: std::cell::Cell::new(false),
            quantized: RefCell::new(Vec::new()),
        }
    }

    /// How the matrices it builds run.
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// Fetches `name` (with or without the base prefix; `LayerNorm.weight`/`gamma` aliases) as
    /// f32, checking that its shape is `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let candidates = candidate_names(self.prefix, name);
        let Some((found, t)) = candidates
            .iter()
            .find_map(|n| self.tensors.get(n).map(|t| (n, t)))
        else {
            if let Some((n, (dtype, _, _))) = candidates
                .iter()
                .find_map(|n| self.raw.get(n).map(|r| (n, r)))
            {
                bail!(
                    "{}: tensor {n} is stored as {dtype:?}, not as a float; store it as F32, F16 or BF16",
                    self.file
                );
            }
            bail!("{}: missing tensor {}", self.file, candidates[0]);
        };
        self.read.borrow_mut().insert(found.clone());
        if t.dims() != shape {
            bail!(
                "{}: tensor {found} has shape {:?} but config.json implies {:?}; the weights do not match config.json",
                self.file,
                t.dims(),
                shape
            );
        }
        let entry_name = format!("{:?}", t.dtype()).to_lowercase();
        let mut used = self.used.borrow_mut();
        let entry = used.entry(entry_name).or_insert((0, 0));
        entry.0 += t.elem_count();
        entry.1 += t.elem_count() * t.dtype().size_in_bytes();
        t.to_dtype(DType::F32)
            .with_context(|| format!("{}: cannot convert {found} to f32", self.file))
    }

    /// The weight of module `module` (`[out, in]`): quantized when the checkpoint holds it in the
    /// compressed-tensors layout, dense otherwise.
    pub fn weight(&self, module: &str, shape: &[usize]) -> Result<Weight> {
        let striped = candidate_names(self.prefix, module)
            .into_iter()
            .find(|n| self.tensors.contains_key(&format!("{n}.weight_stripes")));
        if let Some(full) = striped {
            return self.striped(&full, shape).map(Weight::Striped);
        }
        let found = candidate_names(self.prefix, module).into_iter().find(|n| {
            ["weight_packed", "weight_scale"].iter().any(|t| {
                self.raw.contains_key(&format!("{n}.{t}"))
                    || self.tensors.contains_key(&format!("{n}.{t}"))
            })
        });
        let Some(full) = found else {
            return Ok(Weight::Dense(self.get(&format!("{module}.weight"), shape)?));
        };
        let get = |name: &str| {
            self.read.borrow_mut().insert(name.to_string());
            self.raw.get(name).cloned()
        };
        let scales = |name: &str| -> Result<Option<Vec<f32>>> {
            self.read.borrow_mut().insert(name.to_string());
            match self.tensors.get(name) {
                None => Ok(None),
                Some(t) => Ok(Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)),
            }
        };
        let codes = read_codes(&full, get, scales)
            .with_context(|| format!("{}: quantized module {full}", self.file))?
            .with_context(|| {
                format!(
                    "{}: {full} has a weight_scale but no weight / weight_packed",
                    self.file
                )
            })?;
        if [codes.rows, codes.cols] != shape {
            bail!(
                "{}: {full} is quantized as [{}, {}] but config.json implies {shape:?}; the weights do not match config.json",
                self.file, codes.rows, codes.cols
            );
        }
        self.refuse_reordering(&full, &codes)?;
        self.quantized.borrow_mut().push(StoredQuantized {
            module: full.clone(),
            bits: codes.bits,
            cols: codes.cols,
            group: codes.group,
        });
        let name = Precision::from(codes.bits).name().to_string();
        let mut used = self.used.borrow_mut();
        let entry = used.entry(name).or_insert((0, 0));
        entry.0 += codes.rows * codes.cols;
        entry.1 += codes.stored_bytes();
        drop(used);
        if let Some(zero_points) = self.zero_points(&full, &codes)? {
            if !self.warned_zero_points.replace(true) {
                eprintln!(
                    "warning: {}: {full} and any other module with zero points (asymmetric weights) are dequantized to f32 on load; `axcompress quantize` runs them quantized again",
                    self.file
                );
            }
            let scales = self.tensors[&format!("{full}.weight_scale")]
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let values = dequantize_with_zero_points(&codes, &zero_points, &scales);
            let t = Tensor::from_vec(values, (codes.rows, codes.cols), &Device::Cpu)?;
            return Ok(Weight::Dense(t));
        }
        Ok(Weight::Quantized(QuantMatrix::with_execution(
            codes,
            self.runtime.execution,
        )?))
    }

    /// The block-sparse matrix stored under `full` (see
    /// [`crate::formats::compressed_tensors::striped_entries`]), checked against `shape`.
    fn striped(&self, full: &str, shape: &[usize]) -> Result<Striped> {
        let ints = |suffix: &str| -> Result<Vec<u32>> {
            let name = format!("{full}.{suffix}");
            self.read.borrow_mut().insert(name.clone());
            let (_, _, bytes) = self.raw.get(&name).with_context(|| {
                format!("{}: {full} has weight_stripes but no {suffix}", self.file)
            })?;
            read_stripe_ints(bytes)
                .with_context(|| format!("{}: {name} holds negative entries", self.file))
        };
        let values = &self.tensors[&format!("{full}.weight_stripes")];
        self.read
            .borrow_mut()
            .insert(format!("{full}.weight_stripes"));
        let counts: Vec<usize> = ints("weight_stripe_counts")?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let striped = Striped::from_parts(
            shape[0],
            &counts,
            &ints("weight_stripe_rows")?,
            &values.to_dtype(DType::F32)?,
        )
        .with_context(|| format!("{}: block-sparse matrix {full}", self.file))?;
        if [striped.dims.0, striped.dims.1] != shape {
            bail!(
                "{}: {full} is stored as [{}, {}] but config.json implies {shape:?}; the weights do not match config.json",
                self.file, striped.dims.0, striped.dims.1
            );
        }
        let name = format!("{:?}", values.dtype()).to_lowercase();
        let mut used = self.used.borrow_mut();
        let entry = used.entry(name).or_insert((0, 0));
        entry.0 += values.elem_count();
        entry.1 += values.elem_count() * values.dtype().size_in_bytes() + 4 * counts.len();
        Ok(striped)
    }

    /// The zero points of `full` (asymmetric weights), or `None` when it has none or all are 0.
    fn zero_points(&self, full: &str, codes: &Codes) -> Result<Option<Vec<i32>>> {
        let name = format!("{full}.weight_zero_point");
        self.read.borrow_mut().insert(name.clone());
        let stored = match (self.raw.get(&name), self.tensors.get(&name)) {
            (Some(raw), _) => {
                read_zero_points(full, codes, raw.clone()).with_context(|| self.file.clone())?
            }
            // Zero points stored as floats hold integers.
            (None, Some(t)) => {
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let ints = values.iter().map(|v| v.round() as i32).collect::<Vec<_>>();
                let bytes = ints.iter().flat_map(|v| v.to_le_bytes()).collect();
                read_zero_points(full, codes, (Dtype::I32, t.dims().to_vec(), bytes))
                    .with_context(|| self.file.clone())?
            }
            (None, None) => return Ok(None),
        };
        Ok(stored.iter().any(|&z| z != 0).then_some(stored))
    }

    /// Refuses a module whose inputs are reordered into groups (`weight_g_idx`, GPTQ's
    /// activation order) unless the order is the plain one.
    fn refuse_reordering(&self, full: &str, codes: &Codes) -> Result<()> {
        let name = format!("{full}.weight_g_idx");
        self.read.borrow_mut().insert(name.clone());
        let Some((_, _, bytes)) = self.raw.get(&name) else {
            return Ok(());
        };
        let plain = bytes.len() == codes.cols * 4
            && bytes.chunks_exact(4).enumerate().all(|(i, b)| {
                i32::from_le_bytes(b.try_into().expect("4 bytes")) as usize == i / codes.group
            });
        if !plain {
            bail!(
                "{}: {name}: reordered groups (activation order, actorder / g_idx) are not supported; export without actorder or pass the float model",
                self.file
            );
        }
        Ok(())
    }

    /// The quantized modules read so far, as stored.
    pub fn quantized_modules(&self) -> Vec<StoredQuantized> {
        self.quantized.borrow().clone()
    }

    /// Tensors of the checkpoint that nothing has fetched, in name order.
    pub fn unread(&self) -> Vec<String> {
        let read = self.read.borrow();
        let mut names: Vec<String> = self
            .tensors
            .keys()
            .chain(self.raw.keys())
            .filter(|n| !read.contains(*n))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The checkpoint file, as messages name it.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Parameters and bytes, by on-disk dtype, of every tensor fetched so far.
    pub fn used_stats(&self) -> DtypeStats {
        self.used.borrow().clone()
    }

    /// The float dtype holding most of the parameters fetched so far (f32 when none).
    pub fn dominant_float_dtype(&self) -> DType {
        self.used
            .borrow()
            .iter()
            .filter_map(|(name, (params, _))| Some((name.parse::<DType>().ok()?, *params)))
            .filter(|(dtype, _)| dtype.is_float())
            .max_by_key(|&(_, params)| params)
            .map_or(DType::F32, |(dtype, _)| dtype)
    }
}

fn candidate_names(prefix: &str, name: &str) -> Vec<String> {
    let mut base = vec![name.to_string()];
    if let Some(stem) = name.strip_suffix("LayerNorm.weight") {
        base.push(format!("{stem}LayerNorm.gamma"));
    } else if let Some(stem) = name.strip_suffix("LayerNorm.bias") {
        base.push(format!("{stem}LayerNorm.beta"));
    }
    let is_head = super::names::is_task_head(name);
    let mut out = Vec::new();
    for b in &base {
        if is_head {
            out.push(b.clone());
        } else {
            out.push(format!("{prefix}{b}"));
            out.push(b.clone());
        }
    }
    out
}

/// Refuses a checkpoint whose float tensors hold NaN or ±Inf, naming the first such tensor (in
/// name order) and its count of bad values.
fn refuse_nonfinite(tensors: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut broken = Vec::new();
    for name in names {
        let bad = nonfinite_count(&tensors[name])?;
        if bad > 0 {
            broken.push((name, bad));
        }
    }
    let Some(&(name, bad)) = broken.first() else {
        return Ok(());
    };
    let others = match broken.len() - 1 {
        0 => String::new(),
        n => format!(" ({n} more tensors too)"),
    };
    bail!(
        "{}: tensor {name} holds {bad} NaN or infinite values{others}; the checkpoint is broken (a diverged fine-tune or a bad conversion): export it again, or pass --allow-nonfinite to load it anyway",
        file.display()
    )
}

/// NaN and ±Inf values in a float tensor.
fn nonfinite_count(t: &Tensor) -> Result<usize> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().filter(|v| !v.is_finite()).count())
}

/// Float tensors, and integer tensors as bytes.
type Contents = (HashMap<String, Tensor>, HashMap<String, Raw>);

fn read_file(file: &Path) -> Result<Contents> {
    let shown = file.display();
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        let dir = file.parent().unwrap_or(Path::new("."));
        let (mut all, mut raw) = (HashMap::new(), HashMap::new());
        for shard in shard_files(file)? {
            let (t, r) = read_file(&dir.join(&shard))?;
            all.extend(t);
            raw.extend(r);
        }
        return Ok((all, raw));
    }
    if name.ends_with(".bin") {
        super::pickle_guard::check_checkpoint(file)?;
        let tensors = candle_core::pickle::read_all(file).map_err(|e| {
            anyhow::anyhow!("{shown}: cannot read PyTorch checkpoint ({e}); re-save it with torch.save(state_dict) or as model.safetensors")
        })?;
        return Ok((tensors.into_iter().collect(), HashMap::new()));
    }
    let corrupt = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!("{shown}: not a valid safetensors file ({e}); the file is truncated or corrupt, download or export it again")
    };
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {shown}"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&e))?;
    let (mut tensors, mut raw) = (HashMap::new(), HashMap::new());
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => {
                raw.insert(name, (other, view.shape().to_vec(), view.data().to_vec()));
                continue;
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .map_err(|e| corrupt(&e))?;
        tensors.insert(name, t);
    }
    Ok((tensors, raw))
}

/// The distinct shard file names listed in a `model.safetensors.index.json`, sorted.
pub fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = read_text(index)?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object weight_map", index.display()))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_aliases_and_prefix() {
        let names = candidate_names("bert.", "embeddings.LayerNorm.weight");
        assert_eq!(
            names,
            vec![
                "bert.embeddings.LayerNorm.weight",
                "embeddings.LayerNorm.weight",
                "bert.embeddings.LayerNorm.gamma",
                "embeddings.LayerNorm.gamma"
            ]
        );
        assert_eq!(
            candidate_names("bert.", "classifier.weight"),
            vec!["classifier.weight"]
        );
    }

    #[test]
    fn shape_mismatch_names_tensor() {
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let store = WeightStore::from_tensors(
            HashMap::from([("bert.x".to_string(), t)]),
            "m.safetensors",
            "bert.",
        );
        let err = store.get("x", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("bert.x has shape [2, 3]"), "{err}");
        assert_eq!(store.get("x", &[2, 3]).unwrap().dims(), &[2, 3]);
        assert_eq!(store.used_stats()["f32"], (6, 24));
        assert_eq!(store.dominant_float_dtype(), DType::F32);
    }

    #[test]
    fn nonfinite_values_are_counted_and_named() {
        let t = Tensor::new(
            &[1f32, f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(nonfinite_count(&t).unwrap(), 3);
        let half = t.to_dtype(DType::F16).unwrap();
        assert_eq!(nonfinite_count(&half).unwrap(), 3);
        let good = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let tensors = HashMap::from([("b".to_string(), t), ("a".to_string(), good)]);
        let err = refuse_nonfinite(&tensors, Path::new("m.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("m.safetensors: tensor b holds 3 NaN"),
            "{err}"
        );
        assert!(err.contains("--allow-nonfinite"), "{err}");
    }

    #[test]
    fn dominant_dtype_is_the_one_holding_most_parameters() {
        let half = Tensor::zeros((4, 2), DType::F16, &Device::Cpu).unwrap();
        let full = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let store = WeightStore::from_tensors(
            HashMap::from([("w".to_string(), half), ("b".to_string(), full)]),
            "m.safetensors",
            "",
        );
        store.get("w", &[4, 2]).unwrap();
        store.get("b", &[2]).unwrap();
        assert_eq!(store.dominant_float_dtype(), DType::F16);
    }
}
