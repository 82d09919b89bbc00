//! Progress bars: shown with an ETA on a terminal, hidden under `--quiet`, in CI or when stderr
//! is not a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over `len` steps, or a hidden one when progress should not be drawn.
pub fn bar(len: u64, message: &str, quiet: bool) -> ProgressBar {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if quiet || in_ci || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(message.to_string());
    pb
}
