//! Prometheus metrics of the operator, served on `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use ringmaster_crds::TrainingJob;

use crate::error::Error;

/// Which controller a reconcile belongs to: `trainingjob` or `inferenceservice`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

pub struct Metrics {
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<ErrorLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    pub restarts: Counter,
    /// Reconciles whose status commit met a newer object than they had read.
    pub stale_views: Counter,
    jobs_by_phase: Family<PhaseLabels, Gauge>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("ringmaster_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let restarts = Counter::default();
        let stale_views = Counter::default();
        let jobs_by_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles by controller", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            duration.clone(),
        );
        registry.register(
            "gang_restarts",
            "Whole-gang restarts after worker failures",
            restarts.clone(),
        );
        registry.register(
            "stale_views",
            "Reconciles that decided from an outdated object and were retried without acting",
            stale_views.clone(),
        );
        registry.register(
            "trainingjobs",
            "TrainingJobs by phase",
            jobs_by_phase.clone(),
        );
        Arc::new(Self {
            reconciles,
            failures,
            duration,
            restarts,
            stale_views,
            jobs_by_phase,
            registry,
        })
    }

    pub fn observe_reconcile(
        &self,
        controller: &'static str,
        took: Duration,
        error: Option<&Error>,
    ) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(e) = error {
            self.failures
                .get_or_create(&ErrorLabels {
                    controller,
                    error: e.metric_label(),
                })
                .inc();
        }
    }

    /// Renders the text format; job counts by phase are taken from the watch cache at
    /// scrape time, so they never drift from the cluster.
    pub fn render(&self, jobs: &Store<TrainingJob>) -> String {
        self.jobs_by_phase.clear();
        for job in jobs.state() {
            let phase = job
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .map_or("Unknown".to_string(), |p| format!("{p:?}"));
            self.jobs_by_phase
                .get_or_create(&PhaseLabels { phase })
                .inc();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
