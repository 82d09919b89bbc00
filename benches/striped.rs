//! Block-sparse column stripes (BSP's storage) against the dense product, for MiniLM's and
//! BERT-base's FFN and attention matrix shapes, at the kept fractions BSP reaches, with 8
//! stripes and 256 input rows (a batch of 32 sentences of 8 tokens), 32 or 16 (one sentence) or
//! 1 row (the first token of the last layer). Ratios above 1 mean the stripes are faster.
//! `cargo bench --bench striped`; the crossovers set `STRIPED_MAX_DENSITY` (BSP's storage) and
//! `DIRECT_WORK` (the stripes' direct products).

use std::time::Instant;

use axcompress::formats::striped::Striped;
use candle_core::{Device, Tensor};

/// Median microseconds per call of `f` over repeated runs (after warm-up).
fn time(f: &dyn Fn() -> Tensor) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut runs: Vec<f64> = (0..11)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..10 {
                f();
            }
            start.elapsed().as_secs_f64() / 10.0 * 1e6
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// A `[out, inp]` matrix keeping about `density` of the row segments of 8 stripes.
fn matrix(out: usize, inp: usize, density: f64) -> Tensor {
    let dev = &Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (out, inp), dev).unwrap();
    let width = inp / 8;
    let mask: Vec<f32> = (0..out * inp)
        .map(|i| {
            let (r, s) = (i / inp, (i % inp) / width);
            let h = (r * 8 + s).wrapping_mul(2654435761) % 1000;
            f32::from((h as f64) < density * 1000.0)
        })
        .collect();
    (w * Tensor::from_vec(mask, (out, inp), dev).unwrap()).unwrap()
}

fn main() {
    println!("shape        rows  density  dense us  stripes us  ratio  direct us  ratio");
    for (out, inp) in [
        (1536, 384),
        (384, 1536),
        (1152, 384),
        (3072, 768),
        (768, 3072),
    ] {
        for rows in [256, 64, 32, 16, 1] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu).unwrap();
            for density in [0.5, 0.33, 0.2, 0.1] {
                let w = matrix(out, inp, density);
                let s = Striped::from_dense(&w, 8).unwrap();
                let dense = time(&|| x.matmul(&w.t().unwrap()).unwrap());
                let sparse = time(&|| s.matmul_t(&x).unwrap());
                let direct = time(&|| s.matmul_t_direct(&x).unwrap());
                println!(
                    "{out:>4}x{inp:<5} {rows:>5}  {density:>7.2}  {dense:>8.1}  {sparse:>10.1}  {:>5.2}  {direct:>9.1}  {:>5.2}",
                    dense / sparse,
                    dense / direct
                );
            }
        }
    }
}
