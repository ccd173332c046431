use std::fmt;
use std::io;
use std::net::SocketAddr;

/// A rank and the address we talk to it on, so every message says which process to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub rank: usize,
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} ({})", self.rank, self.addr)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "authentication with {peer} failed: {reason}; every rank of a job must use the same token (RINGMASTER_TOKEN or RINGMASTER_TOKEN_FILE)"
    )]
    Auth { peer: String, reason: String },

    #[error("protocol error talking to {peer}: {reason}")]
    Protocol { peer: String, reason: String },

    #[error("store at {addr}: {reason}")]
    Store { addr: String, reason: String },

    #[error(
        "timed out after {secs:.1} s during rendezvous waiting for {what}; start every rank of the job (RANK 0..WORLD_SIZE-1) with the same MASTER_ADDR/MASTER_PORT, or raise RINGMASTER_RENDEZVOUS_TIMEOUT_S"
    )]
    RendezvousTimeout { what: String, secs: f64 },

    #[error(
        "{peer} sent nothing for {secs:.1} s during {op}: it, or a rank it waits for, is stalled or unreachable; check those processes (raise RINGMASTER_TIMEOUT_S if it is only slow){cause}"
    )]
    PeerTimeout {
        peer: Peer,
        op: String,
        secs: f64,
        cause: String,
    },

    #[error(
        "{peer} closed the connection during {op} ({detail}): that rank exited or failed; check its log{cause}"
    )]
    PeerClosed {
        peer: Peer,
        op: String,
        detail: String,
        cause: String,
    },

    #[error(
        "rank {rank} and {peer} disagree: {detail}; every rank must run the same job configuration and call the same collectives in the same order with the same buffer sizes"
    )]
    Mismatch {
        rank: usize,
        peer: String,
        detail: String,
    },

    #[error("{what} is not supported by the {backend} backend")]
    Unsupported {
        what: &'static str,
        backend: &'static str,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(
        "the communicator failed earlier and cannot be used again (first error: {0}); restart the job"
    )]
    Poisoned(String),

    #[cfg(feature = "cuda")]
    #[error("CUDA: {0}")]
    Cuda(String),

    #[cfg(feature = "nccl")]
    #[error(
        "NCCL {op} failed: {reason}; the communicator was aborted and cannot be used again, so the process should exit (every rank of the job fails the same way)"
    )]
    NcclAborted { op: String, reason: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Appends a note about the job-wide picture (the first failure another rank reported,
    /// the ranks that stopped responding), so a rank that only saw the cascade still names
    /// the rank that really failed.
    pub(crate) fn with_note(mut self, note: &str) -> Self {
        if let Error::PeerTimeout { cause, .. } | Error::PeerClosed { cause, .. } = &mut self {
            cause.push_str("; ");
            cause.push_str(note);
        }
        self
    }
}
