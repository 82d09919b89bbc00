//! The one model runtime every command shares: loading, per-layer structure, forward passes.

pub mod config;
pub mod encoder;
pub mod head;
pub mod inputs;
pub mod linear;
pub mod matrices;
pub mod names;
pub mod nn;
pub mod pickle_guard;
pub mod quant_config;
pub mod runtime;
pub mod shape;
pub mod slice;
pub mod source;
pub mod storage;
pub mod structure;
pub mod synthetic;
pub mod text_encoder;
pub mod weights;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::hash::Fnv1a;
use crate::kernels::attention_mode::ApproxAttention;
use crate::kernels::Ops;
use crate::text::vocab::TokenizerFiles;
use config::{Family, ModelConfig};
use encoder::{
    run_layers, run_to_first_token, Attention, Embeddings, EncoderLayer, FeedForward, RunOptions,
};
use head::ClassifierHead;
use inputs::Inputs;
use linear::{Linear, Weight};
use nn::LayerNorm;
use runtime::Runtime;
use weights::{DtypeStats, WeightStore};

/// A loaded BERT-family sequence-classification model.
#[derive(Debug, Clone)]
pub struct Model {
    /// Parsed `config.json`, including the per-layer structure.
    pub config: ModelConfig,
    /// Embedding layer.
    pub embeddings: Embeddings,
    /// Encoder layers, one per entry of `config.structure.layers`.
    pub layers: Vec<EncoderLayer>,
    /// Classification / regression head.
    pub head: ClassifierHead,
    /// Directory the model was loaded from.
    pub dir: PathBuf,
    /// Parameters and bytes by on-disk dtype of the tensors the runtime uses.
    pub disk_dtypes: DtypeStats,
    /// The float dtype most parameters had on disk: computation is f32, exports keep this dtype.
    pub storage_dtype: DType,
    /// Tokenizer files replacing those in `dir` (after vocabulary pruning).
    pub tokenizer: Option<Arc<TokenizerFiles>>,
    /// How it runs: quantized matrices built for it run as its `execution` says.
    pub runtime: Runtime,
}

impl Model {
    /// Loads a model from a directory or hub id (see [`source::resolve`]), to run as `runtime`
    /// says.
    pub fn load(spec: &str, hub: &source::HubAccess, runtime: Runtime) -> Result<Self> {
        let dir = source::resolve(spec, hub)?;
        Self::open(&dir, runtime)
    }

