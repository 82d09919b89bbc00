//! Where a model comes from: a local Hugging Face-format directory, or a hub id resolved through
//! the local Hugging Face cache first and the network only when not offline.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use serde::Serialize;

/// Files tried, in order, for the weights of a model.
pub const WEIGHT_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

/// Tokenizer and auxiliary files fetched when present.
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// How a model named by a hub id is fetched: from the local hub cache first, then from the hub
/// (`HF_ENDPOINT`, default `https://huggingface.co`, with `HF_TOKEN` as a bearer token) unless
/// offline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HubAccess {
    /// Never use the network (also `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// The branch, tag or commit of a model hub id (default: `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

impl HubAccess {
    /// Offline when asked to, or when `HF_HUB_OFFLINE` is set.
    pub fn is_offline(&self) -> bool {
        self.offline || env_flag("HF_HUB_OFFLINE")
    }

    /// The revision asked for, else `main`.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// Resolves `spec` (a directory or an `org/name` hub id) to a local model directory.
pub fn resolve(spec: &str, hub: &HubAccess) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        bail!("model {spec} is a file; pass the model directory that contains config.json");
    }
    if std::fs::symlink_metadata(path).is_ok() {
        let why = std::fs::metadata(path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        bail!("model {spec} is a symbolic link that does not resolve ({why}); point it at the model directory");
    }
    let local_parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && p.is_dir());
    if let Some(parent) = local_parent {
        bail!("model directory {spec} does not exist ({} is a local directory, so {spec} is not taken as a hub id); pass a Hugging Face-format directory", parent.display());
    }
    if !looks_like_hub_id(spec) {
        bail!("model directory {spec} does not exist; pass a Hugging Face-format directory or a hub id like org/name");
    }
    let offline = hub.is_offline();
    resolve_hub(spec, hub.revision(), offline)
        .with_context(|| format!("model {spec} at revision {}", hub.revision()))
}

/// A hub client on the cache `cache`, at `HF_ENDPOINT` (default the public hub), sending
/// `HF_TOKEN` (else the token file the Hugging Face tools leave in `HF_HOME`) as a bearer token.
pub fn hub_api(cache: PathBuf) -> Result<Api> {
    let mut builder = ApiBuilder::from_env()
        .with_cache_dir(cache)
        .with_progress(false);
    if let Some(token) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        builder = builder.with_token(Some(token.trim().to_string()));
    }
    builder.build().context("cannot start the hub client")
}

/// The hub's address as the client uses it (for error messages).
pub fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string())
}

/// One line for a failed hub request: what the hub answered (or that it could not be reached)
/// and what to do about it.
pub fn describe_hub_error(err: ApiError, repo: &str, file: &str) -> anyhow::Error {
    let endpoint = hub_endpoint();
    if let ApiError::RequestError(e) = &err {
        if let ureq::Error::Transport(t) = e.as_ref() {
            return anyhow!(
                "cannot reach the hub at {endpoint} for {repo} ({}); check the network or HF_ENDPOINT, or run with --offline on a cached copy",
                t.kind()
            );
        }
    }
    match http_status(&err) {
        Some(code @ (401 | 403)) => anyhow!(
            "the hub at {endpoint} refused {file} of {repo} (HTTP {code}): set HF_TOKEN to a token that can read the repository"
        ),
        Some(404) => anyhow!(
            "the hub at {endpoint} has no {file} in {repo} at that revision (HTTP 404); check the repository id and --revision"
        ),
        Some(code) => anyhow!("the hub at {endpoint} answered HTTP {code} for {file} of {repo}; try again later"),
        None => anyhow!("cannot download {file} of {repo} from {endpoint}: {err}"),
    }
}

/// The HTTP status the hub answered with, when it answered.
fn http_status(err: &ApiError) -> Option<u16> {
    match err {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    }
}

/// True when the hub answered 404 (the file does not exist there).
fn is_not_found(err: &ApiError) -> bool {
    http_status(err) == Some(404)
}

