//! The TrainingJob controller: `desired` (pure builders), `status` (pure decisions),
//! `reconcile` (the I/O), `own_writes` (the operator's last status write per job).

pub mod desired;
pub mod own_writes;
pub mod reconcile;
pub mod status;
