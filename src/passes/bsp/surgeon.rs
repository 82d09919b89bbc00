//! The optimal-brain-surgeon prune of one matrix, after SparseGPT (Frantar & Alistarh 2023): the
//! groups to remove are chosen, and the weights that stay are corrected, so that the layer's
//! outputs `W x` change as little as possible on calibration inputs with Gram matrix
//! `H = Σ x xᵀ`.
//!
//! Columns are processed left to right. Removing entry `(r, c)` leaves an error `w_rc / U_cc`
//! that the later columns of row `r` absorb along row `c` of `U`, the upper Cholesky factor of
//! `H⁻¹` (`H⁻¹ = UᵀU`): that is the surgeon's optimal update with the earlier columns already
//! fixed. Groups are chosen block by block (128 columns, whole groups), by the surgeon's
//! saliency `Σ w² / U_cc²` over the group, with the weights as the earlier blocks left them.

use anyhow::Result;

use std::ops::Range;

use crate::passes::ridge::{axpy, cholesky, cholesky_solve, dot};

/// Damping added to the Gram matrix's diagonal, relative to its mean (SparseGPT's 1 %).
const DAMPING: f64 = 0.01;

/// Columns whose groups are chosen together (SparseGPT's adaptive mask blocks).
const MASK_BLOCK: usize = 128;

/// The shape of one group: a tile of `rows × cols` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// Rows of the matrix in one group.
    pub rows: usize,
    /// Columns of the matrix in one group.
    pub cols: usize,
}

/// A row-major `[rows, cols]` matrix of f64.
pub struct RowMajor<'a> {
    /// The entries.
    pub data: &'a mut [f64],
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs).
    pub cols: usize,
}

/// Removes a `ratio` of `w`'s groups (of every block of columns; groups that are all zero are
/// removed first, whatever their number) and corrects the rest against `gram` (`cols × cols`,
/// row-major). Returns the kept-entry mask (row-major); removed entries are exactly zero.
pub fn prune(mut w: RowMajor, gram: &[f64], ratio: f64, tile: Tile) -> Result<Vec<bool>> {
    let (rows, cols) = (w.rows, w.cols);
    let u = inverse_factor(gram, cols)?;
    let empty = empty_groups(&w, tile);
    let mut keep = vec![true; rows * cols];
    let width = (tile.cols * (MASK_BLOCK / tile.cols).max(1)).min(cols);
    let mut errors = vec![0f64; rows * width];
    for start in (0..cols).step_by(width.max(1)) {
        let block = start..(start + width).min(cols);
        choose(&w, &u, block.clone(), tile, ratio, &empty, &mut keep);
        sweep(&mut w, &u, block.clone(), &keep, &mut errors);
        propagate(&mut w, &u, block, &errors);
    }
    Ok(keep)
}

/// The upper Cholesky factor `U` of `(H + δI)⁻¹` (`n × n`, row-major), with `δ` = 1 % of the
/// mean diagonal; an input that never varies (zero diagonal) counts as one of unit variance.
fn inverse_factor(gram: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut h = gram.to_vec();
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let damp = DAMPING * mean.max(f64::MIN_POSITIVE);
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
        }
        h[i * n + i] += damp;
    }
    let mut inverse = vec![0f64; n * n];
    (0..n).for_each(|i| inverse[i * n + i] = 1.0);
    cholesky_solve(&mut h, n, &mut inverse, n)?;
    cholesky(&mut inverse, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = inverse[j * n + i];
        }
    }
    Ok(u)
}

/// For every group of the whole matrix (row-major over the group grid): true when all its
/// entries are zero (removed by an earlier round).
fn empty_groups(w: &RowMajor, tile: Tile) -> Vec<bool> {
    let grid_cols = w.cols / tile.cols;
    let mut empty = vec![true; (w.rows / tile.rows) * grid_cols];
    for r in 0..w.rows {
        for c in 0..w.cols {
            if w.data[r * w.cols + c] != 0.0 {
                empty[(r / tile.rows) * grid_cols + c / tile.cols] = false;
            }
        }
    }
    empty
}

