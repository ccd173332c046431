//! How the trainer reports live progress into `status.progress`.
//!
//! Least privilege: each job's pods run as the ServiceAccount `<job>-trainer`, whose Role
//! may only get and patch the status of that one TrainingJob. The trainer applies just
//! `status.progress` with its own field manager, so it and the operator (which owns the
//! rest of the status) never overwrite each other.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use crate::keys::TRAINER_FIELD_MANAGER;
use crate::{Progress, TrainingJob};

/// Writes `status.progress` of one TrainingJob.
pub struct ProgressReporter {
    api: Api<TrainingJob>,
    job: String,
}

impl ProgressReporter {
    pub fn new(client: Client, namespace: &str, job: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            job: job.to_string(),
        }
    }

    /// From the pod environment (`RINGMASTER_JOB`, `RINGMASTER_NAMESPACE` set by the
    /// operator, and the in-cluster credentials); `None` outside a cluster, where
    /// `ringmaster launch` reports to the terminal instead.
    pub async fn from_env() -> Option<Self> {
        let job = std::env::var("RINGMASTER_JOB").ok()?;
        let namespace = std::env::var("RINGMASTER_NAMESPACE").ok()?;
        let client = Client::try_default().await.ok()?;
        Some(Self::new(client, &namespace, &job))
    }

    /// Applies `progress` (stamping `lastUpdateTime` and `epochDisplay`).
    pub async fn report(&self, progress: &Progress) -> kube::Result<()> {
        let mut progress = progress.clone();
        progress.last_update_time = Some(Time(Timestamp::now()));
        progress.epoch_display = Some(format!("{}/{}", progress.epoch, progress.total_epochs));
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", crate::GROUP, crate::VERSION),
            "kind": "TrainingJob",
            "status": { "progress": progress },
        });
        self.api
            .patch_status(
                &self.job,
                &PatchParams::apply(TRAINER_FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map(|_| ())
    }
}
