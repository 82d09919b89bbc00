//! Column-stripe block-sparse matrices, the storage of block-structured pruning's row-segment
//! groups: the columns of a `[out, in]` matrix are cut into stripes of equal width, and each
//! stripe keeps only the rows whose segment survived. `x Wᵀ` is then, per stripe, a dense product
//! of the stripe's input columns with its kept segments, scattered into the kept outputs — the
//! removed zeros are neither stored nor multiplied. Few input rows, the fewer the denser the
//! matrix (a sentence at batch 1 when most weights are removed), take direct dot products over
//! the kept segments instead, faster than either product there.
//! Where the stripes are slower than the dense product for many rows, the matrix is also
//! materialised dense for those (see [`Striped::dense_execution`]).

use candle_core::{bail, DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::kernels::fused_attention::dot;

/// Inputs whose rows × kept fraction is at most this are multiplied by direct dot products;
/// larger ones go through a dense product per stripe (the crossover of `cargo bench --bench
/// striped`: e.g. 16 rows at 20 % kept, 32 at 10 %, a single row at any density).
const DIRECT_WORK: f64 = 4.0;

/// One stripe: the kept output rows and their segments.
#[derive(Debug, Clone)]
pub struct Stripe {
    /// Kept output rows, ascending.
    pub rows: Vec<u32>,
    /// `[rows, width]`, the kept row segments.
    pub values: Tensor,
    /// The same segments, row-major, for the direct products of small inputs.
    flat: Vec<f32>,
}

impl Stripe {
    fn new(rows: Vec<u32>, values: Tensor) -> Result<Self> {
        let values = values.contiguous()?;
        let flat = values.flatten_all()?.to_vec1()?;
        Ok(Stripe { rows, values, flat })
    }
}

/// A `[out, in]` matrix stored as column stripes of kept row segments.
#[derive(Debug, Clone)]
pub struct Striped {
    /// `(out, in)`.
    pub dims: (usize, usize),
    /// The stripes, left to right.
    pub stripes: Vec<Stripe>,
    /// The matrix materialised dense, when it runs dense.
    dense: Option<Tensor>,
}

impl Striped {
    /// Stores `w` as `stripes` column stripes, keeping the row segments with any non-zero entry.
    pub fn from_dense(w: &Tensor, stripes: usize) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        if stripes == 0 || inp % stripes != 0 {
            bail!("{stripes} stripes do not tile {inp} columns");
        }
        let width = inp / stripes;
        let norms: Vec<f32> = w
            .sqr()?
            .reshape((out, stripes, width))?
            .sum(2)?
            .flatten_all()?
            .to_vec1()?;
        let mut parts = Vec::with_capacity(stripes);
        for s in 0..stripes {
            let rows: Vec<u32> = (0..out)
                .filter(|&r| norms[r * stripes + s] > 0.0)
                .map(|r| r as u32)
                .collect();
            let values = w.narrow(1, s * width, width)?.contiguous()?;
            let index = Tensor::new(rows.as_slice(), &Device::Cpu)?;
            parts.push(Stripe::new(rows, values.index_select(&index, 0)?)?);
        }
        Ok(Striped {
            dims: (out, inp),
            stripes: parts,
            dense: None,
        })
    }

    /// The matrix from stored parts: kept rows per stripe (`counts`), the rows themselves
    /// concatenated, and the segments `[Σ counts, width]`. Refuses parts that do not fit.
    pub fn from_parts(out: usize, counts: &[usize], rows: &[u32], values: &Tensor) -> Result<Self> {
        let (total, width) = values.dims2()?;
        if counts.iter().sum::<usize>() != total || rows.len() != total {
            bail!("stripe counts, rows and segments disagree");
        }
        let mut stripes = Vec::with_capacity(counts.len());
        let mut start = 0;
        for &n in counts {
            let r = rows[start..start + n].to_vec();
            if r.windows(2).any(|w| w[0] >= w[1]) || r.last().is_some_and(|&x| x as usize >= out) {
                bail!("stripe rows must ascend and lie below {out}");
            }
            stripes.push(Stripe::new(r, values.narrow(0, start, n)?)?);
            start += n;
        }
        Ok(Striped {
            dims: (out, width * counts.len()),
            stripes,
            dense: None,
        })
    }

    /// Width of every stripe.
    pub fn width(&self) -> usize {
        self.dims.1 / self.stripes.len().max(1)
    }

    /// Entries stored (the kept weights).
    pub fn kept(&self) -> usize {
        self.stripes.iter().map(|s| s.rows.len()).sum::<usize>() * self.width()
    }

    /// Kept weights / weights of the dense matrix.
    pub fn density(&self) -> f64 {
        self.kept() as f64 / (self.dims.0 * self.dims.1).max(1) as f64
    }

    /// How the matrix runs, for `inspect`: its stripes and kept share, and whether many rows run
    /// dense.
    pub fn runs_as(&self) -> String {
        let how = match self.dense_execution() {
            true => "dense for many rows",
            false => "stripes",
        };
        let (stripes, kept) = (self.stripes.len(), 100.0 * self.density());
        format!("{stripes} column stripes, {kept:.1} % kept; direct products for few rows, {how}")
    }

    /// Whether the matrix runs as a dense product.
    pub fn dense_execution(&self) -> bool {
        self.dense.is_some()
    }

    /// The materialised dense matrix when `rows` input rows run on it (a matrix that runs dense,
    /// at more rows than the direct products take).
    pub fn dense_for(&self, rows: usize) -> Option<&Tensor> {
        self.dense.as_ref().filter(|_| !self.runs_direct(rows))
    }

    /// True when `rows` input rows run by direct dot products.
    fn runs_direct(&self, rows: usize) -> bool {
        rows as f64 * self.density() <= DIRECT_WORK
    }

    /// The same matrix, run dense (`true`) or stripe by stripe.
    pub fn with_dense_execution(mut self, dense: bool) -> Result<Self> {
        self.dense = match dense {
            true => Some(self.to_dense()?),
            false => None,
        };
        Ok(self)
    }

    /// The matrix as a dense tensor `[out, in]`, zeros where nothing is kept.
    pub fn to_dense(&self) -> Result<Tensor> {
        if let Some(d) = &self.dense {
            return Ok(d.clone());
        }
        let (out, inp) = self.dims;
        let width = self.width();
        let mut columns = Vec::with_capacity(self.stripes.len());
        for s in &self.stripes {
            let zeros = Tensor::zeros((out, width), DType::F32, &Device::Cpu)?;
            columns.push(match s.rows.is_empty() {
                true => zeros,
                false => zeros.index_add(&self::index(&s.rows)?, &s.values, 0)?,
            });
        }
        match columns.is_empty() {
            true => Tensor::zeros((out, inp), DType::F32, &Device::Cpu),
            false => Tensor::cat(&columns, 1),
        }
    }

    /// `x Wᵀ` for `x` of shape `[n, in]`: direct dot products for few rows; otherwise per
    /// stripe, the stripe's columns of `x` times its kept segments (a dense product), added into
    /// the kept outputs of every row — or the dense product, when the matrix runs dense.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (n, out) = (x.dim(0)?, self.dims.0);
        if self.runs_direct(n) {
            return self.matmul_t_direct(x);
        }
        if let Some(d) = &self.dense {
            return x.matmul(&d.t()?);
        }
        let width = self.width();
        let mut y = vec![0f32; n * out];
        for (i, s) in self.stripes.iter().enumerate() {
            if s.rows.is_empty() {
                continue;
            }
            let columns = x.narrow(1, i * width, width)?.contiguous()?;
            let part: Vec<f32> = columns.matmul(&s.values.t()?)?.flatten_all()?.to_vec1()?;
            let k = s.rows.len();
            y.par_chunks_mut(out)
                .zip(part.par_chunks(k))
                .for_each(|(y_row, p_row)| {
                    for (&r, &v) in s.rows.iter().zip(p_row) {
                        y_row[r as usize] += v;
                    }
                });
        }
        Tensor::from_vec(y, (n, out), &Device::Cpu)
    }

    /// `x Wᵀ` by one dot product per kept segment and row (what a few rows of `x` take).
    pub fn matmul_t_direct(&self, x: &Tensor) -> Result<Tensor> {
        let (n, out) = (x.dim(0)?, self.dims.0);
        let (inp, width) = (self.dims.1, self.width());
        let x: Vec<f32> = x.contiguous()?.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; n * out];
        for (i, s) in self.stripes.iter().enumerate() {
            for (row, y_row) in x.chunks_exact(inp).zip(y.chunks_exact_mut(out)) {
                let xs = &row[i * width..(i + 1) * width];
                for (&r, segment) in s.rows.iter().zip(s.flat.chunks_exact(width)) {
                    y_row[r as usize] += dot(xs, segment);
                }
            }
        }
        Tensor::from_vec(y, (n, out), &Device::Cpu)
    }

    /// Output rows `start..start + len` as a matrix of their own.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        let end = (start + len) as u32;
        let mut stripes = Vec::with_capacity(self.stripes.len());
        for s in &self.stripes {
            let at: Vec<u32> = (0..s.rows.len() as u32)
                .filter(|&i| (start as u32..end).contains(&s.rows[i as usize]))
                .collect();
            let rows = at
                .iter()
                .map(|&i| s.rows[i as usize] - start as u32)
                .collect();
            stripes.push(Stripe::new(rows, s.values.index_select(&index(&at)?, 0)?)?);
        }
        let striped = Striped {
            dims: (len, self.dims.1),
            stripes,
            dense: None,
        };
        striped.with_dense_execution(self.dense_execution())
    }

    /// Matrices with the same columns and stripes, stacked along the outputs.
    pub fn stack(parts: &[&Striped]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("nothing to stack");
        };
        let mut stripes = Vec::with_capacity(first.stripes.len());
        for i in 0..first.stripes.len() {
            let (mut rows, mut values, mut offset) = (Vec::new(), Vec::new(), 0);
            for p in parts {
                if p.dims.1 != first.dims.1 || p.stripes.len() != first.stripes.len() {
                    bail!("stacked stripe matrices must share their columns and stripes");
                }
                rows.extend(p.stripes[i].rows.iter().map(|r| r + offset));
                values.push(p.stripes[i].values.clone());
                offset += p.dims.0 as u32;
            }
            stripes.push(Stripe::new(rows, Tensor::cat(&values, 0)?)?);
        }
        let out = parts.iter().map(|p| p.dims.0).sum();
        let striped = Striped {
            dims: (out, first.dims.1),
            stripes,
            dense: None,
        };
        striped.with_dense_execution(parts.iter().all(|p| p.dense_execution()))
    }

    /// What is stored: kept rows per stripe, the rows concatenated, the segments `[Σ, width]`.
    pub fn packed(&self) -> Result<(Vec<usize>, Vec<u32>, Tensor)> {
        let counts = self.stripes.iter().map(|s| s.rows.len()).collect();
        let rows = self.stripes.iter().flat_map(|s| s.rows.clone()).collect();
        let values: Vec<Tensor> = self.stripes.iter().map(|s| s.values.clone()).collect();
        Ok((counts, rows, Tensor::cat(&values, 0)?))
    }
}

