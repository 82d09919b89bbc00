//! A fork-join pool for the products of one forward pass, whose helpers spin between products.
//!
//! A sentence's forward runs some forty products of 10–100 µs each, with a little serial work in
//! between. Handing a share of each to a sleeping rayon worker costs a futex wake-up and a
//! reschedule per product (~8–10 µs on the 2-core machine), so at batch 1 two threads ran no
//! faster than one. The helpers here stay awake for [`SPIN`] after their last share, polling one
//! atomic word, so the next product reaches them in well under a microsecond; after that they
//! sleep on a condition variable, and cost nothing between runs.
//!
//! One caller at a time: a call made while another caller holds the pool (another thread, or a
//! job that itself calls [`run`]) runs every job on its own thread. Jobs run in any order on any
//! thread, so callers give each job its own output (every kernel here writes disjoint rows or
//! panels, and the results do not depend on the split). A job that panics, on a helper or on the
//! caller, makes [`run`] panic with its payload once every other job has finished.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// The most jobs one call hands out (more run on the calling thread).
const MAX_JOBS: usize = 0xFFFF;

/// How long a helper keeps polling for the next product before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// Runs `job(0) … job(jobs - 1)` on the calling thread and up to `threads - 1` helpers, and
/// returns when all have finished.
pub fn run(jobs: usize, threads: usize, job: &(dyn Fn(usize) + Sync)) {
    if jobs <= 1 || threads <= 1 || jobs > MAX_JOBS {
        (0..jobs).for_each(job);
        return;
    }
    let pool = pool(threads - 1);
    let _held = match pool.caller.try_lock() {
        Ok(held) => held,
        // A caller that panicked before leaves the lock poisoned; the pool itself is consistent.
        Err(TryLockError::Poisoned(held)) => held.into_inner(),
        Err(TryLockError::WouldBlock) => return (0..jobs).for_each(job),
    };
    pool.fork_join(jobs, job);
}

/// Runs `job(i, chunk)` for every `chunk`-long piece of `out` (the last may be shorter), `i` its
/// index, over up to `threads` threads as [`run`] does.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    threads: usize,
    job: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let (len, base) = (out.len(), SendPtr(out.as_mut_ptr()));
    run(len.div_ceil(chunk), threads, &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: each job index is run once, and the pieces of different indices are disjoint
        // parts of `out`, which the caller lends for the whole call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        job(i, piece)
    });
}

/// `[f(0), …, f(n - 1)]`, computed over up to `threads` threads as [`run`] does.
pub fn map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for_each_chunk_mut(&mut slots, 1, threads, |i, slot| slot[0] = Some(f(i)));
    slots
        .into_iter()
        .map(|slot| slot.expect("every job ran"))
        .collect()
}

/// A pointer into a slice lent to the pool's jobs.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the jobs given a `SendPtr` write disjoint pieces of the slice it points into.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// The process's pool, started on first use with `helpers` helper threads (later calls asking
/// for more use the ones there are).
fn pool(helpers: usize) -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool::default()));
        for _ in 0..helpers {
            std::thread::Builder::new()
                .name("axcompress-kernel".into())
                .spawn(move || {
                    crate::threads::flush_denormals();
                    pool.help()
                })
                .expect("the kernel pool could not start a thread");
        }
        pool
    })
}

/// A job list the caller publishes.
struct Batch<'a> {
    job: &'a (dyn Fn(usize) + Sync),
}

/// The pool's state word: the batch's epoch, its number of jobs, and the next unclaimed job.
fn state_word(epoch: u64, jobs: usize, next: usize) -> u64 {
    epoch << 32 | (jobs as u64) << 16 | next as u64
}

/// The shared state of the pool.
#[derive(Default)]
struct Pool {
    /// Held by the one caller publishing batches.
    caller: Mutex<()>,
    /// [`state_word`]: a job is claimed by moving the index on within the epoch it was published
    /// in, so a helper can never claim a job of a batch that has ended.
    state: AtomicU64,
    /// The current batch (valid while its epoch is current and a job of it is unclaimed).
    batch: AtomicPtr<Batch<'static>>,
    /// Jobs of the current batch finished.
    done: AtomicUsize,
    /// The payload of the first job of the current batch that panicked.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Helpers waiting on `wake`.
    sleeping: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

impl Pool {
    /// Publishes `jobs` jobs, takes its share, and waits for the helpers' shares.
    fn fork_join(&self, jobs: usize, job: &(dyn Fn(usize) + Sync)) {
        let batch = Batch { job };
        // The helpers only dereference the batch after claiming one of its jobs, and this
        // function returns only once every job has finished.
        let ptr = &batch as *const Batch as *mut Batch<'static>;
        self.done.store(0, Ordering::Relaxed);
        self.batch.store(ptr, Ordering::Relaxed);
        let epoch = ((self.state.load(Ordering::Relaxed) >> 32) + 1) & u32::MAX as u64;
        self.state
            .store(state_word(epoch, jobs, 0), Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        while let Some(index) = self.claim(epoch) {
            self.run_one(job, index);
        }
        while self.done.load(Ordering::Acquire) < jobs {
            std::hint::spin_loop();
        }
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
    }

    /// Runs one claimed job and counts it done, keeping the payload if it panics (so that the
    /// caller, not a helper thread, unwinds, and only after no job uses the batch any more).
    fn run_one(&self, job: &(dyn Fn(usize) + Sync), index: usize) {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job(index))) {
            let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(payload);
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Claims the next job of the batch of `epoch`, if it is still current and has one left.
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (jobs, index) = ((state >> 16) as usize & MAX_JOBS, state as usize & MAX_JOBS);
            if state >> 32 != epoch || index >= jobs {
                return None;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(index),
                Err(now) => state = now,
            }
        }
    }

