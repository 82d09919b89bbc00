//! Ctrl-C (SIGINT), SIGTERM and SIGHUP stop a run at once (a CI runner cancels a job with
//! SIGTERM). The temporary files it was writing are removed, it says
//! where its resumable progress is, and it exits with status 130. Every writer is atomic
//! (temporary file, then rename), so a final path is never half-written, whether the process is
//! interrupted or killed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};

/// Exit status of a run stopped by SIGINT (128 + 2, as shells report it).
pub const EXIT_INTERRUPTED: i32 = 130;

struct Registry {
    /// Temporary files and directories being written now.
    temporaries: Vec<PathBuf>,
    /// The progress file a `--resume` continues from, while the run keeps one.
    progress: Option<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    temporaries: Vec::new(),
    progress: None,
});

/// Installs the SIGINT / SIGTERM / SIGHUP handler (once, at start-up), and lets a closed pipe end the process
/// quietly, as it ends `cat` (`axcompress inspect … | head`): Rust ignores SIGPIPE, which turns
/// every later print into a panic.
pub fn install() -> Result<()> {
    #[cfg(unix)]
    // SAFETY: called once at start-up, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    ctrlc::set_handler(stop).context("cannot install the Ctrl-C handler")
}

/// Set once a stop signal arrived: the main thread then leaves the exit to the handler.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Runs on SIGINT, SIGTERM or SIGHUP: removes the temporaries, says where the progress is, exits
/// 130. The main thread keeps running meanwhile and may still be writing into a temporary
/// directory (recreating a file the removal just listed), so the removal is repeated until every
/// temporary is gone (a second at most).
fn stop() {
    STOPPING.store(true, Ordering::SeqCst);
    let registry = lock();
    for _ in 0..100 {
        for path in &registry.temporaries {
            remove_file_or_dir(path);
        }
        if registry
            .temporaries
            .iter()
            .all(|p| std::fs::symlink_metadata(p).is_err())
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    match &registry.progress {
        Some(p) if p.is_file() => eprintln!(
            "interrupted: the progress so far is saved in {}; run the same command with --resume to continue",
            p.display()
        ),
        _ => eprintln!("interrupted: nothing was written"),
    }
    std::process::exit(EXIT_INTERRUPTED);
}

/// Called by the main thread before it exits: while a stop signal is being handled, waits for the
/// handler to finish and exit with status 130 (an error the interrupted work ran into, such as a
/// temporary directory removed under it, must not win the race with status 1).
pub fn yield_to_stop() {
    if STOPPING.load(Ordering::SeqCst) {
        wait_for_exit();
    }
}

/// Parks the calling thread until the stop handler exits the process.
fn wait_for_exit() -> ! {
    loop {
        std::thread::park();
    }
}

/// Runs `rename` (the step that moves a finished temporary to its final path) so that it never
/// races the stop handler: under the registry's lock, and only while no stop signal has arrived.
/// After a signal the calling thread waits for the handler to remove the temporaries and exit,
/// so a final path is either renamed whole before the handler looks, or not at all.
pub fn commit<T>(rename: impl FnOnce() -> T) -> T {
    let registry = lock();
    if STOPPING.load(Ordering::SeqCst) {
        drop(registry);
        wait_for_exit();
    }
    let done = rename();
    drop(registry);
    done
}

/// While the returned guard lives, `path` is a temporary that an interrupt removes.
pub fn track(path: &Path) -> Tracked {
    lock().temporaries.push(path.to_path_buf());
    Tracked(path.to_path_buf())
}

/// Names the progress file an interrupted run resumes from (`None` once the run no longer keeps
/// one).
pub fn set_progress(path: Option<&Path>) {
    lock().progress = path.map(Path::to_path_buf);
}

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A temporary registered by [`track`]; dropping it unregisters the path.
pub struct Tracked(PathBuf);

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut registry = lock();
        if let Some(i) = registry.temporaries.iter().rposition(|p| *p == self.0) {
            registry.temporaries.swap_remove(i);
        }
    }
}

/// Removes `path`, a directory with its contents or a file; best effort.
pub fn remove_file_or_dir(path: &Path) {
    let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
}