/// `rows` as an index tensor.
fn index(rows: &[u32]) -> Result<Tensor> {
    Tensor::new(rows, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;

    /// A `[12, 16]` matrix with some row segments of 4 stripes zeroed.
    fn sparse() -> Tensor {
        let w = Tensor::randn(0f32, 1.0, (12, 16), &Device::Cpu).unwrap();
        let mask: Vec<f32> = (0..12 * 16)
            .map(|i| f32::from((i / 16 + (i % 16) / 4) % 3 != 0))
            .collect();
        (w * Tensor::from_vec(mask, (12, 16), &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn stripes_store_only_kept_segments_and_multiply_like_the_dense_matrix() {
        let w = sparse();
        let s = Striped::from_dense(&w, 4).unwrap();
        assert_eq!(s.kept(), 12 * 16 * 2 / 3);
        assert_eq!(max_abs_diff(&s.to_dense().unwrap(), &w), 0.0);
        let dense = s.clone().with_dense_execution(true).unwrap();
        assert!(6.0 * s.density() <= DIRECT_WORK && 7.0 * s.density() > DIRECT_WORK);
        for rows in [1, 6, 7, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 16), &Device::Cpu).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert!(
                max_abs_diff(&s.matmul_t(&x).unwrap(), &want) < 1e-5,
                "{rows} rows"
            );
            assert!(max_abs_diff(&dense.matmul_t(&x).unwrap(), &want) < 1e-5);
        }
    }

    #[test]
    fn rows_narrow_stack_and_pack_without_changing_a_value() {
        let w = sparse();
        let s = Striped::from_dense(&w, 4).unwrap();
        let (a, b) = (s.narrow_rows(0, 5).unwrap(), s.narrow_rows(5, 7).unwrap());
        assert_eq!(
            max_abs_diff(&b.to_dense().unwrap(), &w.narrow(0, 5, 7).unwrap()),
            0.0
        );
        let stacked = Striped::stack(&[&a, &b]).unwrap();
        assert_eq!(max_abs_diff(&stacked.to_dense().unwrap(), &w), 0.0);
        let (counts, rows, values) = s.packed().unwrap();
        let back = Striped::from_parts(12, &counts, &rows, &values).unwrap();
        assert_eq!(max_abs_diff(&back.to_dense().unwrap(), &w), 0.0);
        assert!(Striped::from_parts(3, &counts, &rows, &values).is_err());
    }
}
