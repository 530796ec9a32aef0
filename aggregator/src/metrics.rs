//! Every metric the aggregator exports, declared in one place, and the HTTP endpoints that serve
//! them: `/metrics` (Prometheus text), `/livez` (fails when a flow shard is stuck or the store
//! is broken until a restart: the orchestrator restarts the aggregator, which recovers from its
//! store), `/readyz`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    placement::{SHARDS, ShardId},
    store::Store,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Which endpoint, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointReasonLabel {
    pub endpoint: String,
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub batches_accepted: Counter,
    pub batches_duplicate: Counter,
    pub batches_conflicting: Counter,
    pub records_accepted: Counter,
    pub streams_rejected: Family<ReasonLabel, Counter>,
    pub spans_exported: Counter,
    pub spans_rejected: Family<ReasonLabel, Counter>,
    pub export_retries: Counter,
    pub export_paused: Counter,
    pub outbox_requests: Gauge,
    pub outbox_bytes: Gauge,
    pub spans_dropped: Family<ReasonLabel, Counter>,
    pub shard_connections: Family<ShardLabel, Gauge>,
    /// Parts of agent batches sent to a shard and not yet applied (waiting for room included).
    pub shard_mailbox_parts: Family<ShardLabel, Gauge>,
    pub observe_dropped: Family<ReasonLabel, Counter>,
    pub tls_handshake_failures: Family<EndpointReasonLabel, Counter>,
    shard_last_tick: Family<ShardLabel, Gauge>,
    /// Unix seconds of each shard's last tick (0: not started), for `/livez`.
    shard_ticks: Vec<AtomicU64>,
    /// The checkpoint writer's thread ended (a panic): nothing becomes durable until a restart.
    checkpoint_writer_gone: std::sync::atomic::AtomicBool,
    pub intervals_emitted: Counter,
    pub batches_read_back: Counter,
    pub late_records_ignored: Counter,
    pub reused_tuples: Counter,
    pub connections_forgotten_early: Counter,
    pub intervals_complete_early: Counter,
    pub checkpoint_failures: Counter,
    pub store_write_failures: Family<ReasonLabel, Counter>,
    pub records_lost: Family<ReasonLabel, Counter>,
    pub agents_retired: Counter,
    pub agents_known: Gauge,
    /// Agent batches validated and waiting for outbox room before they are stored.
    pub batches_held: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: ShardId,
}

/// A shard that has not ticked for this long is stuck (a checkpoint takes well under a second).
pub const STUCK_AFTER_SECONDS: u64 = 30;