    /// A helper's life: wait for a new epoch, run what it can claim of it, repeat.
    fn help(&self) {
        let mut seen = 0;
        loop {
            let epoch = self.next_epoch(seen);
            seen = epoch;
            let batch = self.batch.load(Ordering::Acquire);
            while let Some(index) = self.claim(epoch) {
                // SAFETY: `batch` was stored before `epoch` was published, and a later batch
                // only after every job of this one was claimed. A successful claim in `epoch`
                // means this batch had a job left, so `batch` is its pointer, and its caller
                // waits in `fork_join`, keeping it alive, until this job is done.
                self.run_one(unsafe { (*batch).job }, index);
            }
        }
    }

    /// Waits for an epoch after `seen`: polls for [`SPIN`], then sleeps until woken.
    fn next_epoch(&self, seen: u64) -> u64 {
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            let epoch = self.state.load(Ordering::Acquire) >> 32;
            if epoch != seen {
                return epoch;
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(64) && started.elapsed() > SPIN {
                return self.sleep_until_after(seen);
            }
            std::hint::spin_loop();
        }
    }

    /// Sleeps until an epoch after `seen` is published.
    fn sleep_until_after(&self, seen: u64) -> u64 {
        let mut guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.fetch_add(1, Ordering::SeqCst);
        let epoch = loop {
            let epoch = self.state.load(Ordering::SeqCst) >> 32;
            if epoch != seen {
                break epoch;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        };
        self.sleeping.fetch_sub(1, Ordering::SeqCst);
        epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_runs_once_whatever_the_threads() {
        for threads in [1, 2, 3, 4] {
            for jobs in [0, 1, 2, 5, 64] {
                let counts: Vec<AtomicUsize> = (0..jobs).map(|_| AtomicUsize::new(0)).collect();
                run(jobs, threads, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                    "{jobs} jobs on {threads} threads"
                );
            }
        }
    }

    #[test]
    fn map_keeps_the_order() {
        assert_eq!(map(5, 2, |i| i * i), vec![0, 1, 4, 9, 16]);
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        for len in [0, 1, 7, 64, 65] {
            let mut values = vec![0usize; len];
            for_each_chunk_mut(&mut values, 8, 2, |i, piece| {
                for (j, v) in piece.iter_mut().enumerate() {
                    *v += i * 8 + j + 1;
                }
            });
            assert_eq!(values, (1..=len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_panicking_job_panics_the_caller_and_the_pool_goes_on() {
        for bad in [0, 5] {
            let caught = catch_unwind(|| {
                run(8, 2, &|i| {
                    if i == bad {
                        panic!("job {i} fails on purpose");
                    }
                })
            });
            let message = caught.expect_err("the caller must panic");
            let message = message
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert_eq!(message, format!("job {bad} fails on purpose"));
            let count = AtomicUsize::new(0);
            run(8, 2, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(count.load(Ordering::Relaxed), 8);
        }
    }

    #[test]
    fn batches_after_the_helpers_slept_still_run() {
        let total = AtomicUsize::new(0);
        for round in 0..3 {
            if round > 0 {
                std::thread::sleep(SPIN * 5);
            }
            run(8, 2, &|i| {
                total.fetch_add(i + 1, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * 36);
    }

    #[test]
    fn callers_on_several_threads_each_get_all_their_jobs_done() {
        let sums: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    s.spawn(move || {
                        let sum = AtomicUsize::new(0);
                        for _ in 0..200 {
                            run(7, 2, &|i| {
                                sum.fetch_add(i * (t + 1), Ordering::Relaxed);
                            });
                        }
                        sum.load(Ordering::Relaxed)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, sum) in sums.into_iter().enumerate() {
            assert_eq!(sum, 200 * 21 * (t + 1));
        }
    }
}
