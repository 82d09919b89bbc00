//! Where a model comes from: a local Hugging Face-format directory, or a hub id resolved through
//! the local Hugging Face cache first and the network only when not offline.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

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

/// Resolves `spec` (a directory or an `org/name` hub id) to a local model directory.
pub fn resolve(spec: &str, offline: bool) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        bail!("model {spec} is a file; pass the model directory that contains config.json");
    }
    if !looks_like_hub_id(spec) {
        bail!("model directory {spec} does not exist; pass a Hugging Face-format directory or a hub id like org/name");
    }
    let offline = offline || env_flag("HF_HUB_OFFLINE");
    resolve_hub(spec, offline).with_context(|| {
        format!("model {spec} is not a directory and could not be loaded from the Hugging Face hub{}; pass a local model directory instead",
            if offline { " cache (offline)" } else { "" })
    })
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

fn resolve_hub(id: &str, offline: bool) -> Result<PathBuf> {
    let cache = hf_hub::Cache::new(hub_cache_dir());
    let cached = cache.model(id.to_string());
    if let Some(dir) = cached_snapshot(&cached) {
        return Ok(dir);
    }
    if offline {
        bail!(
            "no complete copy in the cache at {}",
            hub_cache_dir().display()
        );
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(hub_cache_dir())
        .with_progress(false)
        .build()
        .context("cannot start the hub client")?;
    let repo = api.model(id.to_string());
    let fetch = |name: &str| repo.get(name).or_else(|_| repo.get(name));
    let config = fetch("config.json").context("cannot download config.json")?;
    let weights = WEIGHT_FILES.iter().find_map(|f| fetch(f).ok());
    let Some(weights) = weights else {
        bail!("the hub repository has none of {}", WEIGHT_FILES.join(", "));
    };
    if weights.ends_with("model.safetensors.index.json") {
        for shard in super::weights::shard_files(&weights)? {
            fetch(&shard).with_context(|| format!("cannot download shard {shard}"))?;
        }
    }
    for f in OPTIONAL_FILES {
        let _ = fetch(f);
    }
    Ok(config
        .parent()
        .context("hub cache path has no parent")?
        .to_path_buf())
}

/// The snapshot directory of a cached model when it holds a config and weights.
fn cached_snapshot(repo: &hf_hub::CacheRepo) -> Option<PathBuf> {
    let config = repo.get("config.json")?;
    WEIGHT_FILES.iter().find_map(|f| repo.get(f))?;
    config.parent().map(Path::to_path_buf)
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
}
