//! The ringmaster trainer: named variables with trainable/frozen/buffer roles, optimizers
//! with saveable state, data-parallel gradient averaging and checkpoints that resume
//! bit-for-bit.

pub mod allocator;
pub mod bench;
pub mod checkpoint;
pub mod ddp;
mod error;
pub mod grads;
pub mod host;
pub mod optim;
pub mod params;
pub mod rng;
pub mod selftest;
pub mod step;

pub use error::{Error, Result};
