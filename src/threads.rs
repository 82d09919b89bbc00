//! The number of worker threads every kernel uses: candle's own pool, gemm (through rayon),
//! training's kernels (rayon) and the inference kernels' pool (`kernels::spin_pool`, sized from
//! rayon's). All of them read `RAYON_NUM_THREADS`, so `--threads` sets it before any pool starts.
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
    // The whole command runs on a worker ([`on_pool`]): give the workers the main thread's stack
    // size, not rayon's default, for deep recursions such as candle's backward pass. (An error
    // means the pool already exists, which only a test harness causes.)
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .start_handler(|_| flush_denormals())
        .build_global();
    flush_denormals();
}

/// Flushes denormal floats to zero on this thread (results and inputs). Float products on
/// denormals run many times slower on x86, and a deep model's gradients fall into that range
/// (BERT-base shape, random weights: the Taylor pass on 32 sentences took 141.5 s, 13.2 s with
/// the flush).
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sets the FTZ (bit 15) and DAZ (bit 6) flags of this thread's MXCSR; every x86_64
    // CPU has them, and they only change how denormals are treated.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | (1 << 15) | (1 << 6));
    }
}

/// Stack of each rayon worker: the usual main-thread stack size.
const WORKER_STACK_BYTES: usize = 8 << 20;

/// The number of worker threads in use.
pub fn count() -> usize {
    rayon::current_num_threads()
}

/// Runs `work` on a worker of the rayon pool and returns its result. Every parallel kernel called
/// from a worker shares its work with the other workers directly; called from the main thread,
/// each one would hand itself to the pool and put the main thread to sleep until it finished, a
/// sleep and a wake-up per operation.
pub fn on_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    rayon::join(work, || ()).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_a_pool_worker_and_returns_its_value() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "the test thread is not a worker"
        );
        let (index, value) = on_pool(|| (rayon::current_thread_index(), 41 + 1));
        assert!(index.is_some(), "on_pool ran its work outside the pool");
        assert_eq!(value, 42);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn denormals_are_flushed_to_zero_on_a_thread_that_asks() {
        let halve_smallest_normal = || std::hint::black_box(f32::MIN_POSITIVE) * 0.5;
        let before = std::thread::spawn(halve_smallest_normal).join().unwrap();
        assert!(before > 0.0 && !before.is_normal(), "{before:e}");
        let after = std::thread::spawn(move || {
            flush_denormals();
            halve_smallest_normal()
        });
        assert_eq!(after.join().unwrap(), 0.0);
    }
}
