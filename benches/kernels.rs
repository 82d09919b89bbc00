//! axcompress's kernels — the prepacked f32 product, the int8 and int4 kernels — and candle's
//! `Q4_0` against candle's f32 matrix product (the gemm crate, packing on every call), at
//! MiniLM's shapes (and BERT-base's with `--bert-base`), with 1, 8, 32 and 256 rows (tokens), on
//! the rayon pool's threads (`RAYON_NUM_THREADS`). Ratios above 1 mean the kernel is faster. `cargo bench --bench kernels [-- --bert-base]`; this decides
//! `Execution::Auto`.

use std::time::Instant;

use axcompress::formats::quant::{Bits, Codes, Execution, QuantMatrix};
use axcompress::kernels::f32_gemm::{self, PackedF32};
use candle_core::{Device, Tensor};

/// Median microseconds per call of `f` over 7 rounds (after 3 warm-up calls), each round long
/// enough (about 20 ms) to time.
fn time(f: &dyn Fn() -> Tensor) -> f64 {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64();
    let calls = ((0.02 / once.max(1e-7)) as usize).clamp(1, 2000);
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            start.elapsed().as_secs_f64() / calls as f64 * 1e6
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[3]
}

fn main() {
    let bert_base = std::env::args().any(|a| a == "--bert-base");
    let shapes: &[(usize, usize)] = if bert_base {
        &[(768, 768), (2304, 768), (3072, 768), (768, 3072)]
    } else {
        &[(384, 384), (1152, 384), (1536, 384), (384, 1536)]
    };
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "shape (out x in)  rows     f32 us  packed us (ratio)    int8 us (ratio)    int4 us (ratio)    Q4_0 us (ratio)"
    );
    for &(out, inp) in shapes {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap();
        let wt = w.t().unwrap();
        for rows in [1, 8, 32, 256] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let dense = time(&|| x.matmul(&wt).unwrap());
            let packed = PackedF32::pack(&w.flatten_all().unwrap().to_vec1().unwrap(), out, inp);
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let threads = rayon::current_num_threads();
            let packed = time(&|| {
                let mut y = vec![0f32; rows * out];
                f32_gemm::matmul_t(&xs, rows, &packed, None, &mut y, threads);
                Tensor::from_vec(y, (rows, out), &Device::Cpu).unwrap()
            });
            let kernel = |bits, execution| {
                let codes = Codes::from_tensor(&w, bits).unwrap();
                let q = QuantMatrix::with_execution(codes, execution).unwrap();
                q.matmul_t(&x).unwrap(); // packs the kernel's weights once
                time(&|| q.matmul_t(&x).unwrap())
            };
            let int8 = kernel(Bits::Int8, Execution::Kernel);
            let int4 = kernel(Bits::Int4, Execution::Kernel);
            let q4 = kernel(Bits::Int4, Execution::Candle);
            println!(
                "{out:>5} x {inp:<5}  {rows:>5} {dense:>9.1} {packed:>9.1} ({:>5.2}x) {int8:>9.1} ({:>5.2}x) {int4:>9.1} ({:>5.2}x) {q4:>9.1} ({:>5.2}x)",
                dense / packed,
                dense / int8,
                dense / int4,
                dense / q4
            );
        }
    }
}
