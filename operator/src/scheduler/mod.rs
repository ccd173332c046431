//! ringmaster-scheduler: all-or-nothing gang placement of pods that name
//! `ringmaster-scheduler`, through the pure engine in `ringmaster-placement`.
//!
//! `cache` turns watched Nodes and Pods into a `ClusterState`, `queue` groups pending
//! pods into gangs in order, `affinity` turns pod (anti-)affinity into node-label rules,
//! `reserve` is the starvation guard of backfill, `explain` words the unschedulable
//! condition, `bind` talks to the API server, `metrics` serves Prometheus, `run` wires
//! it under leader election.

pub mod affinity;
pub mod bind;
pub mod cache;
pub mod explain;
pub mod metrics;
pub mod queue;
pub mod reserve;
pub mod run;

/// The scheduler's one error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("leader election failed: {0}")]
    LeaderElection(#[from] kube_lease_manager::LeaseManagerError),
    #[error("placement engine: {0}")]
    Placement(#[from] ringmaster_placement::Error),
    #[error("cannot build the pods/binding request: {0}")]
    Request(#[from] http::Error),
    #[error("could not serialise {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
