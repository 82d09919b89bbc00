//! Compensated FFN group removal for the re-fit-aware prune search (Optimal Brain Surgeon in
//! closed form, as in Hassibi & Stork 1993 and, layer-wise, Frantar & Alistarh 2022).
//!
//! Without it the search judges a group removal by the model *before* any re-fit, although the
//! level ends with a layer-wise re-fit ([`super::reconstruct`]): after a few removals every
//! further candidate looks costly and the search stops. Here each candidate is judged with the
//! FFN output projection of its layer already corrected. For features `A` (the layer's kept
//! activations on the selection tokens, plus a constant 1 for the bias) and `H = AᵀA + λI`,
//! removing the features `G` and changing the remaining weights to keep `A·wᵀ` as close as
//! possible (least squares, per output row `w`) is
//!
//! `w′ = w − w_G · (H⁻¹_GG)⁻¹ · H⁻¹_G,:`  (then drop the columns `G`),
//!
//! and after an accepted removal `H⁻¹` over the remaining features is
//! `H⁻¹_−G,−G − H⁻¹_−G,G · (H⁻¹_GG)⁻¹ · H⁻¹_G,−G`. Both cost `O(|G| · n)` per row, so judging a
//! candidate stays as cheap as before. Later layers keep the `H` of their inputs before the
//! removal (a slight staleness that only weakens their correction; every decision is still
//! measured on the real model).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::reconstruct::{ffn_inputs, real_rows, select_rows};
use super::ridge::{cholesky_solve, NormalEquations};
use crate::model::encoder::{EncoderLayer, FeedForward};
use crate::model::linear::Linear;
use crate::scoring::batch::ScoringBatch;

/// Damping of `H` relative to its mean diagonal (keeps the inverse well conditioned).
const DAMPING: f64 = 0.01;

/// The compensation state of one layer's FFN during a level.
pub struct FfnCompensation {
    /// Positions (in the level's input FFN) still kept, in the current model's order.
    kept: Vec<usize>,
    /// `H⁻¹` over the kept features and the bias column, `n × n`, row-major.
    hinv: Vec<f64>,
    /// The output projection with the bias as its last column, `[hidden, n]`, row-major.
    weight: Vec<f64>,
    hidden: usize,
}

/// A proposed removal: the layer's FFN with the group gone and its output projection corrected.
pub struct Proposal {
    /// Positions (in the level's input FFN) kept.
    pub kept: Vec<usize>,
    /// The removed features' indices among the current ones.
    columns: Vec<usize>,
    /// `(H⁻¹_GG)⁻¹ · H⁻¹_G,:` for those columns, `|G| × n`.
    correction: Vec<f64>,
    /// `[hidden, kept]` output projection.
    pub weight: Tensor,
    /// `[hidden]` output bias.
    pub bias: Tensor,
}

impl FfnCompensation {
    /// Measures `H` on `layer`'s own FFN inputs over `batches`, given the hidden states
    /// `entering` the layer per batch. `kept` lists the level-input positions of the layer's
    /// current neurons, in order.
    pub fn new(
        layer: &EncoderLayer,
        kept: Vec<usize>,
        entering: &[Tensor],
        batches: &[ScoringBatch],
    ) -> Result<Self> {
        let ffn = layer
            .ffn
            .as_ref()
            .context("compensation needs the layer's FFN")?;
        let width = ffn.width();
        anyhow::ensure!(
            width == kept.len(),
            "compensation: {width} neurons, {} positions",
            kept.len()
        );
        let inputs = ffn_inputs(layer, entering, batches)?;
        let mut equations = NormalEquations::new(width, 1)?;
        for (x, batch) in inputs.iter().zip(batches) {
            let rows = real_rows(&batch.inputs)?;
            let features = select_rows(&ffn.activations(x)?, &rows)?;
            let zeros = Tensor::zeros((features.dim(0)?, 1), DType::F32, &Device::Cpu)?;
            equations.add(&features, &zeros)?;
        }
        let hinv = equations.gram_inverse(DAMPING)?;
        let w = ffn.output.weight.to_dense()?.to_dtype(DType::F64)?;
        let bias = ffn.output.bias.to_dtype(DType::F64)?.unsqueeze(1)?;
        let weight = Tensor::cat(&[&w, &bias], 1)?.flatten_all()?.to_vec1()?;
        Ok(FfnCompensation {
            kept,
            hinv,
            weight,
            hidden: w.dim(0)?,
        })
    }

