//! FFN neurons that BSP removed whole — an all-zero row of the FFN input matrix, or an all-zero
//! column of the FFN output matrix — are sliced out physically, so they cost nothing with no
//! special kernel. A neuron whose input row is zero still outputs `act(b_i)`: that constant's
//! share of the output, `act(b_i) · W_out[:, i]`, is added to the output bias first, so the
//! sliced model computes what the masked one did.

use anyhow::Result;
use candle_core::{Tensor, D};

use crate::model::encoder::FeedForward;
use crate::model::linear::Weight;
use crate::model::nn::activate;
use crate::model::Model;

/// Positions whose row (`dim` 1 summed) or column (`dim` 0 summed) of `w` is all zero.
fn zero_lines(w: &Tensor, dim: usize) -> Result<Vec<bool>> {
    let counts: Vec<f32> = w
        .ne(0f32)?
        .to_dtype(candle_core::DType::F32)?
        .sum(dim)?
        .to_vec1()?;
    Ok(counts.into_iter().map(|c| c == 0.0).collect())
}

/// The neurons of `ffn` to keep, after folding the constant outputs of those with a zero input
/// row into the output bias. `None` when either matrix is not dense.
fn live_neurons(ffn: &mut FeedForward) -> Result<Option<Vec<usize>>> {
    let (Weight::Dense(w_in), Weight::Dense(w_out)) =
        (&ffn.intermediate.weight, &ffn.output.weight)
    else {
        return Ok(None);
    };
    let dead_input = zero_lines(w_in, 1)?;
    let dead_output = zero_lines(w_out, 0)?;
    let constant: Vec<u32> = (0..dead_input.len())
        .filter(|&i| dead_input[i] && !dead_output[i])
        .map(|i| i as u32)
        .collect();
    if !constant.is_empty() {
        let idx = Tensor::new(constant.as_slice(), w_out.device())?;
        let outputs = activate(
            &ffn.intermediate.bias.index_select(&idx, 0)?,
            ffn.activation,
        )?;
        let share = w_out
            .index_select(&idx, 1)?
            .broadcast_mul(&outputs.unsqueeze(0)?)?
            .sum(D::Minus1)?;
        ffn.output.bias = (&ffn.output.bias + share)?;
    }
    Ok(Some(
        (0..dead_input.len())
            .filter(|&i| !dead_input[i] && !dead_output[i])
            .collect(),
    ))
}

/// `model` without the FFN neurons whose input row or output column is all zero, and how many
/// were sliced out.
pub fn slice_dead_neurons(model: &Model) -> Result<(Model, usize)> {
    let mut folded = model.clone();
    let mut keep = folded.keep_all();
    let mut sliced = 0;
    for (layer, k) in folded.layers.iter_mut().zip(keep.iter_mut()) {
        let Some(ffn) = layer.ffn.as_mut() else {
            continue;
        };
        if let Some(live) = live_neurons(ffn)? {
            sliced += ffn.width() - live.len();
            k.neurons = Some(live);
        }
    }
    Ok((folded.slice(&keep)?, sliced))
}
