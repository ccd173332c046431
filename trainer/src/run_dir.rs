//! The output directory of a run (written by rank 0):
//! - `checkpoints/step-<N>/`: one complete directory per checkpoint (model, optimizer and
//!   trainer state from `checkpoint`, the data position, `checksums.json`), written under
//!   a temporary name and renamed into place, so a crash mid-write leaves no directory
//!   that looks complete; the newest `keep` are kept, plus the best;
//! - `best/`: the best model so far as a directory Hugging Face tools load;
//! - `metrics.jsonl`: one JSON object per evaluation.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::error::{Result, io_error};

const CHECKSUMS: &str = "checksums.json";
const POSITION: &str = "position.json";

/// Where in the data a checkpoint was taken.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    /// Batches of `epoch` already trained on.
    pub batch: u64,
    /// Best validation accuracy so far, carried across restarts.
    pub best_metric: Option<f64>,
}

pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Creates the directory (and checks it is writable) before any training starts.
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root.join("checkpoints"))
            .map_err(io_error("creating the output directory", root))?;
        let probe = root.join(".write-test");
        std::fs::write(&probe, b"ok")
            .map_err(io_error("writing into the output directory", root))?;
        let _ = std::fs::remove_file(probe);
        // A run killed between the two renames of `replace_best` left the previous best
        // model aside: put it back.
        let (best, old) = (root.join("best"), root.join(".best.old"));
        if !best.exists() && old.is_dir() {
            std::fs::rename(&old, &best).map_err(io_error("restoring", &best))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn best_dir(&self) -> PathBuf {
        self.root.join("best")
    }

    /// Writes a checkpoint: `write` fills the directory it is given; then the data
    /// position and checksums are added, everything is synced and the directory renamed
    /// to `checkpoints/step-<step>`. Older checkpoints beyond `keep` are removed.
    pub fn save_checkpoint(
        &self,
        step: u64,
        position: &Position,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let checkpoints = self.root.join("checkpoints");
        let name = format!("step-{step:09}");
        let tmp = checkpoints.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_error("creating", &tmp))?;
        write(&tmp)?;
        let position_json = serde_json::to_vec_pretty(position).expect("position serialises");
        std::fs::write(tmp.join(POSITION), position_json).map_err(io_error("writing", &tmp))?;
        let mut sums = BTreeMap::new();
        for entry in std::fs::read_dir(&tmp).map_err(io_error("listing", &tmp))? {
            let path = entry.map_err(io_error("listing", &tmp))?.path();
            let file = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            sums.insert(file, sha256(&path)?);
            sync(&path)?;
        }
        let sums_path = tmp.join(CHECKSUMS);
        let json = serde_json::to_vec_pretty(&sums).expect("checksums serialise");
        let mut f = std::fs::File::create(&sums_path).map_err(io_error("writing", &sums_path))?;
        f.write_all(&json)
            .map_err(io_error("writing", &sums_path))?;
        f.sync_all().map_err(io_error("syncing", &sums_path))?;
        let dest = checkpoints.join(&name);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest).map_err(io_error("renaming into place", &dest))?;
        sync(&checkpoints)?;
        for old in self.checkpoints().into_iter().rev().skip(keep.max(1)) {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(dest)
    }

    /// Complete checkpoint directories, oldest first.
    fn checkpoints(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.root.join("checkpoints"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
            })
            .collect();
        dirs.sort();
        dirs
    }

    /// The newest checkpoint whose files match their checksums, with its position. A
    /// damaged one is skipped with a warning naming it, and never loaded.
    pub fn newest_valid_checkpoint(&self) -> Option<(PathBuf, Position)> {
        for dir in self.checkpoints().into_iter().rev() {
            match verify(&dir) {
                Ok(position) => return Some((dir, position)),
                Err(why) => {
                    warn!(checkpoint = %dir.display(), %why, "skipping a damaged checkpoint")
                }
            }
        }
        None
    }

    /// Appends one JSON object to `metrics.jsonl`.
    pub fn append_metrics(&self, value: &serde_json::Value) -> Result<()> {
        let path = self.root.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        writeln!(f, "{value}").map_err(io_error("appending to", &path))
    }

    /// Replaces `best/` with what `write` puts into a fresh directory.
    pub fn replace_best(&self, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = self.root.join(".best.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_error("creating", &tmp))?;
        write(&tmp)?;
        let best = self.best_dir();
        let old = self.root.join(".best.old");
        let _ = std::fs::remove_dir_all(&old);
        if best.exists() {
            std::fs::rename(&best, &old).map_err(io_error("moving aside", &best))?;
        }
        std::fs::rename(&tmp, &best).map_err(io_error("renaming into place", &best))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

fn verify(dir: &Path) -> std::result::Result<Position, String> {
    let sums: BTreeMap<String, String> = std::fs::read(dir.join(CHECKSUMS))
        .map_err(|e| format!("no {CHECKSUMS}: {e}"))
        .and_then(|raw| serde_json::from_slice(&raw).map_err(|e| format!("{CHECKSUMS}: {e}")))?;
    for (file, want) in &sums {
        let got = sha256(&dir.join(file)).map_err(|e| e.to_string())?;
        if &got != want {
            return Err(format!("{file} does not match its checksum"));
        }
    }
    let raw = std::fs::read(dir.join(POSITION)).map_err(|e| format!("no {POSITION}: {e}"))?;
    serde_json::from_slice(&raw).map_err(|e| format!("{POSITION}: {e}"))
}

fn sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(io_error("reading", path))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_error("syncing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(epoch: u64) -> Position {
        Position {
            epoch,
            batch: 3,
            best_metric: Some(0.5),
        }
    }

    fn save(run: &RunDir, step: u64, keep: usize) -> PathBuf {
        run.save_checkpoint(step, &position(step), keep, |dir| {
            std::fs::write(dir.join("model.safetensors"), format!("weights {step}")).unwrap();
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn newest_intact_checkpoint_wins_damaged_ones_are_skipped_and_old_ones_pruned() {
        let root = tempfile::tempdir().unwrap();
        let run = RunDir::create(root.path()).unwrap();
        save(&run, 1, 2);
        save(&run, 2, 2);
        let newest = save(&run, 3, 2);
        assert_eq!(run.checkpoints().len(), 2, "keep 2");
        assert_eq!(
            run.newest_valid_checkpoint().unwrap(),
            (newest.clone(), position(3))
        );
        // A flipped byte in the newest: the one before is used.
        let model = newest.join("model.safetensors");
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&model, bytes).unwrap();
        let (dir, pos) = run.newest_valid_checkpoint().unwrap();
        assert!(dir.ends_with("step-000000002"), "{}", dir.display());
        assert_eq!(pos.epoch, 2);
        // A write that died before the rename leaves only a temporary directory.
        std::fs::create_dir_all(root.path().join("checkpoints/.step-000000004.tmp")).unwrap();
        assert!(
            run.newest_valid_checkpoint()
                .unwrap()
                .0
                .ends_with("step-000000002")
        );
    }

    #[test]
    fn an_unwritable_output_directory_is_an_error_before_training() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let err = RunDir::create(&file.join("out")).err().unwrap().to_string();
        assert!(err.contains("creating the output directory"), "{err}");
    }
}
