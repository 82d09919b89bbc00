//! Ridge regression in closed form for layer-wise reconstruction: normal equations accumulated
//! batch by batch (each batch's products in f32, their sum in f64), regularised towards the
//! current weights, solved by Cholesky in f64.
//!
//! For features `A` (rows = tokens, a constant 1 appended for the bias) and targets `T`, the fit
//! `Θ` minimises `‖AΘ − T‖² + λ‖Θ − Θ₀‖²`, so `(AᵀA + λI) Θ = AᵀT + λΘ₀`, with
//! `λ = ridge · trace(AᵀA) / columns` (a scale-free strength).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// `AᵀA` and `AᵀT` summed over batches of rows.
pub struct NormalEquations {
    ata: Tensor,
    atb: Tensor,
    /// `Σ T²`, for the residuals.
    tt: f64,
    rows: usize,
}

/// A solved fit.
pub struct Fit {
    /// `[outputs, features]`, f32.
    pub weight: Tensor,
    /// `[outputs]`, f32.
    pub bias: Tensor,
    /// `‖AΘ₀ − T‖² / ‖T‖²` of the starting weights on the rows added.
    pub error_before: f64,
    /// The same for the fit.
    pub error_after: f64,
}

impl NormalEquations {
    /// Empty sums for `features` inputs (plus the bias column) and `outputs` targets.
    pub fn new(features: usize, outputs: usize) -> Result<Self> {
        let dev = &Device::Cpu;
        Ok(NormalEquations {
            ata: Tensor::zeros((features + 1, features + 1), DType::F64, dev)?,
            atb: Tensor::zeros((features + 1, outputs), DType::F64, dev)?,
            tt: 0.0,
            rows: 0,
        })
    }

    /// Adds rows: `features` `[rows, features]` and `targets` `[rows, outputs]` (f32).
    pub fn add(&mut self, features: &Tensor, targets: &Tensor) -> Result<()> {
        let ones = Tensor::ones((features.dim(0)?, 1), DType::F32, &Device::Cpu)?;
        self.accumulate(&Tensor::cat(&[features, &ones], 1)?, targets)
    }

