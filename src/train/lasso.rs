//! Reweighted group lasso (Li et al. 2020, after Candès et al.): the penalty
//! `λ Σ_g γ_g ‖W_g‖₂` over the groups of an encoder matrix, with `γ_g = 1 / (‖W_g‖₂ + ε)` taken
//! from the weights when the weights are refreshed, so that small groups are pushed to zero
//! harder than large ones.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// ε of the reweighting, as in the authors' code.
pub const REWEIGHT_EPS: f64 = 1e-3;

/// Keeps the root differentiable at a group of zeros.
const ROOT_EPS: f64 = 1e-12;

/// How a weight matrix `[out, in]` is cut into groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grouping {
    /// The columns cut into this many stripes; each row's segment in a stripe is a group.
    Stripes(usize),
    /// The columns cut into stripes of this width, so that every group holds as many weights
    /// whatever the matrix's shape (a global threshold then compares like with like).
    StripeWidth(usize),
    /// Square blocks of this side.
    Blocks(usize),
    /// Whole rows (outputs).
    Rows,
    /// Whole columns (inputs).
    Columns,
}

impl Grouping {
    /// The shape of the group-norm grid of an `[out, in]` matrix; refuses a matrix the groups do
    /// not tile.
    pub fn grid(self, out: usize, inp: usize) -> Result<(usize, usize)> {
        let tiles = |n: usize, k: usize| k > 0 && n.is_multiple_of(k);
        match self {
            Grouping::Stripes(s) if tiles(inp, s) => Ok((out, s)),
            Grouping::StripeWidth(w) if tiles(inp, w) => Ok((out, inp / w)),
            Grouping::Blocks(b) if tiles(out, b) && tiles(inp, b) => Ok((out / b, inp / b)),
            Grouping::Rows => Ok((out, 1)),
            Grouping::Columns => Ok((1, inp)),
            _ => bail!("{self:?} groups do not tile a {out}×{inp} matrix"),
        }
    }

    /// The L2 norm of every group, `[rows, cols]` of [`Self::grid`].
    pub fn norms(self, w: &Tensor) -> Result<Tensor> {
        Ok(self.squares(w)?.sqrt()?)
    }

    /// The sum of squares of every group, `[rows, cols]` of [`Self::grid`] (differentiable).
    fn squares(self, w: &Tensor) -> Result<Tensor> {
        let (out, inp) = w.dims2()?;
        let (r, c) = self.grid(out, inp)?;
        let sq = w.sqr()?;
        let sums = match self {
            Grouping::Stripes(_) | Grouping::StripeWidth(_) => {
                sq.reshape((out, c, inp / c))?.sum(D::Minus1)?
            }
            Grouping::Blocks(b) => sq.reshape((r, b, c, b))?.sum(3)?.sum(1)?,
            Grouping::Rows => sq.sum_keepdim(1)?,
            Grouping::Columns => sq.sum_keepdim(0)?,
        };
        Ok(sums)
    }

    /// Expands a per-group grid `[rows, cols]` to the matrix's shape (a mask from kept groups).
    pub fn expand(self, grid: &Tensor, out: usize, inp: usize) -> Result<Tensor> {
        let (r, c) = self.grid(out, inp)?;
        let (rh, cw) = (out / r, inp / c);
        Ok(grid
            .reshape((r, 1, c, 1))?
            .broadcast_as((r, rh, c, cw))?
            .reshape((out, inp))?)
    }
}

/// The penalty of one matrix: `λ Σ_g γ_g ‖W_g‖₂`.
pub struct GroupPenalty {
    /// How the matrix is grouped.
    pub grouping: Grouping,
    /// Strength λ.
    pub lambda: f64,
    /// Per-group weights γ, `[rows, cols]` of the grid (no gradient).
    pub gamma: Tensor,
}

impl GroupPenalty {
    /// A penalty reweighted from `w`'s current group norms.
    pub fn new(w: &Tensor, grouping: Grouping, lambda: f64) -> Result<Self> {
        let mut p = GroupPenalty {
            grouping,
            lambda,
            gamma: Tensor::zeros(1, w.dtype(), w.device())?,
        };
        p.reweight(w)?;
        Ok(p)
    }

    /// Sets `γ_g = 1 / (‖W_g‖₂ + ε)` from the current weights.
    pub fn reweight(&mut self, w: &Tensor) -> Result<()> {
        let norms = self.grouping.norms(&w.detach())?;
        self.gamma = (norms + REWEIGHT_EPS)?.recip()?;
        Ok(())
    }

    /// `λ Σ_g γ_g ‖W_g‖₂` (a scalar with gradients to `w`).
    pub fn value(&self, w: &Tensor) -> Result<Tensor> {
        let norms = (self.grouping.squares(w)? + ROOT_EPS)?.sqrt()?;
        let weighted = (norms * &self.gamma)?.sum_all()?;
        Ok((weighted * self.lambda)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn matrix() -> Tensor {
        let v: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        Tensor::from_vec(v, (4, 8), &Device::Cpu).unwrap()
    }

    #[test]
    fn group_norms_match_a_loop_over_the_groups() {
        let w = matrix();
        let rows: Vec<Vec<f32>> = w.to_vec2().unwrap();
        let norm = |r: std::ops::Range<usize>, c: std::ops::Range<usize>| {
            let mut s = 0f64;
            for i in r {
                for j in c.clone() {
                    s += (rows[i][j] as f64).powi(2);
                }
            }
            s.sqrt()
        };
        let two_stripes: Vec<f64> = (0..4)
            .flat_map(|i| [norm(i..i + 1, 0..4), norm(i..i + 1, 4..8)])
            .collect();
        let cases: [(Grouping, Vec<f64>); 5] = [
            (Grouping::Stripes(2), two_stripes.clone()),
            (Grouping::StripeWidth(4), two_stripes),
            (
                Grouping::Blocks(2),
                (0..2)
                    .flat_map(|i| (0..4).map(move |j| (i, j)))
                    .map(|(i, j)| norm(2 * i..2 * i + 2, 2 * j..2 * j + 2))
                    .collect(),
            ),
            (
                Grouping::Rows,
                (0..4).map(|i| norm(i..i + 1, 0..8)).collect(),
            ),
            (
                Grouping::Columns,
                (0..8).map(|j| norm(0..4, j..j + 1)).collect(),
            ),
        ];
        for (g, want) in cases {
            let got: Vec<f32> = g
                .norms(&w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got.len(), want.len(), "{g:?}");
            for (a, b) in got.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-4, "{g:?}: {a} vs {b}");
            }
        }
        assert!(Grouping::Stripes(3).norms(&w).is_err());
    }

    #[test]
    fn expanding_a_grid_covers_each_group_and_nothing_else() {
        let g = Grouping::Blocks(2);
        let grid = Tensor::new(&[[1f32, 0., 0., 1.], [0., 1., 0., 0.]], &Device::Cpu).unwrap();
        let mask: Vec<Vec<f32>> = g.expand(&grid, 4, 8).unwrap().to_vec2().unwrap();
        assert_eq!(mask[0], vec![1., 1., 0., 0., 0., 0., 1., 1.]);
        assert_eq!(mask[1], mask[0]);
        assert_eq!(mask[3], vec![0., 0., 1., 1., 0., 0., 0., 0.]);
    }

    #[test]
    fn reweighting_makes_every_group_weigh_about_one() {
        let w = matrix();
        let p = GroupPenalty::new(&w, Grouping::Stripes(4), 1.0).unwrap();
        let groups = 16.0;
        let v = p.value(&w).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(v < groups && v > groups * 0.99, "{v}");
    }
}
