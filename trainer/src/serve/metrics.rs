//! Prometheus metrics of `ringmaster serve` (`/metrics`): what the autoscaler and the
//! dashboards read.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `v2`, `v1` or `predict`.
    pub protocol: &'static str,
    pub code: u16,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Histogram,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    /// Inputs submitted and not yet taken into a batch.
    pub queue_depth: Gauge,
    /// Inference requests admitted and not yet answered (the autoscaling metric).
    pub in_flight: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ringmaster_serve");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        let batch_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        registry.register(
            "requests",
            "Inference requests by protocol and HTTP status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from admission to answer of inference requests",
            latency.clone(),
        );
        registry.register("batch_size", "Inputs per forward pass", batch_size.clone());
        registry.register(
            "batch_duration_seconds",
            "Time per forward pass",
            batch_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Inputs waiting for a batch",
            queue_depth.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Inference requests admitted and not yet answered",
            in_flight.clone(),
        );
        Self {
            requests,
            latency,
            batch_size,
            batch_seconds,
            queue_depth,
            in_flight,
            registry,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
