use std::path::PathBuf;

/// Every failure of this crate: bad input files, bad requests, unknown names.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid request for pod {pod}: {message}")]
    InvalidRequest { pod: String, message: String },
    #[error("unknown policy {0:?}; known: {1}")]
    UnknownPolicy(String, String),
    #[error("node {0:?} is not in the cluster")]
    UnknownNode(String),
    #[error("pod {pod} does not fit node {node}: {message}")]
    DoesNotFit {
        pod: String,
        node: String,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("bound: {0}")]
    Bound(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
