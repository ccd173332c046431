//! The TrainingJob controller: `desired` (pure builders), `status` (pure decisions),
//! `reconcile` (the I/O).

pub mod desired;
pub mod reconcile;
pub mod status;
