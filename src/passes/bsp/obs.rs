//! bsp's hard prune by the optimal brain surgeon (`hard_prune = "obs"`), layer by layer as in
//! SparseGPT: each matrix keeps the share of groups the magnitude rule would keep (so a global
//! threshold still sets how much each matrix loses), but which groups go, and how the weights
//! that stay absorb their loss, follow from the matrix's inputs on calibration sentences
//! ([`super::surgeon`]).
//!
//! The inputs are the pruned model's own: the layers before, and the matrices before in the same
//! layer (Q/K/V, attention output, FFN in, FFN out), are pruned already, so each matrix also
//! corrects the error that reaches it.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use serde::Serialize;

use super::surgeon::{self, RowMajor, Tile};
use super::Matrix;
use crate::kernels::Ops;
use crate::model::encoder::EncoderLayer;
use crate::model::encoder::Queries;
use crate::model::inputs::Inputs;
use crate::model::linear::Weight;
use crate::model::Model;
use crate::passes::reconstruct::{real_rows, select_rows};
use crate::train::lasso::Grouping;

/// The matrices of a layer, in the order their inputs are computed.
const ORDER: [Matrix; 4] = [
    Matrix::Qkv,
    Matrix::AttentionOutput,
    Matrix::FfnIn,
    Matrix::FfnOut,
];

/// One matrix's prune, for the report: relative squared error of its outputs on the calibration
/// inputs, `‖(W − W′)X‖² / ‖WX‖²`.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixFit {
    /// Parameter name.
    pub matrix: String,
    /// Share of the weights removed (as the magnitude rule's, up to rounding per block).
    pub removed: f64,
    /// The error after the surgeon's choice and correction.
    pub error: f64,
    /// The error of the magnitude rule's groups removed with no correction.
    pub magnitude_error: f64,
}

/// What the surgeon leaves.
pub struct Surgery {
    /// The model with the groups removed and the rest corrected.
    pub model: Model,
    /// Kept-entry masks (1 kept, 0 removed) by parameter name.
    pub masks: BTreeMap<String, Tensor>,
    /// Every matrix's errors.
    pub fits: Vec<MatrixFit>,
}

/// Prunes the matrices of `model` named in `magnitude` (the magnitude rule's kept-entry masks,
/// which set each matrix's share) by the surgeon on the `calibration` batches.
pub fn operate(
    model: &Model,
    magnitude: &BTreeMap<String, Tensor>,
    grouping: Grouping,
    calibration: &[Inputs],
    progress: &ProgressBar,
) -> Result<Surgery> {
    let mut out = model.clone();
    let rows: Vec<Tensor> = calibration.iter().map(real_rows).collect::<Result<_>>()?;
    let mut states: Vec<Tensor> = (calibration.iter())
        .map(|b| model.embed(b, Ops::Inference))
        .collect::<Result<_>>()?;
    let (mut masks, mut fits) = (BTreeMap::new(), Vec::new());
    for l in 0..out.num_layers() {
        for m in ORDER {
            let name = m.param(l);
            let Some(keep) = magnitude.get(&name) else {
                continue;
            };
            let layer = &mut out.layers[l];
            if m.linear_mut(layer).is_none_or(|x| x.weight.dims().1 == 0) {
                // No inputs (every head removed): nothing to choose.
                masks.insert(name, keep.clone());
                continue;
            }
            let gram = gram(layer, m, &states, calibration, &rows)?;
            let (mask, fit) = prune_matrix(layer, m, &gram, keep, grouping)?;
            masks.insert(name.clone(), mask);
            fits.push(MatrixFit {
                matrix: name,
                ..fit
            });
            progress.inc(1);
        }
        states = (states.iter().zip(calibration))
            .map(|(x, b)| {
                out.layers[l].forward(x, &b.mask_bias, None, Ops::Inference, Queries::All)
            })
            .collect::<candle_core::Result<_>>()?;
    }
    Ok(Surgery {
        model: out,
        masks,
        fits,
    })
}

/// The inputs of matrix `m` of `layer` on the states `x` entering the layer.
fn matrix_inputs(layer: &EncoderLayer, m: Matrix, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let absent = || format!("bsp: {m:?} of a layer without that block");
    Ok(match m {
        Matrix::Qkv => x.clone(),
        Matrix::AttentionOutput => {
            let att = layer.attention.as_ref().with_context(absent)?;
            att.flat_context(x, mask)?
        }
        Matrix::FfnIn => layer.after_attention(x, mask)?,
        Matrix::FfnOut => {
            let ffn = layer.ffn.as_ref().with_context(absent)?;
            ffn.activations(&layer.after_attention(x, mask)?)?
        }
    })
}

/// `Σ x xᵀ` over the real tokens of the calibration batches, for matrix `m`'s inputs (f64,
/// row-major; each batch's product in f32).
fn gram(
    layer: &EncoderLayer,
    m: Matrix,
    states: &[Tensor],
    batches: &[Inputs],
    rows: &[Tensor],
) -> Result<Vec<f64>> {
    let mut sum: Option<Tensor> = None;
    for ((x, batch), real) in states.iter().zip(batches).zip(rows) {
        let f = select_rows(&matrix_inputs(layer, m, x, &batch.mask_bias)?, real)?;
        let product = f.t()?.contiguous()?.matmul(&f)?.to_dtype(DType::F64)?;
        sum = Some(match sum {
            Some(s) => (s + product)?,
            None => product,
        });
    }
    let sum = sum.context("bsp: the surgeon needs calibration sentences")?;
    Ok(sum.flatten_all()?.to_vec1()?)
}

/// Prunes matrix `m` of `layer` in place to the share of `magnitude`'s removed entries; its
/// kept-entry mask and errors (the name left empty).
fn prune_matrix(
    layer: &mut EncoderLayer,
    m: Matrix,
    gram: &[f64],
    magnitude: &Tensor,
    grouping: Grouping,
) -> Result<(Tensor, MatrixFit)> {
    let linear = m
        .linear_mut(layer)
        .context("bsp: a masked matrix is missing")?;
    let weight = linear.weight.to_dense()?;
    let (o, i) = weight.dims2()?;
    let before: Vec<f64> = weight.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let magnitude: Vec<f32> = magnitude.flatten_all()?.to_vec1()?;
    let removed = magnitude.iter().filter(|&&k| k == 0.0).count() as f64 / (o * i).max(1) as f64;
    let (grid_rows, grid_cols) = grouping.grid(o, i)?;
    let tile = Tile {
        rows: o / grid_rows,
        cols: i / grid_cols,
    };
    let mut after = before.clone();
    let target = RowMajor {
        data: &mut after,
        rows: o,
        cols: i,
    };
    let keep = surgeon::prune(target, gram, removed, tile)?;
    let removed = keep.iter().filter(|&&k| !k).count() as f64 / keep.len().max(1) as f64;
    let dropped: Vec<f64> = (before.iter().zip(&magnitude))
        .map(|(&w, &k)| w * f64::from(k))
        .collect();
    let fit = MatrixFit {
        matrix: String::new(),
        removed,
        error: surgeon::output_error(&before, &after, (o, i), gram),
        magnitude_error: surgeon::output_error(&before, &dropped, (o, i), gram),
    };
    let as_f32 = |v: Vec<f32>| Tensor::from_vec(v, (o, i), &Device::Cpu);
    linear.weight = Weight::Dense(as_f32(after.iter().map(|&x| x as f32).collect())?);
    let mask = as_f32(keep.iter().map(|&k| f32::from(u8::from(k))).collect())?;
    Ok((mask, fit))
}
