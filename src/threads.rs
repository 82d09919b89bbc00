//! The number of worker threads every kernel uses: candle's own pool, gemm (through rayon) and
//! axcompress's kernels (rayon). All of them read `RAYON_NUM_THREADS`, so `--threads` sets it
//! before any pool starts.
//!
//! candle's element-wise ops run on a second pool of their own (`CANDLE_NUM_THREADS`) whose
//! workers spin for a while after every op, on the cores rayon's matrix products need. Unless
//! the user sets `CANDLE_NUM_THREADS`, it is 1 here: on 2 cores that raised batch-32 throughput
//! in file order from 149 to 166 sentences/s (fp32 MiniLM) and from 285 to 371 (int8); see the
//! README's runtime section.

/// Applies `--threads` (if given) for this process; otherwise `RAYON_NUM_THREADS` or every core.
/// Must run before the first kernel starts a thread pool.
pub fn configure(threads: Option<u16>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// The number of worker threads in use.
pub fn count() -> usize {
    rayon::current_num_threads()
}