    fn n(&self) -> usize {
        self.kept.len() + 1
    }

    /// Indices (into the current features) of the level-input positions `removed`.
    fn columns(&self, removed: &[usize]) -> Result<Vec<usize>> {
        removed
            .iter()
            .map(|p| {
                self.kept
                    .iter()
                    .position(|k| k == p)
                    .with_context(|| format!("neuron {p} is no longer kept"))
            })
            .collect()
    }

    /// `(H⁻¹_GG)⁻¹ · H⁻¹_G,:` for the columns `g`, `|g| × n`, row-major.
    fn correction_rows(&self, g: &[usize]) -> Result<Vec<f64>> {
        let n = self.n();
        let mut block: Vec<f64> = g
            .iter()
            .flat_map(|&i| g.iter().map(move |&j| (i, j)))
            .map(|(i, j)| self.hinv[i * n + j])
            .collect();
        let mut rows: Vec<f64> = g
            .iter()
            .flat_map(|&i| self.hinv[i * n..(i + 1) * n].iter().copied())
            .collect();
        cholesky_solve(&mut block, g.len(), &mut rows, n)?;
        Ok(rows)
    }

    /// The layer with the level-input positions `removed` gone and the rest corrected.
    pub fn propose(&self, removed: &[usize]) -> Result<Proposal> {
        let (n, g) = (self.n(), self.columns(removed)?);
        let correction = self.correction_rows(&g)?;
        let keep: Vec<usize> = (0..n).filter(|c| !g.contains(c)).collect();
        let mut weight = Vec::with_capacity(self.hidden * (keep.len() - 1));
        let mut bias = Vec::with_capacity(self.hidden);
        for h in 0..self.hidden {
            let row = &self.weight[h * n..(h + 1) * n];
            let corrected = |c: usize| {
                row[c]
                    - g.iter()
                        .enumerate()
                        .map(|(r, &gc)| row[gc] * correction[r * n + c])
                        .sum::<f64>()
            };
            for &c in &keep[..keep.len() - 1] {
                weight.push(corrected(c) as f32);
            }
            bias.push(corrected(n - 1) as f32);
        }
        let kept = keep[..keep.len() - 1]
            .iter()
            .map(|&c| self.kept[c])
            .collect();
        let dev = &Device::Cpu;
        Ok(Proposal {
            kept,
            columns: g,
            correction,
            weight: Tensor::from_vec(weight, (self.hidden, keep.len() - 1), dev)?,
            bias: Tensor::from_vec(bias, self.hidden, dev)?,
        })
    }

    /// Records an accepted `proposal`: downdates `H⁻¹` and keeps the corrected weights.
    pub fn accept(&mut self, proposal: &Proposal) -> Result<()> {
        let (n, g, correction) = (self.n(), &proposal.columns, &proposal.correction);
        let keep: Vec<usize> = (0..n).filter(|c| !g.contains(c)).collect();
        let mut hinv = Vec::with_capacity(keep.len() * keep.len());
        for &i in &keep {
            for &j in &keep {
                let update: f64 = g
                    .iter()
                    .enumerate()
                    .map(|(r, &gc)| self.hinv[i * n + gc] * correction[r * n + j])
                    .sum();
                hinv.push(self.hinv[i * n + j] - update);
            }
        }
        let w: Vec<f64> = proposal.weight.to_dtype(DType::F64)?.to_vec2()?.concat();
        let b: Vec<f64> = proposal.bias.to_dtype(DType::F64)?.to_vec1()?;
        let width = keep.len() - 1;
        self.weight = (0..self.hidden)
            .flat_map(|h| w[h * width..(h + 1) * width].iter().copied().chain([b[h]]))
            .collect();
        self.hinv = hinv;
        self.kept = proposal.kept.clone();
        Ok(())
    }
}

