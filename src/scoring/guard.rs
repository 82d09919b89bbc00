//! The statistical guard on every accept / reject decision: the drop of accuracy against the
//! *original* model is judged by a one-sided upper confidence bound from paired outcomes, not by
//! a point estimate.
//!
//! On the same examples, the original and a candidate are paired: `lost` examples the original
//! got right and the candidate gets wrong, `gained` the reverse. The drop is `(lost − gained) / n`
//! and its standard error (McNemar's, without the small `(lost − gained)² / n` term, which only
//! widens it) is `√(lost + gained) / n`. A candidate is kept when the drop's one-sided upper bound
//! at the run's confidence ([`drop_bound`]) stays within the allowance: the metric's *guarded*
//! value, the original's metric less that bound, must reach the floor.
//!
//! The bound is the smallest allowance `a` (in examples) that a test of "the true drop is `a`"
//! would not reject: `d + z·√max(lost + gained, a) ≤ a` with `d = lost − gained + ½`. The
//! variance is floored at its value under that hypothesis (at least `a` examples must change for
//! a drop of `a`), since the observed count is small exactly when the candidate got lucky, and
//! the half example is the usual continuity correction. Both keep the admission rate of a
//! candidate whose true drop is the allowance at the stated `1 − confidence` (the unit tests
//! draw it); a plain `d + z·√(lost + gained)` admitted up to 1.3× as often. At confidence 0.5
//! (`z = 0`) neither applies and the bound is the point estimate.
//!
//! A decision does not credit gains ([`decision_bound`]): it keeps the bound of `lost` alone,
//! which bounds the drop from above whatever the gains. A search that tries hundreds of
//! candidates finds some that gain on the selection examples by chance, and crediting those gains
//! let it spend the allowance on them: on a gold-labelled half of SST-2 dev, a size run ended
//! 3.44 points above the original on its selection split and 1.15 below on the report split.
//! The reports still give the paired drop, gains included, on every split.
//!
//! Under a selection labelled by the input model itself (`train-perturbed`) the original is right
//! everywhere, so there are no gains, `lost` counts disagreements and the guard bounds the share
//! of predictions that change, which bounds the accuracy drop on the same kind of text from above.
//! (Charging each disagreement the input's confidence margin instead was tried on 2026-12-06 and
//! reverted: the search kept removals whose flips fell on low-margin selection sentences, and a
//! size run bounded at 0.95 points on its selection lost 1.49 ± 0.64 on dev.)

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The default confidence of the guard and of the intervals in reports.
pub const DEFAULT_CONFIDENCE: f64 = 0.9;

/// Paired outcomes of the original and a candidate on the same `n` examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Paired {
    /// Examples.
    pub n: usize,
    /// Right under the original, wrong under the candidate.
    pub lost: usize,
    /// Wrong under the original, right under the candidate.
    pub gained: usize,
}

impl Paired {
    /// Tallies per-example correctness of the original and the candidate.
    pub fn of(original: &[bool], candidate: &[bool]) -> Self {
        let mut p = Paired {
            n: original.len(),
            ..Paired::default()
        };
        for (&o, &c) in original.iter().zip(candidate) {
            p.lost += usize::from(o && !c);
            p.gained += usize::from(!o && c);
        }
        p
    }

    /// Examples whose correctness differs.
    pub fn discordant(&self) -> usize {
        self.lost + self.gained
    }

    /// The drop of accuracy, as a fraction (negative: a gain).
    pub fn drop(&self) -> f64 {
        (self.lost as f64 - self.gained as f64) / self.n.max(1) as f64
    }

    /// The paired standard error of [`Paired::drop`] (McNemar's).
    pub fn standard_error(&self) -> f64 {
        let n = self.n.max(1) as f64;
        let d = self.drop();
        ((self.discordant() as f64 / n - d * d).max(0.0) / n).sqrt()
    }

    /// The two-sided interval of the drop at `confidence`, as fractions.
    pub fn interval(&self, confidence: f64) -> [f64; 2] {
        let half = z_two_sided(confidence) * self.standard_error();
        [self.drop() - half, self.drop() + half]
    }
}

/// The one-sided upper bound of the drop, in examples, from `lost` and `gained` at the normal
/// quantile `z` (see the module's text); the point estimate `lost − gained` when `z` is 0.
pub fn drop_bound(lost: usize, gained: usize, z: f64) -> f64 {
    let raw = lost as f64 - gained as f64;
    if z <= 0.0 {
        return raw;
    }
    let d = raw + 0.5;
    let wald = d + z * ((lost + gained) as f64).sqrt();
    // The root of a − z·√a = d, where the variance floor binds; none below d = −z²/4.
    if d < -z * z / 4.0 {
        return wald;
    }
    let root = (z + (z * z + 4.0 * d).sqrt()) / 2.0;
    wald.max(root * root)
}

