//! Ctrl-C (SIGINT) stops a run at once. The temporary files it was writing are removed, it says
//! where its resumable progress is, and it exits with status 130. Every writer is atomic
//! (temporary file, then rename), so a final path is never half-written, whether the process is
//! interrupted or killed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::fsutil::remove_file_or_dir;

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

/// Installs the SIGINT handler (once, at start-up), and lets a closed pipe end the process
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

/// Runs on SIGINT: removes the temporaries, says where the progress is, exits 130.
fn stop() {
    let registry = lock();
    for path in &registry.temporaries {
        remove_file_or_dir(path);
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
