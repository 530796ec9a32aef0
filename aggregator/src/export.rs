//! Delivery of the export outbox to an OTLP/gRPC endpoint (Tempo, or a collector).
//!
//! Requests are taken from the [`Store`]'s outbox oldest first, one at a time, and removed only
//! after the endpoint answered. Policy:
//! - **accepted** — removed; spans the endpoint reports as rejected in a partial success are
//!   counted as `spans_rejected{reason="partial_success"}`;
//! - **`INVALID_ARGUMENT`** — the endpoint saw the data and refuses it for good: removed, counted as
//!   `spans_rejected{reason="invalid_argument"}`, logged with the endpoint's message;
//! - **anything else** (endpoint down, overloaded, timeouts, auth or TLS misconfiguration) —
//!   kept and retried with exponential backoff and full jitter, forever: acknowledged data is
//!   never dropped because an endpoint is unreachable. Retries are counted.
//!
//! Span ids are deterministic, so a request delivered twice (an answer lost after the endpoint
//! stored it) is deduplicated by Tempo.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use prost::Message;
use tokio::sync::{Notify, watch};
use tonic::{Code, transport::Channel};

use crate::{
    metrics::Metrics,
    store::{Store, StoreError},
};

#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// `http://host:4317` (or `https://`).
    pub endpoint: String,
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl ExportConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Exporter {
    store: Store,
    client: TraceServiceClient<Channel>,
    config: ExportConfig,
    metrics: Arc<Metrics>,
    /// Notified when something is pushed to the outbox.
    wake: Arc<Notify>,
}

/// What one delivery attempt came to.
enum Attempt {
    Done,
    Retry(String),
}

impl Exporter {
    /// Checks the endpoint and prepares a lazily connecting channel (no I/O yet).
    pub fn new(
        store: Store,
        config: ExportConfig,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Result<Self, ExportError> {
        let endpoint_error = |reason: String| ExportError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        if !(config.endpoint.starts_with("http://") || config.endpoint.starts_with("https://")) {
            return Err(endpoint_error("must start with http:// or https://".into()));
        }
        let channel = Channel::from_shared(config.endpoint.clone())
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .connect_lazy();
        Ok(Self {
            store,
            client: TraceServiceClient::new(channel),
            config,
            metrics,
            wake,
        })
    }

    /// Delivers the outbox until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ExportError> {
        let mut backoff = self.backoff();
        while !*stop.borrow() {
            self.metrics
                .outbox_requests
                .set(self.store.outbox_len() as i64);
            let Some((id, bytes)) = self.store.outbox_oldest(1)?.into_iter().next() else {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            };
            match self.attempt(&bytes).await {
                Attempt::Done => {
                    self.store.outbox_remove(id).await?;
                    backoff = self.backoff();
                }
                Attempt::Retry(why) => {
                    self.metrics.export_retries.inc();
                    let delay = backoff.next().unwrap_or(self.config.max_backoff);
                    tracing::warn!(endpoint = %self.config.endpoint, %why, ?delay, "export failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        Ok(())
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.config.min_backoff)
            .with_max_delay(self.config.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }

    async fn attempt(&mut self, bytes: &[u8]) -> Attempt {
        let request = match ExportTraceServiceRequest::decode(bytes) {
            Ok(request) => request,
            Err(err) => {
                tracing::error!(%err, "undecodable outbox entry dropped");
                // Its spans cannot be counted; the request counts as one.
                self.metrics.rejected("corrupt_outbox_entry", 1);
                return Attempt::Done;
            }
        };
        let spans = span_count(&request);
        match self.client.export(request).await {
            Ok(response) => {
                let rejected = response
                    .into_inner()
                    .partial_success
                    .map(|p| (p.rejected_spans.max(0) as u64, p.error_message))
                    .filter(|(n, _)| *n > 0);
                let rejected_count = rejected.as_ref().map_or(0, |(n, _)| *n);
                if let Some((n, message)) = rejected {
                    tracing::error!(spans = n, %message, "endpoint rejected part of a request");
                    self.metrics.rejected("partial_success", n);
                }
                self.metrics
                    .spans_exported
                    .inc_by(spans.saturating_sub(rejected_count));
                Attempt::Done
            }
            Err(status) if status.code() == Code::InvalidArgument => {
                tracing::error!(
                    spans,
                    message = status.message(),
                    "endpoint refused a request"
                );
                self.metrics.rejected("invalid_argument", spans);
                Attempt::Done
            }
            Err(status) => Attempt::Retry(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

fn span_count(request: &ExportTraceServiceRequest) -> u64 {
    request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum()
}
