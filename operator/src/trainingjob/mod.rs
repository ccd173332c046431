//! The TrainingJob controller: `desired` (pure builders), `status` (pure decisions),
//! `reconcile` (the I/O), `own_writes` (the operator's last status write per job),
//! `pending_creates` (pods created but not yet in the cache).

pub mod desired;
pub mod own_writes;
pub mod pending_creates;
pub mod reconcile;
pub mod status;