/// Marks the removed groups of the columns `block` in `keep`: the empty ones, then the least
/// salient up to a `ratio` of the block's groups.
fn choose(
    w: &RowMajor,
    u: &[f64],
    block: Range<usize>,
    tile: Tile,
    ratio: f64,
    empty: &[bool],
    keep: &mut [bool],
) {
    let cols = w.cols;
    let block_groups = block.len() / tile.cols;
    let group_of =
        |r: usize, c: usize| (r / tile.rows) * block_groups + (c - block.start) / tile.cols;
    let mut saliency = vec![0f64; (w.rows / tile.rows) * block_groups];
    for r in 0..w.rows {
        for c in block.clone() {
            let d = u[c * cols + c];
            saliency[group_of(r, c)] += w.data[r * cols + c].powi(2) / (d * d);
        }
    }
    let first_group = block.start / tile.cols;
    let was_empty =
        |g: usize| empty[(g / block_groups) * (cols / tile.cols) + first_group + g % block_groups];
    let mut order: Vec<usize> = (0..saliency.len()).collect();
    order.sort_by(|&a, &b| {
        (was_empty(b).cmp(&was_empty(a)))
            .then(saliency[a].total_cmp(&saliency[b]))
            .then(a.cmp(&b))
    });
    let forced = order.iter().filter(|&&g| was_empty(g)).count();
    let removed = ((ratio * saliency.len() as f64).round() as usize).max(forced);
    let mut removed_group = vec![false; saliency.len()];
    order[..removed.min(order.len())]
        .iter()
        .for_each(|&g| removed_group[g] = true);
    for r in 0..w.rows {
        for c in block.clone() {
            keep[r * cols + c] = !removed_group[group_of(r, c)];
        }
    }
}

/// Zeroes the removed entries of the columns `block`, one column at a time, moving each one's
/// error onto the block's later columns; `errors` (`rows × block.len()`) receives the errors.
fn sweep(w: &mut RowMajor, u: &[f64], block: Range<usize>, keep: &[bool], errors: &mut [f64]) {
    let (cols, n) = (w.cols, block.len());
    errors[..w.rows * n].fill(0.0);
    for (k, c) in block.clone().enumerate() {
        let d = u[c * cols + c];
        let later = &u[c * cols + c + 1..c * cols + block.end];
        for r in 0..w.rows {
            if keep[r * cols + c] {
                continue;
            }
            let row = &mut w.data[r * cols..(r + 1) * cols];
            let e = row[c] / d;
            row[c] = 0.0;
            errors[r * n + k] = e;
            axpy(&mut row[c + 1..block.end], -e, later);
        }
    }
}

/// Moves the errors of the columns `block` onto every later column: `W[:, end..] −= E · U[block,
/// end..]`.
fn propagate(w: &mut RowMajor, u: &[f64], block: Range<usize>, errors: &[f64]) {
    let (cols, n) = (w.cols, block.len());
    for r in 0..w.rows {
        let row = &mut w.data[r * cols + block.end..(r + 1) * cols];
        for (k, c) in block.clone().enumerate() {
            let e = errors[r * n + k];
            if e != 0.0 {
                axpy(row, -e, &u[c * cols + block.end..(c + 1) * cols]);
            }
        }
    }
}

