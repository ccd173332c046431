//! ringmaster's Kubernetes controllers.

pub mod error;
pub mod memory;
pub mod metrics;
pub mod run;
pub mod scheduler;
pub mod serve;
pub mod trainingjob;
