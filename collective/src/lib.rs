//! Collective communication for data-parallel training: a rendezvous store, a TCP ring
//! (CPU) and NCCL (GPU, feature `nccl`) behind one [`Communicator`] trait.

mod auth;
pub mod bench;
mod communicator;
mod error;
mod failure;
mod location;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
mod nccl_watchdog;
mod net;
mod pipeline;
mod rendezvous;
mod ring;
mod shm;
mod store;

pub use auth::{TOKEN_ENV, TOKEN_FILE_ENV, Token};
pub use communicator::{Communicator, ReduceOp};
pub use error::{Error, Peer, Result};
pub use location::Location;
#[cfg(feature = "nccl")]
pub use nccl::{NcclCommunicator, connect_nccl, connect_nccl_on_stream};
pub use rendezvous::{
    DEFAULT_RENDEZVOUS_TIMEOUT, DEFAULT_TIMEOUT, RendezvousConfig, connect_tcp, parse_order,
};
pub use ring::{RingConfig, TcpRing, Transport};
pub use store::{StoreClient, StoreServer};

pub use half::bf16;
