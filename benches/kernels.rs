//! candle's quantized kernels (`Q8_0`, `Q4_0`) against the f32 matrix product, at MiniLM's
//! shapes, with 25 rows (about one sentence) and 800 rows (a batch of 32). Ratios above 1 mean
//! the kernel is faster. `cargo bench --bench kernels`; this decides
//! `Execution::default_choice`.

use std::time::Instant;

use axcompress::model::quant::{Bits, Codes, Execution, QuantMatrix};
use candle_core::{Device, Tensor};

/// Mean microseconds per call of `f` (after 3 warm-up calls).
fn time(rows: usize, f: &dyn Fn() -> Tensor) -> f64 {
    for _ in 0..3 {
        f();
    }
    let n = if rows > 100 { 20 } else { 200 };
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_secs_f64() / n as f64 * 1e6
}

fn main() {
    let dev = Device::Cpu;
    println!("shape (out x in)  rows   f32 us   Q8_0 us (ratio)   Q4_0 us (ratio)");
    for (out, inp) in [(384, 384), (1152, 384), (1536, 384), (384, 1536)] {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap();
        let wt = w.t().unwrap();
        for rows in [25, 800] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let dense = time(rows, &|| x.matmul(&wt).unwrap());
            let kernel = |bits| {
                let codes = Codes::from_tensor(&w, bits).unwrap();
                let q = QuantMatrix::with_execution(codes, Execution::Kernel).unwrap();
                time(rows, &|| q.matmul_t(&x).unwrap())
            };
            let (q8, q4) = (kernel(Bits::Int8), kernel(Bits::Int4));
            println!(
                "{out:>5} x {inp:<5}  {rows:>5} {dense:>8.0} {q8:>9.0} ({:.2}x) {q4:>9.0} ({:.2}x)",
                dense / q8,
                dense / q4
            );
        }
    }
}
