//! The model's weight matrices one by one, as Hugging Face names them: the word embeddings, the
//! six projections of every encoder layer and the two of the classifier head. Quantization
//! chooses a precision per matrix, so it reads and replaces them here.

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::head::ClassifierHead;
use super::linear::{Linear, Stack, Weight};
use super::names;
use super::Model;
use crate::formats::quant::Execution;

/// Which projection of an encoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    /// Attention query.
    Query,
    /// Attention key.
    Key,
    /// Attention value.
    Value,
    /// Attention output.
    AttentionOutput,
    /// First FFN projection.
    Intermediate,
    /// Second FFN projection.
    FfnOutput,
}

impl Projection {
    /// All six, in checkpoint order.
    pub const ALL: [Projection; 6] = [
        Projection::Query,
        Projection::Key,
        Projection::Value,
        Projection::AttentionOutput,
        Projection::Intermediate,
        Projection::FfnOutput,
    ];

    /// True for the four attention projections.
    pub fn is_attention(self) -> bool {
        !matches!(self, Projection::Intermediate | Projection::FfnOutput)
    }
}

/// One weight matrix of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "matrix")]
pub enum Matrix {
    /// The word-embedding table `[vocab, hidden]`.
    WordEmbeddings,
    /// A projection of encoder layer `layer`.
    Layer {
        /// Encoder layer.
        layer: usize,
        /// Which projection.
        projection: Projection,
    },
    /// The head's first dense layer (BERT pooler, RoBERTa `classifier.dense`, DistilBERT
    /// `pre_classifier`).
    HeadDense,
    /// The head's output layer.
    HeadOut,
}

impl Matrix {
    /// The module's Hugging Face name, with the base-model prefix (append `.weight`).
    pub fn hf_name(self, model: &Model) -> String {
        let family = model.config.family;
        let (dense, out) = ClassifierHead::tensor_names(family);
        let name = match self {
            Matrix::WordEmbeddings => "embeddings.word_embeddings".to_string(),
            Matrix::HeadDense => dense.to_string(),
            Matrix::HeadOut => out.to_string(),
            Matrix::Layer { layer, projection } => {
                let n = names::layer(family, layer);
                match projection {
                    Projection::Query => n.qkv[0].clone(),
                    Projection::Key => n.qkv[1].clone(),
                    Projection::Value => n.qkv[2].clone(),
                    Projection::AttentionOutput => n.attention_output,
                    Projection::Intermediate => n.intermediate,
                    Projection::FfnOutput => n.ffn_output,
                }
            }
        };
        names::full_name(family, &name)
    }

    /// A short label for logs and journals, e.g. `L3.query`, `embeddings`, `head.out`.
    pub fn label(self) -> String {
        match self {
            Matrix::WordEmbeddings => "embeddings".into(),
            Matrix::HeadDense => "head.dense".into(),
            Matrix::HeadOut => "head.out".into(),
            Matrix::Layer { layer, projection } => {
                let p = serde_json::to_value(projection).expect("serialises");
                format!("L{layer}.{}", p.as_str().unwrap_or_default())
            }
        }
    }

    /// The first encoder layer whose output changes when this matrix changes (the last layer
    /// for the head, whose output only the head reads); `None` for the embeddings.
    pub fn first_layer(self, model: &Model) -> Option<usize> {
        match self {
            Matrix::WordEmbeddings => None,
            Matrix::Layer { layer, .. } => Some(layer),
            Matrix::HeadDense | Matrix::HeadOut => Some(model.num_layers().saturating_sub(1)),
        }
    }
}

impl Model {
    /// Every matrix with at least one entry, in checkpoint order.
    pub fn matrices(&self) -> Vec<Matrix> {
        let mut out = vec![Matrix::WordEmbeddings];
        for (layer, l) in self.layers.iter().enumerate() {
            let heads = l.attention.as_ref().is_some_and(|a| !a.heads.is_empty());
            let ffn = l.ffn.as_ref().is_some_and(|f| f.width() > 0);
            for projection in Projection::ALL {
                if (projection.is_attention() && heads) || (!projection.is_attention() && ffn) {
                    out.push(Matrix::Layer { layer, projection });
                }
            }
        }
        out.extend([Matrix::HeadDense, Matrix::HeadOut]);
        out
    }

    /// True when any matrix is quantized.
    pub fn is_quantized(&self) -> bool {
        self.matrices()
            .into_iter()
            .any(|m| self.weight(m).is_ok_and(|w| !w.is_dense()))
    }