impl Metrics {
    /// Counts a write the store refused, by the operation that asked (`append`, `outbox_remove`).
    pub fn store_write_failed(&self, operation: &str) {
        self.store_write_failures
            .get_or_create(&ReasonLabel {
                reason: operation.to_owned(),
            })
            .inc();
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mermin_aggregator");
        let batches_accepted = Counter::default();
        registry.register(
            "batches_accepted",
            "Agent batches made durable and acknowledged",
            batches_accepted.clone(),
        );
        let batches_duplicate = Counter::default();
        registry.register(
            "batches_duplicate",
            "Agent batches received again after they were durable (acknowledged, not applied)",
            batches_duplicate.clone(),
        );
        let batches_conflicting = Counter::default();
        registry.register(
            "batches_conflicting",
            "Agent batches replayed with a sequence already stored but different content (refused)",
            batches_conflicting.clone(),
        );
        let records_accepted = Counter::default();
        registry.register(
            "records_accepted",
            "Flow records in accepted batches",
            records_accepted.clone(),
        );
        let streams_rejected = Family::default();
        registry.register(
            "streams_rejected",
            "Agent streams ended because of bad input, by gRPC status",
            streams_rejected.clone(),
        );
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
        let export_paused = Counter::default();
        registry.register(
            "export_paused",
            "Export attempts not made because the store is broken until a restart",
            export_paused.clone(),
        );
        let outbox_requests = Gauge::default();
        registry.register(
            "outbox_requests",
            "Export requests queued durably, not yet delivered",
            outbox_requests.clone(),
        );
        let outbox_bytes = Gauge::default();
        registry.register(
            "outbox_bytes",
            "Bytes of the export requests queued durably (what the outbox quota limits)",
            outbox_bytes.clone(),
        );
        let spans_dropped = Family::default();
        registry.register(
            "spans_dropped",
            "Spans deleted before delivery by policy, by reason (outbox_full: the drop_oldest quota policy)",
            spans_dropped.clone(),
        );
        let shard_last_tick = Family::default();
        registry.register(
            "shard_last_tick_seconds",
            "Unix time of the flow shard's last tick; older than 30 s means stuck, and /livez fails",
            shard_last_tick.clone(),
        );
        let shard_connections = Family::default();
        registry.register(
            "shard_connections",
            "Connections a flow shard holds (open, or closed and waiting for late records)",
            shard_connections.clone(),
        );
        let shard_mailbox_parts = Family::default();
        registry.register(
            "shard_mailbox_parts",
            "Parts of agent batches sent to a flow shard and not yet applied (queued or waiting for room)",
            shard_mailbox_parts.clone(),
        );
        let observe_dropped = Family::default();
        registry.register(
            "observe_flows_dropped",
            "Flows an admin observe stream missed, by reason (slow_observer: it did not keep up; the pipeline never waits for it)",
            observe_dropped.clone(),
        );
        let tls_handshake_failures = Family::default();
        registry.register(
            "tls_handshake_failures",
            "Connections refused during the TLS handshake, by endpoint (agents, admin) and reason (no_client_certificate, expired_certificate, unknown_issuer, invalid_certificate, handshake, timeout, io)",
            tls_handshake_failures.clone(),
        );
        let intervals_emitted = Counter::default();
        registry.register(
            "intervals_emitted",
            "Flow intervals stitched and queued for export (two spans each)",
            intervals_emitted.clone(),
        );
        let batches_read_back = Counter::default();
        registry.register(
            "batches_read_back",
            "Batch parts a flow shard read back from the log because they never reached it (their session ended first)",
            batches_read_back.clone(),
        );
        let reused_tuples = Counter::default();
        registry.register(
            "reused_tuples",
            "Connections that began on the 5-tuple of an earlier, ended connection (each its own trace)",
            reused_tuples.clone(),
        );
        let connections_forgotten_early = Counter::default();
        registry.register(
            "connections_forgotten_early",
            "Closed connections forgotten before their grace period because their 5-tuple carried 128 later connections within it (a late record of one is counted into a later connection)",
            connections_forgotten_early.clone(),
        );
        let intervals_complete_early = Counter::default();
        registry.register(
            "intervals_complete_early",
            "Final intervals emitted before the settle time because every point that saw them, including both ends' nodes, had reported",
            intervals_complete_early.clone(),
        );
        let late_records_ignored = Counter::default();
        registry.register(
            "late_records_ignored",
            "Records of closed connections from points that do not count them (already counted elsewhere)",
            late_records_ignored.clone(),
        );
        let checkpoint_failures = Counter::default();
        registry.register(
            "checkpoint_failures",
            "Flow shard checkpoints that could not be written (kept and retried at the next tick)",
            checkpoint_failures.clone(),
        );
        let store_write_failures = Family::default();
        registry.register(
            "store_write_failures",
            "Writes the durable store refused, by operation (full or failing disk)",
            store_write_failures.clone(),
        );
        let records_lost = Family::default();
        registry.register(
            "lost",
            "Acknowledged data found missing, by reason (batch_missing_from_log, batch_unreadable: batches; serialization: connections)",
            records_lost.clone(),
        );
        let agents_retired = Counter::default();
        registry.register(
            "agents_retired",
            "Agent processes (boot ids) forgotten: superseded by a newer one on their node, every batch applied",
            agents_retired.clone(),
        );
        let agents_known = Gauge::default();
        registry.register(
            "agents_known",
            "Agent processes (boot ids) the store keeps state for, as of the last retirement pass (the first runs agents.retire_after after the start)",
            agents_known.clone(),
        );
        let batches_held = Gauge::default();
        registry.register(
            "batches_held",
            "Agent batches validated and held back before they are stored: the export outbox is over its quota (backpressure policy)",
            batches_held.clone(),
        );
        Self {
            registry,
            batches_held,
            agents_retired,
            agents_known,
            checkpoint_failures,
            store_write_failures,
            records_lost,
            batches_accepted,
            batches_duplicate,
            batches_conflicting,
            records_accepted,
            streams_rejected,
            spans_exported,
            spans_rejected,
            export_retries,
            export_paused,
            outbox_requests,
            outbox_bytes,
            spans_dropped,
            shard_connections,
            shard_mailbox_parts,
            observe_dropped,
            tls_handshake_failures,
            shard_last_tick,
            shard_ticks: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            checkpoint_writer_gone: std::sync::atomic::AtomicBool::new(false),
            intervals_emitted,
            batches_read_back,
            late_records_ignored,
            reused_tuples,
            connections_forgotten_early,
            intervals_complete_early,
        }
    }

    /// A shard finished a tick at `now_seconds` (Unix).
    pub fn shard_ticked(&self, shard: ShardId, now_seconds: u64) {
        self.shard_last_tick
            .get_or_create(&ShardLabel { shard })
            .set(now_seconds as i64);
        if let Some(tick) = self.shard_ticks.get(usize::from(shard)) {
            tick.store(now_seconds, Ordering::Relaxed);
        }
    }

    /// The checkpoint writer is gone: `/livez` fails from now on, so that the aggregator is
    /// restarted and recovers what was acknowledged from its store.
    pub fn checkpoint_writer_died(&self) {
        self.checkpoint_writer_gone.store(true, Ordering::Relaxed);
    }