/// The Hugging Face hub cache directory (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return dir.into();
    }
    hf_hub::Cache::from_env().path().clone()
}

/// True when environment variable `name` is set to 1, true, yes or on (any case).
pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// True for `name` or `org/name` made of letters, digits, `-`, `_` and `.` (not starting with `.`).
pub(crate) fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn resolve_hub(id: &str, revision: &str, offline: bool) -> Result<PathBuf> {
    let cache = hub_cache_dir();
    if let Some(dir) = cached_snapshot(&cache, id, revision) {
        return Ok(dir);
    }
    if offline {
        bail!(
            "no complete copy in the hub cache at {} and offline; run once online (or set HF_HUB_CACHE), or pass a local model directory",
            cache.display()
        );
    }
    let api = hub_api(cache.clone())?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let fetch = |name: &str| repo.get(name);
    let config = fetch("config.json").map_err(|e| describe_hub_error(e, id, "config.json"))?;
    let weights = first_weights(|name| match fetch(name) {
        Ok(path) => Ok(Some(path)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(describe_hub_error(e, id, name)),
    })?;
    if weights.ends_with("model.safetensors.index.json") {
        for shard in super::weights::shard_files(&weights)? {
            fetch(&shard).map_err(|e| describe_hub_error(e, id, &shard))?;
        }
    }
    for name in OPTIONAL_FILES {
        match fetch(name) {
            Err(e) if !is_not_found(&e) => return Err(describe_hub_error(e, id, name)),
            _ => {}
        }
    }
    let dir = config.parent().context("hub cache path has no parent")?;
    Ok(dir.to_path_buf())
}

/// The first of [`WEIGHT_FILES`] that `fetch` finds (`Ok(None)`: not there).
fn first_weights(mut fetch: impl FnMut(&str) -> Result<Option<PathBuf>>) -> Result<PathBuf> {
    for name in WEIGHT_FILES {
        if let Some(path) = fetch(name)? {
            return Ok(path);
        }
    }
    bail!("the hub repository has none of {}", WEIGHT_FILES.join(", "))
}

/// The snapshot directory of model `id` at `revision` in the hub cache `cache`, when it holds a
/// config and complete weights (every shard of a sharded checkpoint). A branch or tag is looked
/// up in the cache's `refs/`; a full commit hash names its snapshot directly. A download that
/// was interrupted leaves no file in the snapshot (the client writes a `.part` blob and links it
/// only when complete), so a partial copy is never taken for a complete one.
fn cached_snapshot(cache: &Path, id: &str, revision: &str) -> Option<PathBuf> {
    let repo = cache.join(Repo::model(id.to_string()).folder_name());
    let commit = match is_commit_hash(revision) {
        true => revision.to_string(),
        false => std::fs::read_to_string(repo.join("refs").join(revision)).ok()?,
    };
    let dir = repo.join("snapshots").join(commit.trim());
    if !dir.join("config.json").is_file() {
        return None;
    }
    let weights = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())?;
    if weights.ends_with("model.safetensors.index.json") {
        let shards = super::weights::shard_files(&weights).ok()?;
        if !shards.iter().all(|s| dir.join(s).is_file()) {
            return None;
        }
    }
    Some(dir)
}

/// True for a full 40-digit hexadecimal commit id.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(looks_like_hub_id("bert-base-uncased"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn a_cached_snapshot_counts_only_when_complete_and_a_commit_names_it_directly() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--m");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let dir = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let found = |revision: &str| cached_snapshot(cache.path(), "org/m", revision);
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(found("main"), None, "no weights yet");
        let index = r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#;
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
        std::fs::write(dir.join("model-1.safetensors"), "").unwrap();
        assert_eq!(found("main"), None, "a shard is missing");
        std::fs::write(dir.join("model-2.safetensors"), "").unwrap();
        assert_eq!(found("main"), Some(dir.clone()));
        assert_eq!(found(commit), Some(dir), "a commit needs no ref");
        assert_eq!(found("v2"), None, "a branch never fetched");
    }
}