/// The bound a decision keeps, in examples: under the guard (`z > 0`) the bound of `lost` alone,
/// gains not credited (see the module's text); at `z = 0`, no guard, the point estimate
/// `lost − gained` (the rule before 2026-12-05).
pub fn decision_bound(lost: usize, gained: usize, z: f64) -> f64 {
    let credited = if z > 0.0 { 0 } else { gained };
    drop_bound(lost, credited, z)
}

/// Checks a confidence level: 0.5 (no margin: the point estimate) up to 0.9999.
pub fn check_confidence(confidence: f64) -> Result<()> {
    if !(0.5..=0.9999).contains(&confidence) {
        bail!("confidence {confidence} is out of range: use a level in [0.5, 0.9999], e.g. 0.9 (0.5 decides by the point estimate)");
    }
    Ok(())
}

/// The one-sided normal quantile of `confidence`: the `z` with `P(Z ≤ z) = confidence`.
pub fn z_one_sided(confidence: f64) -> f64 {
    normal_quantile(confidence)
}

/// The two-sided normal quantile of `confidence`: `P(|Z| ≤ z) = confidence`.
pub fn z_two_sided(confidence: f64) -> f64 {
    normal_quantile(0.5 + confidence / 2.0)
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        let t = (-2.0 * q.ln()).sqrt();
        (((((C[0] * t + C[1]) * t + C[2]) * t + C[3]) * t + C[4]) * t + C[5])
            / ((((D[0] * t + D[1]) * t + D[2]) * t + D[3]) * t + 1.0)
    };
    const LOW: f64 = 0.02425;
    if p < LOW {
        tail(p)
    } else if p > 1.0 - LOW {
        -tail(1.0 - p)
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sample::SplitMix64;

    #[test]
    fn quantiles_match_the_tables() {
        for (p, z) in [
            (0.5, 0.0),
            (0.9, 1.281_551_565_5),
            (0.95, 1.644_853_626_9),
            (0.975, 1.959_963_985),
            (0.99, 2.326_347_874),
            (0.01, -2.326_347_874),
            (0.9999, 3.719_016_485),
        ] {
            assert!((z_one_sided(p) - z).abs() < 1e-6, "{p}: {}", z_one_sided(p));
        }
        assert!((z_two_sided(0.9) - 1.644_853_626_9).abs() < 1e-6);
        assert!(check_confidence(0.4).is_err() && check_confidence(1.0).is_err());
        assert!(check_confidence(0.5).is_ok() && check_confidence(0.9).is_ok());
    }

    #[test]
    fn paired_counts_and_error() {
        let p = Paired::of(&[true, true, false, false], &[false, true, true, false]);
        assert_eq!((p.n, p.lost, p.gained), (4, 1, 1));
        assert_eq!(p.drop(), 0.0);
        assert!((p.standard_error() - (0.5f64 / 4.0).sqrt()).abs() < 1e-12);
    }

    /// Draws `n` paired outcomes where the original is right with probability `accuracy` and
    /// each example flips with probability `flip_lost` (right → wrong) or `flip_gained`
    /// (wrong → right); returns whether the guard at `z` admits the candidate within `allowed`.
    fn guard_admits(
        rng: &mut SplitMix64,
        n: usize,
        accuracy: f64,
        [flip_lost, flip_gained]: [f64; 2],
        z: f64,
        allowed: f64,
    ) -> bool {
        let (mut original, mut candidate) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let o = rng.chance(accuracy);
            let c = match o {
                true => !rng.chance(flip_lost),
                false => rng.chance(flip_gained),
            };
            original.push(o);
            candidate.push(c);
        }
        let p = Paired::of(&original, &candidate);
        drop_bound(p.lost, p.gained, z) <= allowed * n as f64 + 1e-9
    }

    /// The rate at which the guard admits candidates of a known true drop, over seeded draws.
    fn admit_rate(n: usize, accuracy: f64, flips: [f64; 2], confidence: f64, allowed: f64) -> f64 {
        let mut rng = SplitMix64::new(7);
        let z = z_one_sided(confidence);
        let draws = 4000;
        let admitted = (0..draws)
            .filter(|_| guard_admits(&mut rng, n, accuracy, flips, z, allowed))
            .count();
        admitted as f64 / draws as f64
    }

    #[test]
    fn a_candidate_whose_true_drop_is_the_allowance_is_admitted_at_most_one_minus_confidence() {
        // True drop exactly 1 point: lost 0.9·0.0167 − gained 0.1·0.05 = 0.01.
        for (n, accuracy, flips) in [
            (2000, 1.0, [0.01, 0.0]),
            (2000, 0.9, [0.0167, 0.0503]),
            (872, 0.9, [0.0167, 0.0503]),
        ] {
            for confidence in [0.8, 0.9, 0.95] {
                let rate = admit_rate(n, accuracy, flips, confidence, 0.01);
                // 4000 draws: a binomial standard error under 0.7 points at these rates.
                assert!(
                    rate <= 1.0 - confidence + 0.02,
                    "n={n} acc={accuracy} c={confidence}: admitted {rate}"
                );
                assert!(
                    rate >= (1.0 - confidence) * 0.4,
                    "n={n} acc={accuracy} c={confidence}: the guard is far stricter than stated ({rate})"
                );
            }
        }
    }

    #[test]
    fn the_bound_is_the_point_estimate_at_confidence_one_half_and_grows_with_it() {
        assert_eq!(drop_bound(7, 3, 0.0), 4.0);
        let at = |c| drop_bound(7, 3, z_one_sided(c));
        assert!(at(0.8) > 4.0 && at(0.9) > at(0.8) && at(0.95) > at(0.9));
        // Nothing changed: still no promise of a drop below z² examples.
        let z = z_one_sided(0.9);
        assert!((drop_bound(0, 0, z) - (z + (z * z + 2.0).sqrt()).powi(2) / 4.0).abs() < 1e-12);
        // Many more gains than losses: a bound below zero (a gain) is possible.
        assert!(drop_bound(2, 60, z) < 0.0);
    }

    #[test]
    fn a_point_estimate_admits_half_of_the_candidates_at_the_allowance() {
        let rate = admit_rate(2000, 1.0, [0.01, 0.0], 0.5, 0.01);
        assert!((0.45..=0.6).contains(&rate), "{rate}");
    }

    #[test]
    fn a_candidate_well_within_the_allowance_is_admitted_almost_always_and_beyond_it_rarely() {
        // True drop 0.3 points against an allowance of 1, at n = 2000 (agreement).
        let within = admit_rate(2000, 1.0, [0.003, 0.0], 0.9, 0.01);
        assert!(within >= 0.97, "{within}");
        // True drop 2 points.
        let beyond = admit_rate(2000, 1.0, [0.02, 0.0], 0.9, 0.01);
        assert!(beyond <= 0.001, "{beyond}");
    }

    #[test]
    fn decisions_credit_no_gains_under_the_guard_and_all_of_them_without() {
        let z = z_one_sided(0.9);
        assert_eq!(decision_bound(7, 30, z), drop_bound(7, 0, z));
        assert!(decision_bound(7, 30, z) > drop_bound(7, 30, z));
        assert_eq!(decision_bound(7, 3, 0.0), 4.0);
    }

    /// Of `candidates` draws of a candidate whose true drop is 1.5 points on 436 examples (it
    /// loses 3.5 % and gains 2 %), whether any passes an allowance of one point under `bound`.
    fn any_of_many_passes(
        rng: &mut SplitMix64,
        candidates: usize,
        bound: fn(usize, usize, f64) -> f64,
    ) -> bool {
        let (n, z) = (436, z_one_sided(0.9));
        (0..candidates).any(|_| {
            let lost = (0..n).filter(|_| rng.chance(0.035)).count();
            let gained = (0..n).filter(|_| rng.chance(0.02)).count();
            bound(lost, gained, z) <= 0.01 * n as f64
        })
    }

    #[test]
    fn a_search_over_many_candidates_cannot_spend_the_allowance_on_chance_gains() {
        let mut rng = SplitMix64::new(11);
        let runs = 40;
        let credited = (0..runs)
            .filter(|_| any_of_many_passes(&mut rng, 200, drop_bound))
            .count();
        let decided = (0..runs)
            .filter(|_| any_of_many_passes(&mut rng, 200, decision_bound))
            .count();
        // Crediting gains, most searches find a candidate 1.5 points worse that passes.
        assert!(credited >= runs / 2, "{credited} of {runs}");
        assert_eq!(decided, 0, "{decided} of {runs}");
    }
}
