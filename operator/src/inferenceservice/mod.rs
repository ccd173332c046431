//! The InferenceService controller: `model` (pure: what to serve, from a source or a
//! TrainingJob's best model), `desired` (pure builders), `status` (pure decisions),
//! `reconcile` (the I/O).

pub mod desired;
pub mod model;
pub mod reconcile;
pub mod status;
