use std::path::PathBuf;

/// Errors from building, loading or running a model. Messages name the file and tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{file}: {reason}")]
    Config { file: PathBuf, reason: String },

    #[error("{file}: tensor `{tensor}`: {reason}")]
    Checkpoint {
        file: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error("{file}: {reason}")]
    File { file: PathBuf, reason: String },

    #[error(
        "{tokenizer}: the vocabulary has {vocab_size} tokens but {config} sizes the word embeddings for {embeddings}; use the tokenizer the checkpoint was trained with"
    )]
    Vocabulary {
        tokenizer: PathBuf,
        vocab_size: usize,
        config: PathBuf,
        embeddings: usize,
    },

    #[error("unknown model architecture: {0}")]
    Architecture(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
