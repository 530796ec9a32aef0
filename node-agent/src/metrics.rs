//! Every metric the agent exports, declared in one place, and the HTTP endpoints that serve them:
//! `/metrics` (Prometheus text format), `/livez` (the collector loop is turning), `/readyz`
//! (programs loaded, interfaces present at start-up attached).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use node_common::Counter as KernelCounter;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    clock::WallClock,
    flows::{Reason, Report},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub records_emitted: Family<ReasonLabel, Counter>,
    pub records_dropped: Family<ReasonLabel, Counter>,
    pub kernel_dropped_packets: Family<ReasonLabel, Counter>,
    pub kernel_skipped_packets: Family<ReasonLabel, Counter>,
    pub kernel_overflow_packets: Counter,
    pub kernel_connections_merged: Counter,
    pub kernel_table_entries: Gauge,
    pub kernel_table_capacity: Gauge,
    pub tracked_flows: Gauge,
    pub attached_interfaces: Gauge,
    pub attach_errors: Counter,
    pub interfaces_skipped: Counter,
    pub scans: Counter,
    pub sink_backpressure: Counter,
    pub sink_reconnects: Counter,
    pub sink_batches_lost: Counter,
    pub translations_known: Gauge,
    pub translations_dropped: Family<ReasonLabel, Counter>,
    pub conntrack_resyncs: Counter,
    kernel_totals: [AtomicU64; KernelCounter::COUNT as usize],
    last_scan_ns: AtomicU64,
    /// When the collector last waited for room in the sink (see [`Metrics::waiting_on_sink`]).
    sink_wait_ns: AtomicU64,
    ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mermin_agent");
        let records_emitted = Family::default();
        registry.register(
            "records_emitted",
            "Flow records written to the sink, by end reason",
            records_emitted.clone(),
        );
        let records_dropped = Family::default();
        registry.register(
            "records_dropped",
            "Flow records the sink failed to take, by reason",
            records_dropped.clone(),
        );
        let kernel_dropped_packets = Family::default();
        registry.register(
            "kernel_dropped_packets",
            "Packets the programs could not count, by reason",
            kernel_dropped_packets.clone(),
        );
        let kernel_skipped_packets = Family::default();
        registry.register(
            "kernel_skipped_packets",
            "Frames that are not flows (not IP, malformed), by reason",
            kernel_skipped_packets.clone(),
        );
        let kernel_overflow_packets = Counter::default();
        registry.register(
            "kernel_overflow_packets",
            "Packets counted through the overflow ring because the flow table was full",
            kernel_overflow_packets.clone(),
        );
        let kernel_connections_merged = Counter::default();
        registry.register(
            "kernel_connections_merged",
            "New TCP connections the programs could not split from the earlier connection on the same 5-tuple (flow table full); each pair is reported as one flow",
            kernel_connections_merged.clone(),
        );
        let kernel_table_entries = Gauge::default();
        registry.register(
            "kernel_table_entries",
            "Entries of the kernel flow table at the last swap",
            kernel_table_entries.clone(),
        );
        let kernel_table_capacity = Gauge::default();
        registry.register(
            "kernel_table_capacity",
            "Capacity of each kernel flow table",
            kernel_table_capacity.clone(),
        );
        let tracked_flows = Gauge::default();
        registry.register(
            "tracked_flows",
            "Flows the agent tracks between records",
            tracked_flows.clone(),
        );
        let attached_interfaces = Gauge::default();
        registry.register(
            "attached_interfaces",
            "Interfaces the programs are attached to",
            attached_interfaces.clone(),
        );
        let attach_errors = Counter::default();
        registry.register(
            "attach_errors",
            "Failed attempts to attach to an interface",
            attach_errors.clone(),
        );
        let interfaces_skipped = Counter::default();
        registry.register(
            "interfaces_skipped",
            "Interfaces that match the patterns but have no Ethernet header (not attached)",
            interfaces_skipped.clone(),
        );
        let scans = Counter::default();
        registry.register("scans", "Flow table swaps", scans.clone());
        let sink_backpressure = Counter::default();
        registry.register(
            "sink_backpressure",
            "Times the collector waited because the aggregator had not acknowledged enough batches",
            sink_backpressure.clone(),
        );
        let sink_batches_lost = Counter::default();
        registry.register(
            "sink_batches_lost",
            "Batches the aggregator had acknowledged and then no longer had (its store was lost)",
            sink_batches_lost.clone(),
        );
        let sink_reconnects = Counter::default();
        registry.register(
            "sink_reconnects",
            "Aggregator streams that failed and were reopened",
            sink_reconnects.clone(),
        );
        let translations_known = Gauge::default();
        registry.register(
            "translations_known",
            "Address translations (DNAT, SNAT) of the node's connections the agent knows from conntrack",
            translations_known.clone(),
        );
        let translations_dropped = Family::default();
        registry.register(
            "translations_dropped",
            "Address translations the agent could not keep, by reason (their connections' records go out without one)",
            translations_dropped.clone(),
        );
        let conntrack_resyncs = Counter::default();
        registry.register(
            "conntrack_resyncs",
            "Times conntrack events were lost (socket buffer full) and the table was dumped again",
            conntrack_resyncs.clone(),
        );
        Self {
            registry,
            records_emitted,
            records_dropped,
            kernel_dropped_packets,
            kernel_skipped_packets,
            kernel_overflow_packets,
            kernel_connections_merged,
            kernel_table_entries,
            kernel_table_capacity,
            tracked_flows,
            attached_interfaces,
            attach_errors,
            interfaces_skipped,
            scans,
            sink_backpressure,
            sink_reconnects,
            sink_batches_lost,
            translations_known,
            translations_dropped,
            conntrack_resyncs,
            kernel_totals: Default::default(),
            last_scan_ns: AtomicU64::new(WallClock::kernel_now()),
            sink_wait_ns: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }

    /// Counts emitted records by reason, one counter update per reason.
    pub fn records_emitted(&self, reports: &[Report]) {
        for reason in Reason::ALL {
            let count = reports.iter().filter(|r| r.reason == reason).count();
            if count > 0 {
                self.records_emitted
                    .get_or_create(&ReasonLabel {
                        reason: reason_label(reason),
                    })
                    .inc_by(count as u64);
            }
        }
    }

    /// Takes the kernel's running totals and advances the exported counters by the difference.
    pub fn observe_kernel_counters(&self, totals: &[u64; KernelCounter::COUNT as usize]) {
        for (counter, (&total, seen)) in KernelCounter::ALL
            .into_iter()
            .zip(totals.iter().zip(&self.kernel_totals))
        {
            let delta = total.saturating_sub(seen.swap(total, Ordering::Relaxed));
            if delta == 0 {
                continue;
            }
            match counter {
                KernelCounter::OverflowEvents => {
                    self.kernel_overflow_packets.inc_by(delta);
                }
                KernelCounter::OverflowLost => {
                    self.kernel_drop("overflow_ring_full", delta);
                }
                KernelCounter::NoFlowTable => self.kernel_drop("no_flow_table", delta),
                KernelCounter::NonIp => self.kernel_skip("non_ip", delta),
                KernelCounter::Malformed => self.kernel_skip("malformed", delta),
                KernelCounter::ConnectionsMerged => {
                    self.kernel_connections_merged.inc_by(delta);
                }
            }
        }
    }

    fn kernel_drop(&self, reason: &'static str, delta: u64) {
        self.kernel_dropped_packets
            .get_or_create(&ReasonLabel { reason })
            .inc_by(delta);
    }

    fn kernel_skip(&self, reason: &'static str, delta: u64) {
        self.kernel_skipped_packets
            .get_or_create(&ReasonLabel { reason })
            .inc_by(delta);
    }

    /// The collector waits for room in the sink's buffer (the aggregator is slow or out of
    /// reach): alive, though not scanning.
    pub fn waiting_on_sink(&self, now_ns: u64) {
        self.sink_wait_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Whether the collector scanned, or waited for the sink, within `stall_ns` of `now_ns`.
    pub fn is_alive(&self, now_ns: u64, stall_ns: u64) -> bool {
        let last = self
            .last_scan_ns
            .load(Ordering::Relaxed)
            .max(self.sink_wait_ns.load(Ordering::Relaxed));
        now_ns.saturating_sub(last) <= stall_ns
    }

    pub fn scanned(&self, now_ns: u64) {
        self.scans.inc();
        self.last_scan_ns.store(now_ns, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    fn render(&self) -> String {
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

pub fn reason_label(reason: Reason) -> &'static str {
    match reason {
        Reason::ActiveTimeout => "active_timeout",
        Reason::IdleTimeout => "idle_timeout",
        Reason::TcpClose => "tcp_close",
        Reason::TablePressure => "table_pressure",
        Reason::AgentShutdown => "agent_shutdown",
    }
}

/// The HTTP endpoints. `stall_ns`: how long without a scan makes `/livez` fail.
pub fn router(metrics: Arc<Metrics>, stall_ns: u64) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State((m, _)): State<(Arc<Metrics>, u64)>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.render(),
                )
            }),
        )
        .route(
            "/livez",
            get(|State((m, stall)): State<(Arc<Metrics>, u64)>| async move {
                if !m.is_alive(WallClock::kernel_now(), stall) {
                    (StatusCode::SERVICE_UNAVAILABLE, "collector stalled\n").into_response()
                } else {
                    (StatusCode::OK, "ok\n").into_response()
                }
            }),
        )
        .route(
            "/readyz",
            get(|State((m, _)): State<(Arc<Metrics>, u64)>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
                }
            }),
        )
        .with_state((metrics, stall_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_advance_by_difference() {
        let metrics = Metrics::new();
        metrics.observe_kernel_counters(&[5, 2, 7, 1, 0, 0]);
        metrics.observe_kernel_counters(&[8, 2, 7, 1, 3, 4]);
        let text = metrics.render();
        assert!(
            text.contains("mermin_agent_kernel_overflow_packets_total 8\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "mermin_agent_kernel_dropped_packets_total{reason=\"overflow_ring_full\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "mermin_agent_kernel_dropped_packets_total{reason=\"no_flow_table\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("mermin_agent_kernel_skipped_packets_total{reason=\"non_ip\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("mermin_agent_kernel_connections_merged_total 4\n"),
            "{text}"
        );
    }
}
