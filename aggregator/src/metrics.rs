//! Every metric the aggregator exports, declared in one place.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub spans_exported: Counter,
    pub spans_rejected: Family<ReasonLabel, Counter>,
    pub export_retries: Counter,
    pub outbox_requests: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mermin_aggregator");
        let spans_exported = Counter::default();
        registry.register(
            "spans_exported",
            "Spans the OTLP endpoint accepted",
            spans_exported.clone(),
        );
        let spans_rejected = Family::default();
        registry.register(
            "spans_rejected",
            "Spans the OTLP endpoint refused for good, by reason",
            spans_rejected.clone(),
        );
        let export_retries = Counter::default();
        registry.register(
            "export_retries",
            "Export attempts that failed and will be retried",
            export_retries.clone(),
        );
        let outbox_requests = Gauge::default();
        registry.register(
            "outbox_requests",
            "Export requests queued durably, not yet delivered",
            outbox_requests.clone(),
        );
        Self {
            registry,
            spans_exported,
            spans_rejected,
            export_retries,
            outbox_requests,
        }
    }

    pub fn rejected(&self, reason: &str, spans: u64) {
        self.spans_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(spans);
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