/// `ffn` of the level's input restricted to `proposal`'s neurons, with its corrected output.
pub fn proposed_ffn(input: &FeedForward, proposal: &Proposal) -> Result<FeedForward> {
    Ok(FeedForward {
        intermediate: input.intermediate.select_outputs(&proposal.kept)?,
        output: Linear::dense(proposal.weight.clone(), proposal.bias.clone()),
        norm: input.norm.clone(),
        activation: input.activation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 7 × 7 positive definite `H` (6 features and the bias) from random rows, and weights.
    fn setup() -> (Vec<f64>, FfnCompensation) {
        let x = Tensor::randn(0f32, 1.0, (300, 6), &Device::Cpu).unwrap();
        let mut ne = NormalEquations::new(6, 1).unwrap();
        ne.add(
            &x,
            &Tensor::zeros((300, 1), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let hinv = ne.gram_inverse(DAMPING).unwrap();
        // H itself, by inverting the inverse.
        let mut h = hinv.clone();
        let mut identity = vec![0f64; 49];
        (0..7).for_each(|i| identity[i * 7 + i] = 1.0);
        cholesky_solve(&mut h, 7, &mut identity, 7).unwrap();
        let weight: Vec<f64> = (0..3 * 7)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 4.0)
            .collect();
        let comp = FfnCompensation {
            kept: vec![10, 11, 12, 13, 14, 15],
            hinv,
            weight,
            hidden: 3,
        };
        (identity, comp)
    }

    #[test]
    fn proposal_is_the_least_squares_correction_and_accept_downdates_the_inverse() {
        let (h, mut comp) = setup();
        let removed = [11, 14];
        let proposal = comp.propose(&removed).unwrap();
        assert_eq!(proposal.kept, vec![10, 12, 13, 15]);
        // Direct: w′_K = w_K + H_KK⁻¹ H_KG w_G (K = kept columns and the bias, G = removed).
        let (g, k) = ([1usize, 4], [0usize, 2, 3, 5, 6]);
        let w = proposal.weight.to_vec2::<f32>().unwrap();
        let b = proposal.bias.to_vec1::<f32>().unwrap();
        for row in 0..3 {
            let wr = &comp.weight[row * 7..(row + 1) * 7];
            let mut s: Vec<f64> = k.iter().flat_map(|&i| k.map(|j| h[i * 7 + j])).collect();
            let mut rhs: Vec<f64> = k
                .iter()
                .map(|&i| g.iter().map(|&j| h[i * 7 + j] * wr[j]).sum())
                .collect();
            cholesky_solve(&mut s, 5, &mut rhs, 1).unwrap();
            let direct: Vec<f64> = k.iter().zip(&rhs).map(|(&i, d)| wr[i] + d).collect();
            let ours: Vec<f64> = w[row].iter().chain([&b[row]]).map(|&v| v as f64).collect();
            for (o, d) in ours.iter().zip(&direct) {
                assert!(
                    (o - d).abs() < 1e-4 * (1.0 + d.abs()),
                    "row {row}: {ours:?} vs {direct:?}"
                );
            }
        }
        comp.accept(&proposal).unwrap();
        let mut h_kk: Vec<f64> = k.iter().flat_map(|&i| k.map(|j| h[i * 7 + j])).collect();
        let mut inverse = vec![0f64; 25];
        (0..5).for_each(|i| inverse[i * 5 + i] = 1.0);
        cholesky_solve(&mut h_kk, 5, &mut inverse, 5).unwrap();
        for (a, e) in comp.hinv.iter().zip(&inverse) {
            assert!(
                (a - e).abs() < 1e-9 * (1.0 + e.abs()),
                "{:?} vs {inverse:?}",
                comp.hinv
            );
        }
        assert_eq!(comp.kept, vec![10, 12, 13, 15]);
        assert!(
            comp.propose(&[11]).is_err(),
            "a removed neuron cannot be removed again"
        );
    }
}
