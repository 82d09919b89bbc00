//! The attention core (scores, softmax, weighted sum of values) of one sequence, per head:
//! dense soft attention as the runtime runs it against sign-match and hard top-k through the
//! gathered kernel, at sequence lengths 32–512 and a few K, for MiniLM's heads (12 × 32) and
//! BERT-base's (12 × 64), on the rayon pool's threads (`RAYON_NUM_THREADS`). Ratios above 1 mean
//! the approximation is faster. `cargo bench --bench attention`; the README's table comes from it.

use std::time::Instant;

use axcompress::kernels::attention_mode::{ApproxAttention, Keep, KeySelector};
use axcompress::kernels::softmax::softmax_last;
use axcompress::kernels::sparse_attention::context;
use axcompress::kernels::Ops;
use candle_core::{Device, Tensor};

/// Median microseconds per call of `f` over repeated runs (after warm-up).
fn time(f: &dyn Fn() -> Tensor) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut runs: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..20 {
                f();
            }
            start.elapsed().as_secs_f64() / 20.0 * 1e6
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    let dev = Device::Cpu;
    let heads = 12;
    let ks = [Keep::Count(8), Keep::Fraction(0.125), Keep::Fraction(0.25)];
    print!("head  len   dense us/head");
    for method in [KeySelector::SignMatch, KeySelector::HardTopk] {
        for k in ks {
            print!("  {} k={k}", method.name());
        }
    }
    println!();
    for d in [32, 64] {
        for len in [32, 64, 128, 256, 512] {
            let shape = (1, heads, len, d);
            let q = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() / (d as f64).sqrt()).unwrap();
            let k = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let mask = Tensor::zeros((1, 1, 1, len), candle_core::DType::F32, &dev).unwrap();
            let dense = time(&|| {
                let s = q
                    .matmul(&k.t().unwrap())
                    .unwrap()
                    .broadcast_add(&mask)
                    .unwrap();
                softmax_last(&s, Ops::Inference)
                    .unwrap()
                    .matmul(&v)
                    .unwrap()
            }) / heads as f64;
            print!("{d:>4} {len:>4} {dense:>10.1}");
            for method in [KeySelector::SignMatch, KeySelector::HardTopk] {
                for keep in ks {
                    let approx = ApproxAttention { method, k: keep };
                    let t = time(&|| context(&q, &k, &v, &mask, approx).unwrap()) / heads as f64;
                    print!("  {t:>8.1} ({:.2}x)", dense / t);
                }
            }
            println!();
        }
    }
}