    /// Adds rows with weights `[rows, 1]` (f32): each row's squared residual counts `weight²`
    /// times (a row of weight √2 counts as that row added twice).
    pub fn add_weighted(
        &mut self,
        features: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<()> {
        let a = Tensor::cat(&[&features.broadcast_mul(weights)?, weights], 1)?;
        self.accumulate(&a, &targets.broadcast_mul(weights)?)
    }

    /// Adds the rows `a` (features with the bias column) and `targets`.
    fn accumulate(&mut self, a: &Tensor, targets: &Tensor) -> Result<()> {
        // Products of one batch in f32 (a few hundred rows: rounding stays far below the ridge),
        // summed over batches in f64.
        let at = a.t()?.contiguous()?;
        let f64_of = |t: Tensor| t.to_dtype(DType::F64);
        self.ata = (&self.ata + f64_of(at.matmul(a)?)?)?;
        self.atb = (&self.atb + f64_of(at.matmul(&targets.contiguous()?)?)?)?;
        let t = targets.to_dtype(DType::F64)?;
        self.tt += t.sqr()?.sum_all()?.to_scalar::<f64>()?;
        self.rows += a.dim(0)?;
        Ok(())
    }

    /// Rows added so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The fit regularised towards `weight0` `[outputs, features]` / `bias0` `[outputs]` with
    /// strength `ridge`.
    pub fn solve(&self, weight0: &Tensor, bias0: &Tensor, ridge: f64) -> Result<Fit> {
        let n = self.ata.dim(0)?;
        let m = self.atb.dim(1)?;
        let mut ata: Vec<f64> = self.ata.flatten_all()?.to_vec1()?;
        let theta0 =
            Tensor::cat(&[&weight0.t()?, &bias0.unsqueeze(0)?], 0)?.to_dtype(DType::F64)?;
        let trace: f64 = (0..n).map(|i| ata[i * n + i]).sum();
        let lambda = ridge * (trace / n as f64).max(f64::MIN_POSITIVE);
        let mut rhs: Vec<f64> = (&self.atb + (&theta0 * lambda)?)?
            .flatten_all()?
            .to_vec1()?;
        for i in 0..n {
            ata[i * n + i] += lambda;
        }
        cholesky_solve(&mut ata, n, &mut rhs, m)?;
        let theta = Tensor::from_vec(rhs, (n, m), &Device::Cpu)?;
        let error_before = self.relative_residual(&theta0)?;
        let error_after = self.relative_residual(&theta)?;
        let theta = theta.to_dtype(DType::F32)?;
        Ok(Fit {
            weight: theta.narrow(0, 0, n - 1)?.t()?.contiguous()?,
            bias: theta.get(n - 1)?,
            error_before,
            error_after,
        })
    }

    /// `(AᵀA + λI)⁻¹` over the features and the bias column (`n × n`, row-major, f64), with
    /// `λ = damping · trace(AᵀA) / n`.
    pub fn gram_inverse(&self, damping: f64) -> Result<Vec<f64>> {
        let n = self.ata.dim(0)?;
        let mut ata: Vec<f64> = self.ata.flatten_all()?.to_vec1()?;
        let trace: f64 = (0..n).map(|i| ata[i * n + i]).sum();
        let lambda = damping * (trace / n as f64).max(f64::MIN_POSITIVE);
        for i in 0..n {
            ata[i * n + i] += lambda;
        }
        let mut inverse = vec![0f64; n * n];
        for i in 0..n {
            inverse[i * n + i] = 1.0;
        }
        cholesky_solve(&mut ata, n, &mut inverse, n)?;
        Ok(inverse)
    }

    /// `‖AΘ − T‖² / ‖T‖² = (tr(ΘᵀAᵀAΘ) − 2 tr(ΘᵀAᵀT) + ΣT²) / ΣT²`.
    fn relative_residual(&self, theta: &Tensor) -> Result<f64> {
        let quadratic = (theta * self.ata.matmul(theta)?)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let cross = (theta * &self.atb)?.sum_all()?.to_scalar::<f64>()?;
        Ok((quadratic - 2.0 * cross + self.tt) / self.tt.max(f64::MIN_POSITIVE))
    }
}

/// Solves `S X = B` in place for symmetric positive definite `S` (`n × n`, row-major, replaced by
/// its Cholesky factor) and `B` (`n × m`, row-major, replaced by `X`).
pub(super) fn cholesky_solve(s: &mut [f64], n: usize, b: &mut [f64], m: usize) -> Result<()> {
    cholesky(s, n)?;
    // L Y = B, then Lᵀ X = Y, a row of m right-hand sides at a time.
    for i in 0..n {
        let (solved, rest) = b.split_at_mut(i * m);
        let row = &mut rest[..m];
        for k in 0..i {
            axpy(row, -s[i * n + k], &solved[k * m..(k + 1) * m]);
        }
        row.iter_mut().for_each(|x| *x /= s[i * n + i]);
    }
    for i in (0..n).rev() {
        let (head, solved) = b.split_at_mut((i + 1) * m);
        let row = &mut head[i * m..];
        for k in i + 1..n {
            let offset = (k - i - 1) * m;
            axpy(row, -s[k * n + i], &solved[offset..offset + m]);
        }
        row.iter_mut().for_each(|x| *x /= s[i * n + i]);
    }
    Ok(())
}

/// Factors symmetric positive definite `s` (`n × n`, row-major) as `L Lᵀ` in place: `L` fills
/// the lower triangle and the diagonal; the strict upper triangle is left as it was.
pub(super) fn cholesky(s: &mut [f64], n: usize) -> Result<()> {
    for j in 0..n {
        let row_j = &s[j * n..j * n + j];
        let d = s[j * n + j] - dot(row_j, row_j);
        if d <= 0.0 || !d.is_finite() {
            bail!("the regularised normal equations are not positive definite (column {j})");
        }
        s[j * n + j] = d.sqrt();
        for i in j + 1..n {
            let (upper, lower) = s.split_at_mut(i * n);
            let row_j = &upper[j * n..j * n + j + 1];
            let row_i = &mut lower[..n];
            row_i[j] = (row_i[j] - dot(&row_i[..j], &row_j[..j])) / row_j[j];
        }
    }
    Ok(())
}

pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a4.zip(b4) {
        for i in 0..4 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

pub(super) fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_inverse_inverts_the_damped_gram_matrix() {
        let x = Tensor::randn(0f32, 1.0, (50, 4), &Device::Cpu).unwrap();
        let mut ne = NormalEquations::new(4, 1).unwrap();
        ne.add(
            &x,
            &Tensor::zeros((50, 1), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let inverse = ne.gram_inverse(0.0).unwrap();
        let ata: Vec<f64> = ne.ata.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..5 {
            for j in 0..5 {
                let product: f64 = (0..5).map(|k| ata[i * 5 + k] * inverse[k * 5 + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((product - want).abs() < 1e-9, "({i}, {j}): {product}");
            }
        }
    }

    #[test]
    fn cholesky_solves_a_known_system() {
        // S = [[4, 2], [2, 3]], X = [[1, 2], [3, -1]] → B = S X.
        let mut s = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![10.0, 6.0, 11.0, 1.0];
        cholesky_solve(&mut s, 2, &mut b, 2).unwrap();
        for (x, want) in b.iter().zip([1.0, 2.0, 3.0, -1.0]) {
            assert!((x - want).abs() < 1e-12, "{b:?}");
        }
    }

    #[test]
    fn a_row_of_weight_root_two_counts_as_that_row_twice() {
        let f = Tensor::new(&[[1f32, 2.0], [0.5, -1.0], [3.0, 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[1f32], [2.0], [-1.0]], &Device::Cpu).unwrap();
        let mut weighted = NormalEquations::new(2, 1).unwrap();
        let w = Tensor::new(&[[1f32], [2f32.sqrt()], [1.0]], &Device::Cpu).unwrap();
        weighted.add_weighted(&f, &t, &w).unwrap();
        let mut twice = NormalEquations::new(2, 1).unwrap();
        twice.add(&f, &t).unwrap();
        twice
            .add(&f.narrow(0, 1, 1).unwrap(), &t.narrow(0, 1, 1).unwrap())
            .unwrap();
        let (w0, b0) = (
            Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let (a, b) = (
            weighted.solve(&w0, &b0, 1e-3).unwrap(),
            twice.solve(&w0, &b0, 1e-3).unwrap(),
        );
        let close = |x: &Tensor, y: &Tensor| crate::testing::max_abs_diff(x, y) < 1e-4;
        assert!(close(&a.weight, &b.weight) && close(&a.bias, &b.bias));
        assert!((a.error_after - b.error_after).abs() < 1e-6);
    }

    #[test]
    fn an_exact_linear_map_is_recovered_and_ridge_pulls_towards_the_start() {
        let dev = &Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (200, 6), dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 6), dev).unwrap();
        let b = Tensor::new(&[0.5f32, -1.0, 2.0], dev).unwrap();
        let y = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let mut ne = NormalEquations::new(6, 3).unwrap();
        ne.add(&x.narrow(0, 0, 120).unwrap(), &y.narrow(0, 0, 120).unwrap())
            .unwrap();
        ne.add(
            &x.narrow(0, 120, 80).unwrap(),
            &y.narrow(0, 120, 80).unwrap(),
        )
        .unwrap();
        assert_eq!(ne.rows(), 200);
        let zeros_w = w.zeros_like().unwrap();
        let zeros_b = b.zeros_like().unwrap();
        let diff = crate::testing::max_abs_diff;
        let fit = ne.solve(&zeros_w, &zeros_b, 1e-9).unwrap();
        assert!(diff(&fit.weight, &w) < 1e-4 && diff(&fit.bias, &b) < 1e-4);
        assert!(
            (fit.error_before - 1.0).abs() < 1e-9,
            "{}",
            fit.error_before
        );
        assert!(fit.error_after.abs() < 1e-5, "{}", fit.error_after);
        // A huge ridge keeps the starting point.
        assert!(diff(&ne.solve(&w, &b, 1e9).unwrap().weight, &w) < 1e-4);
        let stay = ne.solve(&zeros_w, &zeros_b, 1e9).unwrap();
        assert!(
            stay.weight
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-4
        );
    }
}
