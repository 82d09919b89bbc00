//! Helpers shared by the unit tests.

use candle_core::{Tensor, Var};

/// The largest `|a − b|` over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `n` deterministic values spread over `[offset, offset + span)`, a different order per `seed`.
pub fn spread(n: usize, seed: usize, span: f32, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919) % 1001) as f32 / 1001.0 * span + offset)
        .collect()
}

/// Asserts that the gradients of `Σ ours ⊙ weights` and `Σ reference ⊙ weights` with respect to
/// each of `vars` agree within `tolerance` times the larger of 1 and the largest gradient entry.
pub fn assert_same_gradients(
    ours: Tensor,
    reference: Tensor,
    weights: &Tensor,
    vars: &[(&str, &Var)],
    tolerance: f32,
) {
    let grads = |y: Tensor| {
        let store = (y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vars.iter()
            .map(|(_, v)| store.get(v).expect("a gradient").clone())
            .collect::<Vec<_>>()
    };
    for ((name, _), (a, b)) in vars.iter().zip(grads(ours).iter().zip(&grads(reference))) {
        let diff = max_abs_diff(a, b);
        let size = max_abs_diff(b, &b.zeros_like().unwrap()).max(1.0);
        assert!(
            diff <= tolerance * size,
            "{name}: off by {diff} (largest {size})"
        );
    }
}