    /// Loads a model from a Hugging Face-format directory, with the default [`Runtime`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::open(dir, Runtime::default())
    }

    /// Loads a model from a Hugging Face-format directory, to run as `runtime` says.
    pub fn open(dir: &Path, runtime: Runtime) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            bail!(
                "{}: missing config.json; pass a Hugging Face-format model directory",
                dir.display()
            );
        }
        let config = ModelConfig::from_file(&config_path)?;
        let store = WeightStore::load(dir, names::prefix(config.family), runtime)?;
        let mut model = Self::from_store(config, &store)?;
        let shown = config_path.display().to_string();
        quant_config::check(&model.config.raw, &shown, &store.quantized_modules())?;
        check_unread(&store, model.config.structure.layers.len())?;
        model.dir = dir.to_path_buf();
        Ok(model)
    }

    /// Builds a model from `config` and tensors, checking every shape.
    pub fn from_store(config: ModelConfig, store: &WeightStore) -> Result<Self> {
        let h = config.hidden_size;
        let dense_execution = block_sparse_dense_execution(&config.raw);
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let weight = match store.weight(name, &[out, inp])? {
                Weight::Striped(s) if dense_execution.iter().any(|d| d == name) => {
                    Weight::Striped(s.with_dense_execution(true)?)
                }
                w => w,
            };
            Ok(Linear::new(
                weight,
                store.get(&format!("{name}.bias"), &[out])?,
            ))
        };
        let norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: store.get(&format!("{name}.weight"), &[h])?,
                bias: store.get(&format!("{name}.bias"), &[h])?,
                eps: config.layer_norm_eps,
            })
        };
        let embeddings = Embeddings {
            word: store.weight("embeddings.word_embeddings", &[config.vocab_size, h])?,
            position: store.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: match config.family {
                Family::DistilBert => None,
                _ => Some(store.get(
                    "embeddings.token_type_embeddings.weight",
                    &[config.type_vocab_size, h],
                )?),
            },
            norm: norm("embeddings.LayerNorm")?,
        };
        let d = config.structure.head_size;
        let mut layers = Vec::with_capacity(config.structure.layers.len());
        for (i, shape) in config.structure.layers.iter().enumerate() {
            let n = names::layer(config.family, i);
            let attention = match &shape.heads {
                None => None,
                Some(heads) => {
                    let width = heads.len() * d;
                    let (qkv, output) = if heads.is_empty() {
                        let bias = store.get(&format!("{}.bias", n.attention_output), &[h])?;
                        (Linear::empty(0, h, None)?, Linear::empty(h, 0, Some(bias))?)
                    } else {
                        let parts = n
                            .qkv
                            .iter()
                            .map(|name| linear(name, width, h))
                            .collect::<Result<Vec<_>>>()?;
                        (
                            Linear::concat_rows(&parts)?,
                            linear(&n.attention_output, h, width)?,
                        )
                    };
                    Some(Attention {
                        qkv,
                        output,
                        norm: norm(&n.attention_norm)?,
                        heads: heads.clone(),
                        head_size: d,
                        approx: shape.attention_mode,
                    })
                }
            };
            let ffn = match shape.ffn_width {
                None => None,
                Some(0) => Some(FeedForward {
                    intermediate: Linear::empty(0, h, None)?,
                    output: Linear::empty(
                        h,
                        0,
                        Some(store.get(&format!("{}.bias", n.ffn_output), &[h])?),
                    )?,
                    norm: norm(&n.ffn_norm)?,
                    activation: config.activation,
                }),
                Some(f) => Some(FeedForward {
                    intermediate: linear(&n.intermediate, f, h)?,
                    output: linear(&n.ffn_output, h, f)?,
                    norm: norm(&n.ffn_norm)?,
                    activation: config.activation,
                }),
            };
            layers.push(EncoderLayer { attention, ffn });
        }
        let (dense, out) = ClassifierHead::tensor_names(config.family);
        let head = ClassifierHead {
            dense: linear(dense, h, h)?,
            out: linear(out, config.num_labels(), h)?,
            family: config.family,
        };
        Ok(Model {
            config,
            embeddings,
            layers,
            head,
            dir: PathBuf::new(),
            disk_dtypes: store.used_stats(),
            storage_dtype: store.dominant_float_dtype(),
            tokenizer: None,
            runtime: store.runtime(),
        })
    }

    /// The same model with layer `layer`'s attention run as `mode` (`None`: dense). Refuses a
    /// layer without attention heads.
    pub fn with_attention_mode(&self, layer: usize, mode: Option<ApproxAttention>) -> Result<Self> {
        let mut out = self.clone();
        let att = out
            .layers
            .get_mut(layer)
            .and_then(|l| l.attention.as_mut())
            .filter(|a| !a.heads.is_empty());
        let Some(att) = att else {
            bail!("layer {layer} has no attention heads to approximate");
        };
        att.approx = mode;
        out.config.structure.layers[layer].attention_mode = mode;
        Ok(out)
    }

    /// Number of encoder layers (removed ones included, as identities).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Embeds a batch: the hidden states entering layer 0.
    pub fn embed(&self, inputs: &Inputs, ops: Ops) -> Result<Tensor> {
        Ok(self.embeddings.forward(inputs, ops)?)
    }

    /// Runs encoder layers `range` on hidden states entering `range.start`.
    pub fn run_layers(
        &self,
        hidden: &Tensor,
        inputs: &Inputs,
        range: Range<usize>,
        opts: RunOptions,
    ) -> Result<Tensor> {
        Ok(run_layers(
            &self.layers,
            hidden,
            &inputs.mask_bias,
            range,
            opts,
        )?)
    }

    /// Final hidden states `[batch, seq, hidden]`.
    pub fn encode(&self, inputs: &Inputs, opts: RunOptions) -> Result<Tensor> {
        let h = self.embed(inputs, opts.ops)?;
        self.run_layers(&h, inputs, 0..self.num_layers(), opts)
    }

    /// Logits `[batch, labels]` from final hidden states.
    pub fn classify(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(hidden)?)
    }

    /// Logits `[batch, labels]` from hidden states entering layer `start`. The last layer
    /// computes only the first position, the one the classifier reads.
    pub fn logits_from(
        &self,
        hidden: &Tensor,
        mask_bias: &Tensor,
        start: usize,
        opts: RunOptions,
    ) -> Result<Tensor> {
        let first = run_to_first_token(&self.layers, hidden, mask_bias, start, opts)?;
        self.classify(&first)
    }

    /// Logits `[batch, labels]` for a batch.
    pub fn forward(&self, inputs: &Inputs, opts: RunOptions) -> Result<Tensor> {
        let h = self.embed(inputs, opts.ops)?;
        self.logits_from(&h, &inputs.mask_bias, 0, opts)
    }

    /// Every linear layer: each encoder layer's projections, then the head's.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        let encoder = self.layers.iter().flat_map(|layer| {
            let attention = layer.attention.iter().flat_map(|a| [&a.qkv, &a.output]);
            let ffn = layer.ffn.iter().flat_map(|f| [&f.intermediate, &f.output]);
            attention.chain(ffn)
        });
        encoder.chain([&self.head.dense, &self.head.out])
    }

    /// Lets go of the f32 weights packed for the inference kernel (freed once no clone of the
    /// model holds them; the next inference pass packs them again).
    pub fn drop_packed(&self) {
        self.linears().for_each(Linear::drop_packed);
    }

    /// [`Self::linears`], to change.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        let encoder = self.layers.iter_mut().flat_map(|layer| {
            let attention = layer
                .attention
                .iter_mut()
                .flat_map(|a| [&mut a.qkv, &mut a.output]);
            let ffn = layer
                .ffn
                .iter_mut()
                .flat_map(|f| [&mut f.intermediate, &mut f.output]);
            attention.chain(ffn)
        });
        encoder.chain([&mut self.head.dense, &mut self.head.out])
    }

    /// A copy whose weights are never packed for the inference kernel: its products run through
    /// the general matrix product (the same values within rounding) and it holds no packed
    /// copy. For a teacher beside training, where memory is tightest.
    pub fn never_packed(&self) -> Model {
        let mut copy = self.clone();
        for linear in copy.linears_mut() {
            *linear = linear.never_packed();
        }
        copy
    }

    /// Whether any encoder matrix is stored block-sparse (see [`striped`]).
    pub fn has_block_sparse(&self) -> bool {
        let striped = |l: &Linear| matches!(l.weight, Weight::Striped(_));
        self.layers.iter().any(|layer| {
            layer
                .attention
                .as_ref()
                .is_some_and(|a| striped(&a.qkv) || striped(&a.output))
                || layer
                    .ffn
                    .as_ref()
                    .is_some_and(|f| striped(&f.intermediate) || striped(&f.output))
        })
    }

    /// Total number of parameters the runtime uses (the fused QKV counted once).
    pub fn parameter_count(&self) -> usize {
        let norm = |n: &LayerNorm| n.weight.elem_count() + n.bias.elem_count();
        let mut count = self.embeddings.parameter_count();
        for layer in &self.layers {
            if let Some(a) = &layer.attention {
                count += a.qkv.elem_count() + a.output.elem_count() + norm(&a.norm);
            }
            if let Some(f) = &layer.ffn {
                count += f.intermediate.elem_count() + f.output.elem_count() + norm(&f.norm);
            }
        }
        count + self.head.dense.elem_count() + self.head.out.elem_count()
    }

    /// A hash (16 hex digits, FNV-1a over 32-bit words) of the structure and every weight the
    /// runtime uses, in a fixed order: the same model gives the same value however it was
    /// loaded; any pruning or weight change gives another.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = Fnv1a::default();
        h.write_bytes(&serde_json::to_vec(&self.config.structure)?);
        for t in self.tensors()? {
            for v in t.flatten_all()?.to_vec1::<f32>()? {
                h.write(u64::from(v.to_bits()));
            }
        }
        Ok(h.hex())
    }

    /// Every tensor the runtime uses, dense, in a fixed order.
    fn tensors(&self) -> Result<Vec<Tensor>> {
        let e = &self.embeddings;
        let mut out = vec![
            e.word.to_dense()?,
            e.position.clone(),
            e.norm.weight.clone(),
            e.norm.bias.clone(),
        ];
        out.extend(e.token_type.clone());
        let lin =
            |l: &Linear| -> Result<[Tensor; 2]> { Ok([l.weight.to_dense()?, l.bias.clone()]) };
        for layer in &self.layers {
            if let Some(a) = &layer.attention {
                out.extend(lin(&a.qkv)?.into_iter().chain(lin(&a.output)?));
                out.extend([a.norm.weight.clone(), a.norm.bias.clone()]);
            }
            if let Some(f) = &layer.ffn {
                out.extend(lin(&f.intermediate)?.into_iter().chain(lin(&f.output)?));
                out.extend([f.norm.weight.clone(), f.norm.bias.clone()]);
            }
        }
        out.extend(
            lin(&self.head.dense)?
                .into_iter()
                .chain(lin(&self.head.out)?),
        );
        Ok(out)
    }
}

