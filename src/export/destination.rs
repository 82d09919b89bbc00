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

/// What an output path holds.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A model directory (`--out` of the compressing commands).
    Directory,
    /// One file (`--predictions`, an analyze report).
    File,
}

/// Refuses `out` when it is, holds or sits inside one of `inputs` (missing inputs, such as a hub
/// id, are skipped), when it exists and is not a directory, or when it exists, is not empty, and
/// either `force` is off or axcompress did not write it.
pub fn check_destination(inputs: &[&Path], out: &Path, force: bool) -> Result<()> {
    check_output("--out", Kind::Directory, inputs, out, force)
}

/// Refuses a single-file output `out` (given with `flag`, e.g. `--predictions`) when it is or
/// sits inside one of `inputs`, when it exists and is not a regular file, or when it exists and
/// `force` is off.
pub fn check_file_destination(flag: &str, inputs: &[&Path], out: &Path, force: bool) -> Result<()> {
    check_output(flag, Kind::File, inputs, out, force)
}

/// The output rule for `out` of `kind`, named `flag` in its errors.
fn check_output(flag: &str, kind: Kind, inputs: &[&Path], out: &Path, force: bool) -> Result<()> {
    let name = out
        .file_name()
        .with_context(|| format!("{flag} {} needs a name", out.display()))?;
    let target = absolute_parent(out)?.join(name);
    let shown = out.display();
    for input in inputs.iter().filter_map(|i| i.canonicalize().ok()) {
        let input_shown = input.display();
        if target.starts_with(&input) {
            let relation = match target == input {
                true => format!("is the input {input_shown}"),
                false => format!("is inside the input {input_shown}"),
            };
            bail!("{flag} {shown} {relation}; choose a path outside every input (inputs are never overwritten)");
        }
        if input.starts_with(&target) {
            bail!("{flag} {shown} holds the input {input_shown}; choose a path that holds no input (inputs are never overwritten)");
        }
    }
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    match kind {
        Kind::Directory if !meta.is_dir() => bail!(
            "{flag} {shown} exists and is not a directory; choose another path (axcompress writes a model directory there)"
        ),
        Kind::File if !meta.is_file() => {
            bail!("{flag} {shown} exists and is not a regular file; choose another path")
        }
        Kind::Directory if is_empty_dir(out) => return Ok(()),
        _ => {}
    }
    if !force {
        bail!("{flag} {shown} already exists; pass --force to replace it");
    }
    if kind == Kind::Directory && !written_by_axcompress(out) {
        bail!(
            "{flag} {shown} is not a directory axcompress wrote (its config.json has no axcompress section); --force replaces only those: choose another path or remove it yourself"
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
