//! Writing a model directory: `model.safetensors` with Hugging Face tensor names, per-layer
//! shapes and the checkpoint's own float dtype, `config.json` (every standard field kept, plus an
//! `axcompress` section), the tokenizer files and any report files. Everything is written into a
//! temporary directory beside the destination and renamed into place; files get the usual
//! permissions (the process umask), so other users and CI jobs can read them.

pub mod destination;
pub mod onnx;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::formats::compressed_tensors::{
    quantization_config, quantized_entries, striped_entries, Stored,
};
use crate::formats::quant::Bits;
use crate::fsutil::{pretty_json, remove_stale_siblings, temporary_sibling};
use crate::interrupt;
use crate::model::config::Family;
use crate::model::linear::{Linear, Weight};
use crate::model::names::{self, full_name};
use crate::model::nn::LayerNorm;
use crate::model::storage::StorageDtype;
use crate::model::Model;
use crate::text::vocab::TokenizerFiles;
pub use destination::{check_destination, check_file_destination, create_parent};

/// Tokenizer and auxiliary files copied from the source model when present.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

/// Whether a stock Hugging Face config can describe the model, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compatibility {
    /// True when stock transformers can load the exported directory.
    pub hf_compatible: bool,
    /// Why not, when it cannot.
    pub reason: Option<String>,
}

/// Decides whether the model is expressible in a stock config: only whole layers removed, all
/// heads kept, one FFN width everywhere and dense attention.
pub fn compatibility(model: &Model) -> Compatibility {
    let s = &model.config.structure;
    let present: Vec<_> = s.layers.iter().filter(|l| !l.is_removed()).collect();
    let approximate = s.approximate_attention();
    let reason = if present.is_empty() {
        Some("every encoder layer was removed".to_string())
    } else if model.has_block_sparse() {
        Some("block-sparse matrices (weight_stripes) need axcompress to load".to_string())
    } else if !approximate.is_empty() {
        let layers: Vec<String> = approximate
            .iter()
            .map(|(l, mode)| format!("{l} ({mode})"))
            .collect();
        Some(format!(
            "layers {} run approximate attention, which stock transformers would run as dense attention",
            layers.join(", ")
        ))
    } else if present
        .iter()
        .any(|l| l.heads.is_none() || l.ffn_width.is_none())
    {
        Some("some layers keep only one of their two blocks".to_string())
    } else if s.uniform_ffn_width().is_none() {
        Some("layers keep different numbers of heads or FFN widths (stock transformers 5.x cannot load per-layer head counts)".to_string())
    } else {
        None
    };
    Compatibility {
        hf_compatible: reason.is_none(),
        reason,
    }
}

/// The model's tensors under Hugging Face names, floats in `dtype`, quantized matrices in the
/// compressed-tensors layout, with the precision of every module.
pub struct HfTensors {
    /// Tensors by full Hugging Face name.
    pub tensors: BTreeMap<String, Stored>,
    /// Quantized modules (full names) by precision.
    pub quantized: BTreeMap<Bits, Vec<String>>,
    /// Modules with a weight matrix left float (full names).
    pub float: Vec<String>,
    /// Block-sparse modules (names without the base prefix) that run as dense products.
    pub striped_dense: Vec<String>,
    /// Whether any module is stored block-sparse.
    pub any_striped: bool,
    family: Family,
    dtype: DType,
}