/// The block-sparse modules a config says run as dense products
/// (`axcompress.block_sparse.dense_execution`).
fn block_sparse_dense_execution(raw: &serde_json::Value) -> Vec<String> {
    raw.pointer("/axcompress/block_sparse/dense_execution")
        .and_then(serde_json::Value::as_array)
        .map(|v| {
            v.iter()
                .filter_map(|m| m.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Refuses a checkpoint holding encoder tensors that `config.json` does not use (a
/// `num_hidden_layers` below the checkpoint's, or a layer's module the structure lacks), and
/// warns on stderr about any other tensor nothing read. Buffers and pre-training heads that
/// classifiers carry are expected and pass silently.
fn check_unread(store: &WeightStore, layers: usize) -> Result<()> {
    let unread = store.unread();
    let encoder: Vec<&String> = unread.iter().filter(|n| n.contains("layer.")).collect();
    if let Some(first) = encoder.first() {
        bail!(
            "{}: {} tensors of the encoder are not used by config.json ({first}, …), which describes {layers} layers; config.json does not match the weights",
            store.file(),
            encoder.len()
        );
    }
    let expected = |n: &str| {
        n.ends_with("position_ids")
            || ["cls.", "lm_head.", "pooler.", "vocab_", "distilbert.pooler"]
                .iter()
                .any(|p| n.starts_with(p) || n.contains(&format!(".{p}")))
    };
    let unknown: Vec<&String> = unread.iter().filter(|n| !expected(n)).collect();
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(3).map(|n| n.as_str()).collect();
        eprintln!(
            "warning: {}: {} tensors are not used by the model and are dropped: {}{}",
            store.file(),
            unknown.len(),
            shown.join(", "),
            if unknown.len() > 3 { ", …" } else { "" }
        );
    }
    Ok(())
}
