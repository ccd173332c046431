//! Prometheus metrics of the scheduler, served on `/metrics`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    /// Creation of the gang's oldest pod to the last bind.
    pub gang_latency: Histogram,
    /// Creation of a pod to its bind.
    pub pod_latency: Histogram,
    /// Time of one placement decision in the engine.
    pub decision: Histogram,
    pub attempts: Family<ResultLabels, Counter>,
    pub bind_failures: Counter,
    pub queue_depth: Gauge,
    /// Gangs past the starvation threshold holding reserved nodes.
    pub reserving_gangs: Gauge,
    pub gpu_allocation: Gauge<f64, AtomicU64>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("ringmaster_scheduler");
        let m = Self {
            gang_latency: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            pod_latency: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            decision: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            attempts: Family::default(),
            bind_failures: Counter::default(),
            queue_depth: Gauge::default(),
            reserving_gangs: Gauge::default(),
            gpu_allocation: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "gang_scheduling_latency_seconds",
            "From a gang's first pod's creation to its last bind",
            m.gang_latency.clone(),
        );
        registry.register(
            "pod_scheduling_latency_seconds",
            "From a pod's creation to its bind",
            m.pod_latency.clone(),
        );
        registry.register(
            "placement_decision_seconds",
            "Time the engine takes to place one gang",
            m.decision.clone(),
        );
        registry.register(
            "gang_attempts",
            "Gang placement attempts by result (bound, unschedulable, bind_error, rolled_back)",
            m.attempts.clone(),
        );
        registry.register(
            "bind_failures",
            "Pods whose bind failed (their gang is rolled back)",
            m.bind_failures.clone(),
        );
        registry.register(
            "queue_depth",
            "Gangs waiting for placement (complete or not)",
            m.queue_depth.clone(),
        );
        registry.register(
            "reserving_gangs",
            "Gangs waiting past the starvation threshold, with nodes reserved for them",
            m.reserving_gangs.clone(),
        );
        registry.register(
            "gpu_allocation_ratio",
            "Allocated over allocatable milli-GPU on Ready nodes",
            m.gpu_allocation.clone(),
        );
        Arc::new(Self { registry, ..m })
    }

    pub fn attempt(&self, result: &'static str) {
        self.attempts.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