impl HfTensors {
    /// Collects `model`'s tensors. With `renumber`, removed layers are skipped and the remaining
    /// ones numbered consecutively (for stock configs).
    pub fn new(model: &Model, renumber: bool, dtype: DType) -> Result<Self> {
        let mut out = HfTensors {
            tensors: BTreeMap::new(),
            quantized: BTreeMap::new(),
            float: Vec::new(),
            striped_dense: Vec::new(),
            any_striped: false,
            family: model.config.family,
            dtype,
        };
        let e = &model.embeddings;
        out.weight("embeddings.word_embeddings", &e.word)?;
        out.float("embeddings.position_embeddings.weight", &e.position)?;
        if let Some(t) = &e.token_type {
            out.float("embeddings.token_type_embeddings.weight", t)?;
        }
        out.norm("embeddings.LayerNorm", &e.norm)?;
        let present = model
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| !renumber || l.attention.is_some() || l.ffn.is_some());
        for (index, (original, layer)) in present.enumerate() {
            let n = names::layer(out.family, if renumber { index } else { original });
            if let Some(att) = &layer.attention {
                if !att.heads.is_empty() {
                    let width = att.heads.len() * att.head_size;
                    for (part, name) in n.qkv.iter().enumerate() {
                        out.linear(name, &att.qkv.narrow_rows_stored(part * width, width)?)?;
                    }
                    out.weight(&n.attention_output, &att.output.weight)?;
                }
                out.float(&format!("{}.bias", n.attention_output), &att.output.bias)?;
                out.norm(&n.attention_norm, &att.norm)?;
            }
            if let Some(ffn) = &layer.ffn {
                if ffn.width() > 0 {
                    out.linear(&n.intermediate, &ffn.intermediate)?;
                    out.weight(&n.ffn_output, &ffn.output.weight)?;
                }
                out.float(&format!("{}.bias", n.ffn_output), &ffn.output.bias)?;
                out.norm(&n.ffn_norm, &ffn.norm)?;
            }
        }
        let (dense, head_out) = crate::model::head::ClassifierHead::tensor_names(out.family);
        out.linear(dense, &model.head.dense)?;
        out.linear(head_out, &model.head.out)?;
        Ok(out)
    }

    fn float(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let stored = Stored::float(t, self.dtype)?;
        self.tensors.insert(full_name(self.family, name), stored);
        Ok(())
    }

    fn norm(&mut self, module: &str, norm: &LayerNorm) -> Result<()> {
        self.float(&format!("{module}.weight"), &norm.weight)?;
        self.float(&format!("{module}.bias"), &norm.bias)
    }

    fn linear(&mut self, module: &str, lin: &Linear) -> Result<()> {
        self.weight(module, &lin.weight)?;
        self.float(&format!("{module}.bias"), &lin.bias)
    }

    /// The weight matrix of `module`: float, or its compressed-tensors tensors.
    fn weight(&mut self, module: &str, w: &Weight) -> Result<()> {
        let full = full_name(self.family, module);
        match w {
            Weight::Quantized(q) => {
                self.tensors.extend(quantized_entries(&full, &q.codes));
                self.quantized.entry(q.bits()).or_default().push(full);
                Ok(())
            }
            Weight::Striped(st) => {
                self.tensors.extend(striped_entries(&full, st, self.dtype)?);
                self.any_striped = true;
                if st.dense_execution() {
                    self.striped_dense.push(module.to_string());
                }
                Ok(())
            }
            _ if w.is_dense() => {
                self.float.push(full);
                self.float(&format!("{module}.weight"), &w.to_dense()?)
            }
            _ => bail!(
                "{full}: one module holds parts of different precisions; it cannot be exported"
            ),
        }
    }

    /// The `axcompress.block_sparse` section, when a module is stored block-sparse.
    pub fn block_sparse_config(&self) -> Option<Value> {
        self.any_striped.then(|| {
            json!({
                "format": "column-stripes",
                "tensors": "M.weight_stripes [kept segments, width], M.weight_stripe_rows I32 (output row of each segment), M.weight_stripe_counts I32 (segments per stripe)",
                "dense_execution": self.striped_dense,
            })
        })
    }

    /// `config.json`'s `quantization_config`, when anything is quantized.
    pub fn quantization_config(&self) -> Option<Value> {
        (!self.quantized.is_empty()).then(|| quantization_config(&self.quantized, &self.float))
    }
}