    /// True when any matrix runs in a quantized kernel (which has no backward pass).
    pub fn runs_quantized_kernels(&self) -> bool {
        self.matrices().into_iter().any(|m| {
            self.weight(m).is_ok_and(
                |w| matches!(&w, Weight::Quantized(q) if q.execution != Execution::Dequantized),
            )
        })
    }

    /// The weight of matrix `m`.
    pub fn weight(&self, m: Matrix) -> Result<Weight> {
        match m {
            Matrix::WordEmbeddings => Ok(self.embeddings.word.clone()),
            Matrix::HeadDense => Ok(self.head.dense.weight.clone()),
            Matrix::HeadOut => Ok(self.head.out.weight.clone()),
            Matrix::Layer { layer, projection } => {
                let (linear, part) = self.projection(layer, projection)?;
                match part {
                    None => Ok(linear.weight.clone()),
                    Some((start, len)) => Ok(linear.weight.narrow_rows(start, len)?),
                }
            }
        }
    }

    /// The model with matrix `m`'s weight replaced by `weight` (same shape).
    pub fn with_weight(&self, m: Matrix, weight: Weight) -> Result<Model> {
        let mut model = self.clone();
        let set = |linear: &mut Linear, weight: Weight| linear.weight = weight;
        match m {
            Matrix::WordEmbeddings => model.embeddings.word = weight,
            Matrix::HeadDense => set(&mut model.head.dense, weight),
            Matrix::HeadOut => set(&mut model.head.out, weight),
            Matrix::Layer { layer, projection } => {
                let (_, part) = self.projection(layer, projection)?;
                let l = &mut model.layers[layer];
                match (part, projection) {
                    (Some((start, len)), _) => {
                        let a = l.attention.as_mut().context("no attention block")?;
                        a.qkv.weight = replace_rows(&a.qkv.weight, start, len, weight)?;
                    }
                    (None, Projection::AttentionOutput) => set(
                        &mut l.attention.as_mut().context("no attention")?.output,
                        weight,
                    ),
                    (None, Projection::Intermediate) => {
                        set(&mut l.ffn.as_mut().context("no FFN")?.intermediate, weight)
                    }
                    (None, _) => set(&mut l.ffn.as_mut().context("no FFN")?.output, weight),
                }
            }
        }
        Ok(model)
    }

    /// The linear layer holding a projection, and for query/key/value its rows in the fused
    /// projection.
    fn projection(
        &self,
        layer: usize,
        projection: Projection,
    ) -> Result<(&Linear, Option<(usize, usize)>)> {
        let l = self.layers.get(layer).context("no such layer")?;
        let missing = || format!("layer {layer} has no {projection:?} matrix");
        if projection.is_attention() {
            let a = l.attention.as_ref().with_context(missing)?;
            let width = a.heads.len() * a.head_size;
            return Ok(match projection {
                Projection::Query => (&a.qkv, Some((0, width))),
                Projection::Key => (&a.qkv, Some((width, width))),
                Projection::Value => (&a.qkv, Some((2 * width, width))),
                _ => (&a.output, None),
            });
        }
        let f = l.ffn.as_ref().with_context(missing)?;
        Ok(match projection {
            Projection::Intermediate => (&f.intermediate, None),
            _ => (&f.output, None),
        })
    }
}

/// `fused` with rows `start..start + len` replaced by `part`: dense when every part is dense,
/// otherwise the parts stacked.
fn replace_rows(fused: &Weight, start: usize, len: usize, part: Weight) -> Result<Weight> {
    let rows = fused.dims().0;
    let mut parts = Vec::new();
    if start > 0 {
        parts.push(fused.narrow_rows(0, start)?);
    }
    parts.push(part);
    if start + len < rows {
        parts.push(fused.narrow_rows(start + len, rows - start - len)?);
    }
    let flat: Vec<Weight> = parts
        .into_iter()
        .flat_map(|p| match p {
            Weight::Stacked(inner) => inner.parts,
            other => vec![other],
        })
        .collect();
    if flat.iter().all(Weight::is_dense) {
        let dense = flat
            .iter()
            .map(Weight::to_dense)
            .collect::<candle_core::Result<Vec<Tensor>>>()?;
        return Ok(Weight::Dense(Tensor::cat(&dense, 0)?));
    }
    Ok(Weight::Stacked(Stack::new(flat)?))
}
