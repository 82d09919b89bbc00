//! Atomic file output: write to a temporary file beside the target, then rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::interrupt::{self, remove_file_or_dir};

/// `value` as pretty JSON with a final newline, as every JSON file axcompress writes.
pub fn pretty_json(value: &impl Serialize) -> Result<Vec<u8>> {
    Ok((serde_json::to_string_pretty(value)? + "\n").into_bytes())
}

/// Writes `bytes` to `path` atomically: into a temporary file beside it (see
/// [`temporary_sibling`]), flushed to disk, then renamed over `path`. A process killed at any
/// moment leaves `path` as it was or complete, never half-written.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::File::create(tmp).and_then(|mut f| f.write_all(bytes))
    })
}

/// [`write_atomic`] for content that `write` streams into the temporary file whose path it is
/// given (a file too large to build in memory first).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    remove_stale_siblings(path);
    let tmp = temporary_sibling(path, "tmp")?;
    let _tracked = interrupt::track(&tmp);
    let written = write(&tmp).and_then(|()| std::fs::File::open(&tmp)?.sync_all());
    written
        .and_then(|()| interrupt::commit(|| std::fs::rename(&tmp, path)))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::anyhow!("cannot write {}: {e}", path.display())
        })
}

/// `.<name>.<tag>-<pid>` beside `path`: where this process writes `path` before renaming it into
/// place. A later run removes such names whose process is gone ([`remove_stale_siblings`]).
pub fn temporary_sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let name = format!(".{}.{tag}-{}", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(name))
}

/// Removes what killed runs left beside `path`: `.<name>.<tag>-<pid>` files or directories
/// whose process no longer runs. Best effort: what cannot be removed stays.
pub fn remove_stale_siblings(path: &Path) {
    let (Some(name), Some(dir)) = (path.file_name(), parent_dir(path)) else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_runs(pid) {
            remove_file_or_dir(&entry.path());
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> Option<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

/// True when a process `pid` exists (Linux `/proc`; elsewhere every process counts as running,
/// so nothing is removed).
fn process_runs(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// The UTF-8 byte-order mark some editors and spreadsheets put at the start of text files.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads a text file: a leading UTF-8 byte-order mark is dropped, and bytes that are not UTF-8
/// are an error naming the file and the line.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    text_from_bytes(&path.display().to_string(), bytes)
}

/// `bytes` as text (see [`read_text`]); `shown` names their file in errors.
pub fn text_from_bytes(shown: &str, mut bytes: Vec<u8>) -> Result<String> {
    if bytes.starts_with(BOM) {
        bytes.drain(..BOM.len());
    }
    String::from_utf8(bytes).or_else(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let column = at
            - bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
        bail!(
            "{shown}:{line}: byte {} is not UTF-8; save the file as UTF-8",
            column + 1
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        // pid 2^22 + 1 is above Linux's pid_max, so no process has it.
        let dead = dir.path().join(".out.json.tmp-4194305");
        let dead_dir = dir.path().join(".out.json.old-4194305");
        let live = temporary_sibling(&p, "tmp").unwrap();
        let other = dir.path().join(".other.json.tmp-4194305");
        std::fs::write(&dead, "half").unwrap();
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(&live, "writing").unwrap();
        std::fs::write(&other, "not ours").unwrap();
        remove_stale_siblings(&p);
        assert!(!dead.exists() && !dead_dir.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn text_drops_the_bom_and_names_the_line_of_bad_bytes() {
        let text = text_from_bytes("f", b"\xEF\xBB\xBFa\tb\n".to_vec()).unwrap();
        assert_eq!(text, "a\tb\n");
        let err = text_from_bytes("f.tsv", b"ok\r\nfine\nab\xFFc\n".to_vec()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.tsv:3: byte 3 is not UTF-8; save the file as UTF-8"
        );
        let err = text_from_bytes("f", b"\xC3".to_vec()).unwrap_err();
        assert!(err.to_string().starts_with("f:1: byte 1 "), "{err}");
    }
}
