//! The ringmaster trainer: named variables with trainable/frozen/buffer roles, optimizers
//! with saveable state, data-parallel gradient averaging and checkpoints that resume
//! bit-for-bit; and the training run a TrainingJob describes (`spec`, `source`, `data`,
//! `train`, `evaluate`, `run_dir`), locally through `launch`.

pub mod allocator;
pub mod bench;
pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod ddp;
pub mod ddp_step_bench;
mod error;
pub mod evaluate;
pub mod events;
pub mod grads;
pub mod host;
pub mod launch;
pub mod loss;
pub mod model;
mod model_card;
pub mod optim;
pub mod params;
mod plot;
pub mod rng;
pub mod run_dir;
pub mod selftest;
pub mod serve;
pub mod source;
pub mod spec;
mod status_report;
pub mod step;
pub mod train;

pub use error::{Error, Result};
