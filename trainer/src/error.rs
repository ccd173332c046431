use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Collective(#[from] ringmaster_collective::Error),
    #[error(transparent)]
    Model(#[from] ringmaster_nn::Error),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {}: {detail}", path.display())]
    Checkpoint { path: PathBuf, detail: String },
    #[error(
        "step {step}: {what} is not finite (NaN or Inf); lower the learning rate, enable gradient clipping, or set the non-finite policy to skip"
    )]
    NonFinite { step: u64, what: String },
    /// Ranks of one job that were built differently (model, frozen set, bucket size).
    #[error("rank {rank} disagrees with rank 0: {detail}")]
    RankMismatch { rank: usize, detail: String },
    #[error("{0}")]
    Config(String),
}

/// Maps an I/O error to `Error::Io` naming what was being done and the path.
pub(crate) fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