/// `tr(Δ H Δᵀ) / tr(W H Wᵀ)` with `Δ = W − W′`: the relative squared error of the outputs on
/// the inputs whose Gram matrix is `gram`.
pub fn output_error(before: &[f64], after: &[f64], shape: (usize, usize), gram: &[f64]) -> f64 {
    let (rows, cols) = shape;
    let quadratic = |v: &dyn Fn(usize) -> f64| -> f64 {
        (0..rows)
            .map(|r| {
                let x: Vec<f64> = (0..cols).map(|c| v(r * cols + c)).collect();
                (0..cols)
                    .filter(|&i| x[i] != 0.0)
                    .map(|i| x[i] * dot(&gram[i * cols..(i + 1) * cols], &x))
                    .sum::<f64>()
            })
            .sum()
    };
    let change = quadratic(&|i| before[i] - after[i]);
    change / quadratic(&|i| before[i]).max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Correlated inputs `[n, cols]` (each a mix of a few shared sources) and their Gram matrix.
    fn inputs(n: usize, cols: usize) -> Vec<f64> {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let sources: Vec<f64> = (0..n * 4).map(|_| next()).collect();
        let mix: Vec<f64> = (0..4 * cols).map(|_| next()).collect();
        let mut x = vec![0f64; n * cols];
        for t in 0..n {
            for c in 0..cols {
                let shared: f64 = (0..4).map(|s| sources[t * 4 + s] * mix[s * cols + c]).sum();
                x[t * cols + c] = shared + 0.1 * next();
            }
        }
        x
    }

    fn gram(x: &[f64], cols: usize) -> Vec<f64> {
        let n = x.len() / cols;
        let mut g = vec![0f64; cols * cols];
        for t in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    g[i * cols + j] += x[t * cols + i] * x[t * cols + j];
                }
            }
        }
        g
    }

    fn weights(rows: usize, cols: usize) -> Vec<f64> {
        (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f64 / 50.0 - 1.0) * (1.0 + (i % 7) as f64 / 7.0))
            .collect()
    }

    /// The surgeon's kept-entry mask of `w` (pruned in place).
    fn run(w: &mut [f64], shape: (usize, usize), g: &[f64], ratio: f64, tile: Tile) -> Vec<bool> {
        let (rows, cols) = shape;
        prune(
            RowMajor {
                data: w,
                rows,
                cols,
            },
            g,
            ratio,
            tile,
        )
        .unwrap()
    }

    /// Removes the same groups by magnitude alone (no correction), for comparison.
    fn masked(w: &[f64], keep: &[bool]) -> Vec<f64> {
        w.iter()
            .zip(keep)
            .map(|(&x, &k)| if k { x } else { 0.0 })
            .collect()
    }

    #[test]
    fn the_surgeon_removes_whole_groups_and_corrects_the_rest() {
        let (rows, cols) = (8, 32);
        let g = gram(&inputs(400, cols), cols);
        let w0 = weights(rows, cols);
        let mut w = w0.clone();
        let tile = Tile { rows: 1, cols: 4 };
        let keep = run(&mut w, (rows, cols), &g, 0.5, tile);
        // Half the groups, whole groups, removed entries exactly zero.
        assert_eq!(keep.iter().filter(|k| !**k).count(), rows * cols / 2);
        for (group, entries) in keep.chunks(4).enumerate() {
            assert!(
                entries.iter().all(|&k| k == entries[0]),
                "group {group} split"
            );
        }
        assert!(keep.iter().zip(&w).all(|(&k, &x)| k || x == 0.0));
        // The correction beats dropping the same groups, and the surgeon's own choice beats
        // dropping the groups of smallest magnitude.
        let corrected = output_error(&w0, &w, (rows, cols), &g);
        let same_groups = output_error(&w0, &masked(&w0, &keep), (rows, cols), &g);
        assert!(
            corrected < 0.5 * same_groups,
            "{corrected} vs {same_groups}"
        );
        assert!(corrected > 0.0);
        let mut norms: Vec<(f64, usize)> = (w0.chunks(4))
            .map(|group| group.iter().map(|x| x * x).sum::<f64>())
            .zip(0..)
            .collect();
        norms.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut smallest = vec![true; rows * cols];
        for &(_, group) in &norms[..norms.len() / 2] {
            smallest[group * 4..group * 4 + 4].fill(false);
        }
        let magnitude = output_error(&w0, &masked(&w0, &smallest), (rows, cols), &g);
        assert!(corrected < magnitude, "{corrected} vs {magnitude}");
    }

    #[test]
    fn ratio_zero_changes_nothing_and_empty_groups_stay_removed() {
        let (rows, cols) = (4, 16);
        let g = gram(&inputs(100, cols), cols);
        let w0 = weights(rows, cols);
        let mut w = w0.clone();
        let tile = Tile { rows: 1, cols: 4 };
        let keep = run(&mut w, (rows, cols), &g, 0.0, tile);
        assert!(keep.iter().all(|&k| k));
        assert_eq!(w, w0);
        // A group already zero (an earlier round's) is removed again at ratio 0.
        let mut w = w0.clone();
        w[4..8].fill(0.0);
        let keep = run(&mut w, (rows, cols), &g, 0.0, tile);
        assert_eq!(keep.iter().filter(|k| !**k).count(), 4);
        assert!(!keep[4] && w[4..8].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn whole_column_groups_are_chosen_over_every_row() {
        let (rows, cols) = (6, 8);
        let g = gram(&inputs(200, cols), cols);
        let mut w = weights(rows, cols);
        let tile = Tile { rows, cols: 1 };
        let keep = run(&mut w, (rows, cols), &g, 0.25, tile);
        let removed: Vec<usize> = (0..cols).filter(|&c| !keep[c]).collect();
        assert_eq!(removed.len(), 2);
        for c in removed {
            assert!((0..rows).all(|r| !keep[r * cols + c] && w[r * cols + c] == 0.0));
        }
    }
}
