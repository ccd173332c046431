//! Where pretrained weights come from: `hf://org/name[@revision]` in the standard Hugging
//! Face cache layout (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`: `models--org--name/refs/<revision>` names a snapshot under
//! `snapshots/<commit>/`), downloaded into that cache by the `hf-hub` crate when it is
//! missing (from `$HF_ENDPOINT`, default huggingface.co; never with `HF_HUB_OFFLINE=1`),
//! a model directory, or the output directory of an earlier run (its `best/` model).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The file every model directory holds (BERT adds `config.json` and `tokenizer.json`).
const WEIGHTS: &str = "model.safetensors";

/// Files a Hub model repository may hold that a model directory uses; the first two
/// are required.
const HUB_FILES: [&str; 6] = [
    "config.json",
    WEIGHTS,
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The Hugging Face Hub as the environment describes it.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The cache directory (`models--org--name/...` inside).
    pub cache: PathBuf,
    /// Download endpoint (`$HF_ENDPOINT`); None: huggingface.co.
    pub endpoint: Option<String>,
    /// `HF_HUB_OFFLINE`: only the cache is read.
    pub offline: bool,
}

impl Hub {
    pub fn from_env() -> Self {
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cache = env("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            env("HF_HOME").map_or_else(
                || {
                    env("XDG_CACHE_HOME")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| {
                            PathBuf::from(env("HOME").unwrap_or_default()).join(".cache")
                        })
                        .join("huggingface/hub")
                },
                |home| PathBuf::from(home).join("hub"),
            )
        });
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.to_string_lossy().trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            cache,
            endpoint: env("HF_ENDPOINT").map(|e| e.to_string_lossy().into_owned()),
            offline,
        }
    }
}

/// The directory holding `model.safetensors` (and `config.json`, `tokenizer.json`).
pub fn resolve(source: &str) -> Result<PathBuf> {
    resolve_with(source, &Hub::from_env())
}

/// `resolve` against an explicit Hub (tests point it at a local endpoint).
pub fn resolve_with(source: &str, hub: &Hub) -> Result<PathBuf> {
    let Some(id) = source.strip_prefix("hf://") else {
        return from_directory(Path::new(source));
    };
    match from_hub_cache(id, &hub.cache) {
        Ok(dir) => Ok(dir),
        Err(missing) if hub.offline => Err(Error::Config(format!(
            "{missing} (HF_HUB_OFFLINE is set: nothing is downloaded)"
        ))),
        Err(missing) => download(id, hub)
            .map_err(|why| Error::Config(format!("{missing}; downloading it failed: {why}"))),
    }
}

/// Downloads the model's files into the cache (`hf-hub`, the layout the Python
/// `huggingface_hub` writes) and returns the snapshot directory.
fn download(id: &str, hub: &Hub) -> std::result::Result<PathBuf, String> {
    let (repo, revision) = id.split_once('@').unwrap_or((id, "main"));
    let mut builder = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(hub.cache.clone())
        .with_progress(false);
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let remote = api.repo(hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    tracing::info!(model = %id, "downloading into {}", hub.cache.display());
    let mut snapshot = None;
    for (i, file) in HUB_FILES.iter().enumerate() {
        match remote.get(file) {
            Ok(path) => snapshot = path.parent().map(Path::to_path_buf),
            // Optional files: not every repository has them.
            Err(_) if i >= 2 => {}
            Err(e) => return Err(format!("{file}: {e}")),
        }
    }
    snapshot.ok_or_else(|| "no file downloaded".to_string())
}

fn from_hub_cache(id: &str, cache: &Path) -> Result<PathBuf> {
    let (repo, revision) = id.split_once('@').unwrap_or((id, "main"));
    let Some((org, name)) = repo.split_once('/') else {
        return Err(Error::Config(format!(
            "model source hf://{id}: expected hf://org/name[@revision]"
        )));
    };
    let root = cache.join(format!("models--{org}--{name}"));
    let how = format!(
        "put it there with `huggingface-cli download {repo}` (or `hf download {repo}`) on a \
         machine with network access and copy {}, or set HF_HOME / HF_HUB_CACHE to a cache \
         that has it (examples/fetch-data.sh installs sentence-transformers/all-MiniLM-L6-v2)",
        root.display()
    );
    // A revision is a ref name (refs/<revision> holds the commit) or a commit itself.
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(commit) => commit.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let snapshot = root.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(Error::Config(format!(
            "model source hf://{id} is not in the Hugging Face cache {} (revision {revision}): \
             {how}",
            cache.display()
        )));
    }
    check_model_dir(&snapshot, &format!("hf://{id}"))
        .map_err(|e| Error::Config(format!("{e}; {how}")))?;
    Ok(snapshot)
}

fn from_directory(dir: &Path) -> Result<PathBuf> {
    // The output directory of an earlier run serves its best model.
    let best = dir.join("best");
    if !dir.join(WEIGHTS).exists() && best.join(WEIGHTS).exists() {
        check_model_dir(&best, &best.display().to_string())?;
        return Ok(best);
    }
    check_model_dir(dir, &dir.display().to_string())?;
    Ok(dir.to_path_buf())
}

fn check_model_dir(dir: &Path, what: &str) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Config(format!(
            "model source {what}: {} is not a directory",
            dir.display()
        )));
    }
    if !dir.join(WEIGHTS).is_file() {
        return Err(Error::Config(format!(
            "model source {what}: {} has no {WEIGHTS} (a model directory holds \
             model.safetensors, and for BERT config.json and tokenizer.json)",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(WEIGHTS), "{}").unwrap();
    }

    #[test]
    fn hub_cache_layout_refs_and_commits() {
        let cache = tempfile::tempdir().unwrap();
        let root = cache.path().join("models--org--m");
        model_dir(&root.join("snapshots/abc123"));
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), "abc123\n").unwrap();
        let snap = root.join("snapshots/abc123");
        assert_eq!(from_hub_cache("org/m", cache.path()).unwrap(), snap);
        assert_eq!(from_hub_cache("org/m@abc123", cache.path()).unwrap(), snap);
        let err = from_hub_cache("org/other", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not in the Hugging Face cache")
                && err.contains("huggingface-cli download org/other"),
            "{err}"
        );
        let err = from_hub_cache("org/m@v2", cache.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("revision v2"), "{err}");
    }

    #[test]
    fn a_run_directory_serves_its_best_model() {
        let run = tempfile::tempdir().unwrap();
        model_dir(&run.path().join("best"));
        assert_eq!(from_directory(run.path()).unwrap(), run.path().join("best"));
        let empty = tempfile::tempdir().unwrap();
        let err = from_directory(empty.path()).unwrap_err().to_string();
        assert!(err.contains("has no model.safetensors"), "{err}");
    }
}