/// `config.json` for the exported model: the source config with the sizes updated, plus an
/// `axcompress` section (per-layer structure unless the result is stock-expressible, history of
/// passes, and the compatibility verdict).
pub fn config_json(
    model: &Model,
    history: &[Value],
    compat: &Compatibility,
    tensors: &HfTensors,
) -> Value {
    let quantization = tensors.quantization_config();
    let mut config = model.config.raw.clone();
    let s = &model.config.structure;
    let obj = config.as_object_mut().expect("config.json is an object");
    match quantization {
        Some(q) => obj.insert("quantization_config".into(), q),
        None => obj.remove("quantization_config"),
    };
    // The float precision the weights are written in (transformers 5 reads `dtype`, 4.x
    // `torch_dtype`): the input's, or `--dtype`.
    let dtype = StorageDtype::of(model.storage_dtype).name();
    let keys: Vec<&str> = ["dtype", "torch_dtype"]
        .into_iter()
        .filter(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    for key in if keys.is_empty() { vec!["dtype"] } else { keys } {
        obj.insert(key.into(), json!(dtype));
    }
    let mut section = json!({
        "version": 1,
        "hf_compatible": compat.hf_compatible,
        "history": history,
    });
    if compat.hf_compatible {
        let layers = s.layers.iter().filter(|l| !l.is_removed()).count();
        let width = s.uniform_ffn_width().expect("stock-expressible");
        let (layer_key, ffn_key) = match model.config.family {
            Family::DistilBert => ("n_layers", "hidden_dim"),
            _ => ("num_hidden_layers", "intermediate_size"),
        };
        obj.insert(layer_key.into(), json!(layers));
        obj.insert(ffn_key.into(), json!(width));
        section["removed_layers"] = json!(s
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_removed())
            .map(|(i, _)| i)
            .collect::<Vec<_>>());
    } else {
        section["structure"] = serde_json::to_value(s).expect("structure serialises");
        section["reason"] = json!(compat.reason);
    }
    if let Some(b) = tensors.block_sparse_config() {
        section["block_sparse"] = b;
    }
    obj.insert("axcompress".into(), section);
    config
}

/// A model ready to be written: its weights serialised and its config built.
pub struct Prepared {
    /// The weights file's bytes.
    pub weights: Vec<u8>,
    /// The weights file's name: `model.safetensors`, or `model.onnx`.
    weights_file: &'static str,
    /// `config.json`.
    pub config: Value,
    /// Whether stock transformers can load it.
    pub compat: Compatibility,
    /// The directory the tokenizer files come from.
    source_dir: PathBuf,
    /// Tokenizer files replacing those of `source_dir` (a pruned vocabulary).
    tokenizer: Option<Arc<TokenizerFiles>>,
}

/// Serialises `model` (weights in its checkpoint's float dtype) with the pass `history`.
pub fn prepare(model: &Model, history: &[Value]) -> Result<Prepared> {
    let compat = compatibility(model);
    let tensors = HfTensors::new(model, compat.hf_compatible, model.storage_dtype)?;
    let weights =
        safetensors::serialize(&tensors.tensors, None).context("cannot serialise the weights")?;
    Ok(Prepared {
        weights,
        weights_file: "model.safetensors",
        config: config_json(model, history, &compat, &tensors),
        compat,
        source_dir: model.dir.clone(),
        tokenizer: model.tokenizer.clone(),
    })
}

