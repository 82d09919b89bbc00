//! The quantized kernels — axcompress's int8 kernel, candle's `Q8_0` and `Q4_0` — against
//! candle's f32 matrix product, at MiniLM's shapes, with 25 rows (about one sentence) and 800
//! rows (a batch of 32), on the rayon pool's threads (`RAYON_NUM_THREADS`). Ratios above 1 mean
//! the kernel is faster. `cargo bench --bench kernels`; this decides `Execution::Auto`.

use std::time::Instant;

use axcompress::formats::quant::{Bits, Codes, Execution, QuantMatrix};
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
    println!(
        "shape (out x in)  rows   f32 us   int8 us (ratio)   Q8_0 us (ratio)   Q4_0 us (ratio)"
    );
    for (out, inp) in [(384, 384), (1152, 384), (1536, 384), (384, 1536)] {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap();
        let wt = w.t().unwrap();
        for rows in [25, 800] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let dense = time(rows, &|| x.matmul(&wt).unwrap());
            let kernel = |bits, execution| {
                let codes = Codes::from_tensor(&w, bits).unwrap();
                let q = QuantMatrix::with_execution(codes, execution).unwrap();
                q.matmul_t(&x).unwrap(); // packs the int8 kernel's weights once
                time(rows, &|| q.matmul_t(&x).unwrap())
            };
            let int8 = kernel(Bits::Int8, Execution::Kernel);
            let q8 = kernel(Bits::Int8, Execution::Candle);
            let q4 = kernel(Bits::Int4, Execution::Candle);
            println!(
                "{out:>5} x {inp:<5}  {rows:>5} {dense:>8.0} {int8:>9.0} ({:.2}x) {q8:>9.0} ({:.2}x) {q4:>9.0} ({:.2}x)",
                dense / int8,
                dense / q8,
                dense / q4
            );
        }
    }
}
