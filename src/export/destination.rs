//! Where a model directory is written. One rule for every output, checked before any work:
//! an output never is, holds or sits inside an input (the model, the data, the config, a
//! significance report); it is a directory or nothing; and `--force` replaces only a directory
//! axcompress wrote (its `config.json` has an `axcompress` section) or an empty one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Creates the missing parent directories of `out` (after [`check_destination`] accepted it).
pub fn create_parent(out: &Path) -> Result<()> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display())),
        None => Ok(()),
    }
}

/// Refuses `out` when it is, holds or sits inside one of `inputs` (missing inputs, such as a hub
/// id, are skipped), when it exists and is not a directory, or when it exists, is not empty, and
/// either `force` is off or axcompress did not write it.
pub fn check_destination(inputs: &[&Path], out: &Path, force: bool) -> Result<()> {
    let target =
        absolute_parent(out)?.join(out.file_name().context("--out needs a directory name")?);
    for input in inputs {
        let Ok(input) = input.canonicalize() else {
            continue;
        };
        if target.starts_with(&input) {
            bail!(
                "--out {} is inside the input {}; choose a directory outside it (inputs are never overwritten)",
                out.display(),
                input.display()
            );
        }
        if input.starts_with(&target) {
            bail!(
                "--out {} holds the input {}; choose a directory that holds no input (inputs are never overwritten)",
                out.display(),
                input.display()
            );
        }
    }
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !meta.is_dir() {
        bail!(
            "--out {} exists and is not a directory; choose another path (axcompress writes a model directory there)",
            out.display()
        );
    }
    if is_empty_dir(out) {
        return Ok(());
    }
    if !force {
        bail!(
            "--out {} already exists; pass --force to replace it",
            out.display()
        );
    }
    if !written_by_axcompress(out) {
        bail!(
            "--out {} is not a directory axcompress wrote (its config.json has no axcompress section); --force replaces only those: choose another path or remove it yourself",
            out.display()
        );
    }
    Ok(())
}

/// Refuses a single-file output `out` (given with `flag`, e.g. `--predictions`) when it is or
/// sits inside one of `inputs`, when it exists and is not a regular file, or when it exists and
/// `force` is off.
pub fn check_file_destination(flag: &str, inputs: &[&Path], out: &Path, force: bool) -> Result<()> {
    let name = out
        .file_name()
        .with_context(|| format!("{flag} {} needs a file name", out.display()))?;
    let target = absolute_parent(out)?.join(name);
    for input in inputs {
        let Ok(input) = input.canonicalize() else {
            continue;
        };
        if target.starts_with(&input) {
            bail!(
                "{flag} {} is the input {} or inside it; choose a path outside every input (inputs are never overwritten)",
                out.display(),
                input.display()
            );
        }
    }
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !meta.is_file() {
        bail!(
            "{flag} {} exists and is not a regular file; choose another path",
            out.display()
        );
    }
    if !force {
        bail!(
            "{flag} {} already exists; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

/// True when `dir` has no entries.
fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

/// True when `dir` is a model directory axcompress wrote: its `config.json` has an `axcompress`
/// section.
fn written_by_axcompress(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|config| config.get("axcompress").is_some_and(|a| a.is_object()))
}

/// The parent of `out` as an absolute path with links resolved, even when it does not exist yet
/// (its nearest existing ancestor is resolved and the rest appended).
fn absolute_parent(out: &Path) -> Result<PathBuf> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut existing = parent;
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(
            existing
                .file_name()
                .context("--out has no existing ancestor")?,
        );
        existing = existing
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
    }
    let mut resolved = existing
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", existing.display()))?;
    resolved.extend(rest.iter().rev());
    Ok(resolved)
}
