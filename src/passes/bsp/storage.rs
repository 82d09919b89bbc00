//! BSP's last step: every pruned matrix is stored as column stripes ([`Striped`]), so the
//! removed groups take no space. Few input rows run on the stripes by direct dot products
//! (faster than the dense product where they are used, see [`Striped::matmul_t`]); many rows run
//! stripe by stripe where that is faster than the dense product, on the materialised dense matrix
//! otherwise. The choice is a fixed kept-fraction threshold measured with `cargo bench --bench
//! striped` (a decision timed during the run would make equal runs write different bytes).

use anyhow::Result;
use serde::Serialize;

use crate::model::linear::{Linear, Weight};
use crate::model::striped::Striped;
use crate::model::Model;

/// Kept fraction at or below which the stripes ran faster than the dense product at 256 input
/// rows for MiniLM's and BERT-base's shapes on the 2-core machine (see the bench).
pub const STRIPED_MAX_DENSITY: f64 = 0.21;

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

/// `model` with each matrix in `names` (parameter names) stored as `stripes` column stripes.
pub fn store_striped(
    model: &Model,
    names: &[String],
    stripes: usize,
) -> Result<(Model, Vec<StoredMatrix>)> {
    let mut out = model.clone();
    let mut stored = Vec::new();
    let mut convert = |name: String, linear: &mut Linear| -> Result<()> {
        if !names.contains(&name) {
            return Ok(());
        }
        let Weight::Dense(w) = &linear.weight else {
            return Ok(());
        };
        let striped = Striped::from_dense(w, stripes)?;
        let density = striped.kept() as f64 / w.elem_count().max(1) as f64;
        let dense = density > STRIPED_MAX_DENSITY;
        stored.push(StoredMatrix {
            name,
            density,
            execution: if dense { "dense" } else { "stripes" },
        });
        linear.weight = Weight::Striped(striped.with_dense_execution(dense)?);
        Ok(())
    };
    for (l, layer) in out.layers.iter_mut().enumerate() {
        if let Some(a) = layer.attention.as_mut() {
            convert(format!("layer.{l}.attention.qkv.weight"), &mut a.qkv)?;
            convert(format!("layer.{l}.attention.output.weight"), &mut a.output)?;
        }
        if let Some(f) = layer.ffn.as_mut() {
            convert(
                format!("layer.{l}.ffn.intermediate.weight"),
                &mut f.intermediate,
            )?;
            convert(format!("layer.{l}.ffn.output.weight"), &mut f.output)?;
        }
    }
    Ok((out, stored))
}
