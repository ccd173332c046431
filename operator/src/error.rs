//! The operator's one error type; `metric_label` names each kind on `/metrics`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot create or update {object}: {source}")]
    Write {
        /// Kind and name, e.g. `ConfigMap bert-spam-spec`.
        object: String,
        source: kube::Error,
    },
    /// Kind and name, e.g. `TrainingJob bert-spam`.
    #[error("{0} has no name, namespace or uid (not read from the API server?)")]
    MissingMetadata(String),
    /// What the watch lists, e.g. `pod`.
    #[error("the {0} watch stopped before its first list")]
    CacheClosed(&'static str),
    #[error("leader election failed: {0}")]
    LeaderElection(#[from] kube_lease_manager::LeaseManagerError),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Write { .. } => "write",
            Error::MissingMetadata(_) => "missing_metadata",
            Error::CacheClosed(_) => "cache_closed",
            Error::LeaderElection(_) => "leader_election",
        }
    }

    /// Why a child object can never be written as built, for errors that retrying cannot
    /// fix: too large (413), invalid (422), or refused by Pod Security admission. RBAC
    /// refusals and quota (also 403) can change, so they are retried.
    pub fn permanent_cause(&self) -> Option<String> {
        let Error::Write {
            object,
            source: kube::Error::Api(status),
        } = self
        else {
            return None;
        };
        let permanent = matches!(status.code, 413 | 422)
            || (status.code == 403 && status.message.contains("violates PodSecurity"));
        permanent.then(|| format!("{object} cannot be created: {}", status.message))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
