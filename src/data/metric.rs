//! Task metrics: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.

/// Fraction of equal entries.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    let hits = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    hits as f64 / gold.len().max(1) as f64
}

/// F1 of the positive class (label 1).
pub fn f1(pred: &[usize], gold: &[usize]) -> f64 {
    let c = Confusion::of(pred, gold);
    let denom = 2.0 * c.tp + c.fp + c.fn_;
    if denom == 0.0 {
        0.0
    } else {
        2.0 * c.tp / denom
    }
}

/// Matthews correlation coefficient of binary predictions (0 when undefined, as scikit-learn).
pub fn mcc(pred: &[usize], gold: &[usize]) -> f64 {
    let c = Confusion::of(pred, gold);
    let denom = ((c.tp + c.fp) * (c.tp + c.fn_) * (c.tn + c.fp) * (c.tn + c.fn_)).sqrt();
    if denom == 0.0 {
        0.0
    } else {
        (c.tp * c.tn - c.fp * c.fn_) / denom
    }
}

/// Pearson correlation (0 when a side is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().max(1) as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// Spearman rank correlation (average ranks for ties).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// 1-based ranks with ties given their average rank.
pub fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = avg;
        }
        i = j + 1;
    }
    out
}

struct Confusion {
    tp: f64,
    fp: f64,
    tn: f64,
    fn_: f64,
}

impl Confusion {
    fn of(pred: &[usize], gold: &[usize]) -> Self {
        let mut c = Confusion {
            tp: 0.0,
            fp: 0.0,
            tn: 0.0,
            fn_: 0.0,
        };
        for (&p, &g) in pred.iter().zip(gold) {
            match (p == 1, g == 1) {
                (true, true) => c.tp += 1.0,
                (true, false) => c.fp += 1.0,
                (false, false) => c.tn += 1.0,
                (false, true) => c.fn_ += 1.0,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_metrics_match_hand_counts() {
        // tp=2 fp=1 tn=1 fn=1
        let pred = [1, 1, 1, 0, 0];
        let gold = [1, 1, 0, 0, 1];
        assert!((accuracy(&pred, &gold) - 0.6).abs() < 1e-12);
        assert!((f1(&pred, &gold) - 4.0 / 6.0).abs() < 1e-12);
        let expected = (2.0 * 1.0 - 1.0 * 1.0) / (3.0f64 * 3.0 * 2.0 * 2.0).sqrt();
        assert!((mcc(&pred, &gold) - expected).abs() < 1e-12);
        assert_eq!(mcc(&[1, 1], &[1, 0]), 0.0);
    }

    #[test]
    fn correlations() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((pearson(&x, &[2.0, 4.0, 6.0, 8.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[1.0, 10.0, 100.0, 1000.0]) - 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
        assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }
}