impl Prepared {
    /// The weights file's name.
    pub fn weights_file(&self) -> &'static str {
        self.weights_file
    }

    /// Writes the model directory at `out` atomically, with `extra` files (name, bytes) such as
    /// `report.json` beside the model files.
    pub fn write(&self, out: &Path, extra: &[(&str, Vec<u8>)], force: bool) -> Result<()> {
        check_destination(&[&self.source_dir], out, force)?;
        create_parent(out)?;
        remove_stale_siblings(out);
        let tmp = temporary_sibling(out, "tmp")?;
        let _tracked = interrupt::track(&tmp);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot clear {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        if let Err(e) = self.write_files(&tmp, extra) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        interrupt::commit(|| move_into_place(&tmp, out))
    }

    fn write_files(&self, dir: &Path, extra: &[(&str, Vec<u8>)]) -> Result<()> {
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let path = dir.join(name);
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
                .with_context(|| format!("cannot write {}", path.display()))
        };
        write(self.weights_file, &self.weights)?;
        write("config.json", &pretty_json(&self.config)?)?;
        for f in TOKENIZER_FILES {
            if let Some(bytes) = self.tokenizer.as_ref().and_then(|t| t.get(f)) {
                write(f, bytes)?;
                continue;
            }
            // Read and written anew (not fs::copy), so the copy gets the umask's permissions,
            // not the source's.
            let src = self.source_dir.join(f);
            if src.is_file() {
                let bytes = std::fs::read(&src)
                    .with_context(|| format!("cannot read {}", src.display()))?;
                write(f, &bytes)?;
            }
        }
        for (name, bytes) in extra {
            write(name, bytes)?;
        }
        Ok(())
    }
}

/// `model` as an ONNX directory: `model.onnx`, the tokenizer files, and a `config.json` (the
/// source's standard fields, no `quantization_config`, an `axcompress` section saying the format)
/// for tools that read labels from it.
pub fn prepare_onnx(model: &Model, onnx: &onnx::OnnxModel) -> Result<Prepared> {
    let compat = compatibility(model);
    let mut config = model.config.raw.clone();
    let obj = config.as_object_mut().expect("config.json is an object");
    obj.remove("quantization_config");
    let history = recorded_history(model);
    obj.insert(
        "axcompress".into(),
        json!({
            "version": 1,
            "format": "onnx",
            "opset": onnx.opset,
            "structure": model.config.structure,
            "history": history,
            "notes": onnx.notes,
        }),
    );
    Ok(Prepared {
        weights: onnx.bytes.clone(),
        weights_file: "model.onnx",
        config,
        compat,
        source_dir: model.dir.clone(),
        tokenizer: model.tokenizer.clone(),
    })
}

/// The passes that made `model`, as its `config.json` records them (empty for a model
/// axcompress did not write).
pub fn recorded_history(model: &Model) -> Vec<Value> {
    model
        .config
        .raw
        .pointer("/axcompress/history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Which runtimes load a model directory, in one line (summaries, reports, `inspect`);
/// `onnx_beside`: the directory holds `model.onnx` too.
pub fn loads_in(compat: &Compatibility, quantized: bool, onnx_beside: bool) -> String {
    let transformers = match (&compat.reason, quantized) {
        (None, false) => "transformers 5.x".to_string(),
        (None, true) => "transformers 5.x with compressed-tensors".to_string(),
        (Some(why), _) => format!("not stock transformers: {why}"),
    };
    let onnx = match onnx_beside {
        true => "ONNX Runtime (model.onnx)",
        false => "ONNX Runtime after `axcompress export --format onnx`",
    };
    format!("loads in: axcompress; {onnx}; {transformers}")
}

/// Writes `model` as a self-contained directory at `out`, atomically, with `report` as
/// `report.json`. Returns whether the result is stock-expressible.
pub fn write_model_dir(
    model: &Model,
    out: &Path,
    history: &[Value],
    report: &Value,
    force: bool,
) -> Result<Compatibility> {
    let prepared = prepare(model, history)?;
    prepared.write(out, &[("report.json", pretty_json(report)?)], force)?;
    Ok(prepared.compat)
}

/// Renames the finished temporary directory to `out`, replacing an existing `out`.
fn move_into_place(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        // Not tracked: interrupted between the two renames, the previous model stays here.
        let old = temporary_sibling(out, "old")?;
        std::fs::rename(out, &old)
            .with_context(|| format!("cannot move the existing {} aside", out.display()))?;
        std::fs::rename(tmp, out)?;
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    } else {
        std::fs::rename(tmp, out)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()))?;
    }
    Ok(())
}
