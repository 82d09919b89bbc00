//! BSP's last step: every pruned matrix is stored as column stripes ([`Striped`]), so the
//! removed groups take no space. Few input rows run on the stripes by direct dot products
//! (faster than the dense product where they are used, see [`Striped::matmul_t`]); many rows run
//! stripe by stripe where that is faster than the dense product, on the materialised dense matrix
//! otherwise. The choice is a fixed kept-fraction threshold measured with `cargo bench --bench
//! striped` (a decision timed during the run would make equal runs write different bytes).

use anyhow::Result;
use serde::Serialize;

use super::Matrix;
use crate::formats::striped::Striped;
use crate::model::linear::Weight;
use crate::model::Model;
use crate::train::lasso::Grouping;

/// Kept fraction at or below which the stripes ran faster than the dense product at 256 input
/// rows for MiniLM's and BERT-base's shapes on the 2-core machine (see the bench).
pub const STRIPED_MAX_DENSITY: f64 = 0.21;

/// The narrowest stripes that bench measured (48 columns, 8 stripes of 384). Narrower stripes
/// run the dense product: a per-stripe gemm over 16 columns lost to it (`bench` of a model of
/// 16-column stripes stored before this rule: b1 p50 0.64×, b32 0.88× against the original).
pub const STRIPED_MIN_WIDTH: usize = 48;

/// How one matrix was stored.
#[derive(Debug, Clone, Serialize)]
pub struct StoredMatrix {
    /// Parameter name (e.g. `layer.3.ffn.intermediate.weight`).
    pub name: String,
    /// Weights kept / weights of the dense matrix.
    pub density: f64,
    /// `stripes` or `dense`.
    pub execution: &'static str,
}

/// `model` with every matrix of the kinds `matrices` stored as the column stripes of `grouping`.
pub fn store_striped(
    model: &Model,
    matrices: &[Matrix],
    grouping: Grouping,
) -> Result<(Model, Vec<StoredMatrix>)> {
    let mut out = model.clone();
    let mut stored = Vec::new();
    for (l, layer) in out.layers.iter_mut().enumerate() {
        for &m in matrices {
            let Some(linear) = m.linear_mut(layer).filter(|x| x.out_features() > 0) else {
                continue;
            };
            let Weight::Dense(w) = &linear.weight else {
                continue;
            };
            let (out_features, in_features) = w.dims2()?;
            let (_, stripes) = grouping.grid(out_features, in_features)?;
            let striped = Striped::from_dense(w, stripes)?;
            let density = striped.density();
            let dense = density > STRIPED_MAX_DENSITY || striped.width() < STRIPED_MIN_WIDTH;
            stored.push(StoredMatrix {
                name: m.param(l),
                density,
                execution: if dense { "dense" } else { "stripes" },
            });
            linear.weight = Weight::Striped(striped.with_dense_execution(dense)?);
        }
    }
    Ok((out, stored))
}
