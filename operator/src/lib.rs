//! ringmaster's Kubernetes controllers.

pub mod error;
pub mod inferenceservice;
pub mod memory;
pub mod metrics;
pub mod pod;
pub mod run;
pub mod scheduler;
pub mod serve;
pub mod trainingjob;
pub mod writes;