    /// The first shard whose last tick is more than [`STUCK_AFTER_SECONDS`] before `now_seconds`,
    /// and how long ago it ticked.
    pub fn stuck_shard(&self, now_seconds: u64) -> Option<(ShardId, u64)> {
        self.shard_ticks
            .iter()
            .enumerate()
            .find_map(|(shard, tick)| {
                let last = tick.load(Ordering::Relaxed);
                let age = now_seconds.saturating_sub(last);
                (last != 0 && age > STUCK_AFTER_SECONDS).then_some((shard as ShardId, age))
            })
    }

    /// Registers metrics declared elsewhere (the Kubernetes watchers') in this registry.
    pub fn register(&mut self, add: impl FnOnce(&mut Registry)) {
        add(&mut self.registry);
    }

    /// Acknowledged data found missing (see the `lost` metric).
    pub fn lost(&self, reason: &str, count: u64) {
        self.records_lost
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(count);
    }

    pub fn rejected(&self, reason: &str, spans: u64) {
        self.spans_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(spans);
    }

    /// Every series of `family` (a counter by reason) that has been counted, as `(reason,
    /// count)` sorted by reason: what the admin API reports.
    pub fn by_reason(family: &Family<ReasonLabel, Counter>) -> Vec<(String, u64)> {
        // The family is read through its own exposition: it offers no iteration.
        let mut registry = Registry::default();
        registry.register("m", "", family.clone());
        let mut text = String::new();
        let _ = encode(&mut text, &registry);
        let mut counts: Vec<(String, u64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("m_total{reason=\"")?;
                let (reason, value) = rest.split_once("\"} ")?;
                Some((reason.to_owned(), value.parse().ok()?))
            })
            .collect();
        counts.sort();
        counts
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The HTTP endpoints. `/readyz` answers ready once the agent endpoint is listening (this router
/// is only served after that), `ready` is true (the Kubernetes metadata had its first sync) and
/// the store's last write succeeded: "can take agent batches". `/livez` fails while a shard has
/// stopped ticking, or the store is broken for good or its checkpoint writer gone.
pub fn router(
    metrics: std::sync::Arc<Metrics>,
    ready: tokio::sync::watch::Receiver<bool>,
    store: Store,
) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(m): axum::extract::State<std::sync::Arc<Metrics>>| async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                },
            ),
        )
        .route(
            "/livez",
            get({
                let store = store.clone();
                move |axum::extract::State(m): axum::extract::State<std::sync::Arc<Metrics>>| {
                    let stuck = m.stuck_shard(crate::clock::unix_now() / 1_000_000_000);
                    let broken = store.broken().or_else(|| {
                        m.checkpoint_writer_gone
                            .load(Ordering::Relaxed)
                            .then(|| "the checkpoint writer is gone".to_owned())
                    });
                    async move {
                        let unavailable = axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        match (broken, stuck) {
                            (Some(why), _) => (
                                unavailable,
                                format!(
                                    "the store cannot write until a restart: {why} \
                                     (the restart recovers from the data on disk)\n"
                                ),
                            ),
                            (None, Some((shard, age))) => (
                                unavailable,
                                format!("flow shard {shard} has not ticked for {age} s\n"),
                            ),
                            (None, None) => (axum::http::StatusCode::OK, "ok\n".to_owned()),
                        }
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let synced = *ready.borrow();
                let failure = store.write_failure();
                async move {
                    let unavailable = axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    match failure {
                        Some(why) => (unavailable, format!("the store cannot write: {why}\n")),
                        None if !synced => (
                            unavailable,
                            "waiting for the first sync of Kubernetes metadata\n".to_owned(),
                        ),
                        None => (axum::http::StatusCode::OK, "ready\n".to_owned()),
                    }
                }
            }),
        )
        .with_state(metrics)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_that_stopped_ticking_is_stuck_and_one_not_started_is_not() {
        let metrics = Metrics::new();
        assert_eq!(metrics.stuck_shard(1_000), None, "nothing started yet");
        metrics.shard_ticked(0, 1_000);
        metrics.shard_ticked(3, 990);
        assert_eq!(metrics.stuck_shard(1_020), None);
        assert_eq!(metrics.stuck_shard(1_021), Some((3, 31)));
        metrics.shard_ticked(3, 1_021);
        assert_eq!(metrics.stuck_shard(1_031), Some((0, 31)));
        assert!(
            metrics
                .render()
                .contains("mermin_aggregator_shard_last_tick_seconds{shard=\"3\"} 1021")
        );
    }

    #[test]
    fn counts_by_reason_are_read_back_sorted() {
        let metrics = Metrics::new();
        assert_eq!(Metrics::by_reason(&metrics.spans_rejected), []);
        metrics.rejected("partial_success", 3);
        metrics.rejected("invalid_argument", 2);
        metrics.rejected("partial_success", 1);
        assert_eq!(
            Metrics::by_reason(&metrics.spans_rejected),
            [
                ("invalid_argument".to_owned(), 2),
                ("partial_success".to_owned(), 4)
            ]
        );
    }
}
