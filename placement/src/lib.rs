//! Placement engine: a pure filter/score/gang core over a cluster snapshot, no
//! Kubernetes types, and the exact trace replay of the FGD paper (ATC'23). See README.md.

pub mod bench;
pub mod bound;
pub mod cluster;
mod error;
pub mod filter;
pub mod gang;
pub mod gorand;
mod gorand_cooked;
pub mod metrics;
pub mod offline;
pub mod place;
pub mod plot;
pub mod policy;
pub mod replay;
pub mod request;
pub mod simulate;
pub mod trace;

pub use cluster::{ClusterState, GpuAffinity, ModelId, Node, Snapshot};
pub use error::{Error, Result};
pub use filter::{FilterReason, Resolved};
pub use gang::{
    Assignment, GangPlacement, GangRequest, TopologyConstraint, place_gang, place_gang_on,
};
pub use place::{DomainShortfall, Placement, Placer, Tie, Unplaceable, place_pod};
pub use policy::{Scored, Scorer};
pub use request::{
    GpuDemand, LabelOp, LabelRequirement, PodRequest, Taint, TaintEffect, Toleration,
};
