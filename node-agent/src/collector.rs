//! The collector loop: every scan interval it swaps the kernel flow tables, feeds what the retired
//! table counted (and any overflow packets) to the [`FlowTracker`], turns due reports into
//! [`FlowRecord`]s (with their connections' address translations, read from conntrack just
//! before) and hands them to the sink. It owns the tracker; nothing else touches it.
//!
//! On stop (after the watcher has detached the programs) it drains both tables and the overflow
//! ring one last time and reports every flow it still holds with `AGENT_SHUTDOWN`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use mermin_protocol::flow::v1::{Direction, EndReason, FlowRecord, Translation};
use node_common::{FlowKey, FlowStats, direction};

use crate::{
    capture::{self, CaptureError, FlowTables, KernelCounters},
    clock::WallClock,
    flows::{FlowTracker, Reason, Report},
    interfaces::{InterfaceNames, NamesNow, wait_readable},
    metrics::Metrics,
    sink::{RecordSink, SinkError},
    translations::Translations,
};

pub struct Collector {
    pub tables: FlowTables,
    pub overflow: RingBuf<MapData>,
    pub counters: KernelCounters,
    pub tracker: FlowTracker,
    pub sink: Box<dyn RecordSink>,
    pub records: RecordBuilder,
    /// The records of a scan, built in place: their strings and addresses keep their room from
    /// one scan to the next, so building a record allocates nothing.
    pub built: Vec<FlowRecord>,
    /// `None` where conntrack cannot be read (records then carry no translation).
    pub translations: Option<Translations>,
    pub metrics: Arc<Metrics>,
    pub scan_interval: Duration,
    pub clock: WallClock,
}

impl Collector {
    /// Runs until `stop` is set, then drains everything and returns.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), CaptureError> {
        let mut drained: Vec<(FlowKey, FlowStats)> = Vec::new();
        let mut reports: Vec<Report> = Vec::new();
        let mut next_scan = Instant::now() + self.scan_interval;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next_scan {
                // Overflow packets are read as they come, so the ring never fills while we wait.
                let wait = (next_scan - now).min(Duration::from_millis(100));
                if wait_readable(&self.overflow, wait).unwrap_or(false) {
                    self.read_overflow(&mut reports);
                }
                continue;
            }
            next_scan += self.scan_interval;
            if next_scan < now {
                next_scan = now + self.scan_interval;
            }
            if let Err(err) = self.scan(&mut drained, &mut reports) {
                // Tried again at the next scan. One that keeps failing records no scan, so the
                // liveness probe fails and the agent is restarted; what the tracker holds is
                // reported meanwhile all the same.
                tracing::error!(%err, "scan failed; trying again at the next one");
            }
            self.tracker.evict(WallClock::kernel_now(), &mut reports);
            self.emit(&mut reports);
        }
        // The programs are detached: one swap retires the active table, a second one the other.
        // Every flow still held is reported even if a last scan fails.
        let last_scans = self
            .scan(&mut drained, &mut reports)
            .and_then(|()| self.scan(&mut drained, &mut reports));
        self.tracker.flush(&mut reports);
        self.emit(&mut reports);
        last_scans
    }

    fn scan(
        &mut self,
        drained: &mut Vec<(FlowKey, FlowStats)>,
        reports: &mut Vec<Report>,
    ) -> Result<(), CaptureError> {
        drained.clear();
        let swapped = self.tables.swap_and_drain(drained);
        // What was drained before a failure is taken all the same (it is out of the kernel).
        self.tracker.absorb_interval(drained, reports);
        self.read_overflow(reports);
        let entries = swapped?;
        self.metrics.observe_kernel_counters(&self.counters.read()?);
        self.metrics.kernel_table_entries.set(entries as i64);
        self.metrics.tracked_flows.set(self.tracker.len() as i64);
        self.metrics.scanned(WallClock::kernel_now());
        Ok(())
    }

    fn read_overflow(&mut self, reports: &mut Vec<Report>) {
        while let Some(item) = self.overflow.next() {
            match capture::decode_packet_event(&item) {
                Some(event) => self.tracker.absorb_packet(&event, reports),
                None => tracing::warn!(len = item.len(), "overflow record of unexpected size"),
            }
        }
    }

    fn emit(&mut self, reports: &mut Vec<Report>) {
        if reports.is_empty() {
            return;
        }
        self.clock.follow_steps();
        let now = WallClock::kernel_now();
        if let Some(translations) = &mut self.translations {
            translations.update(now);
        }
        let count = reports.len();
        if self.built.len() < count {
            self.built.resize_with(count, FlowRecord::default);
        }
        {
            let names = self.records.names.read();
            for (report, record) in reports.iter().zip(&mut self.built) {
                let translation = self
                    .translations
                    .as_mut()
                    .and_then(|t| t.lookup(&report.key, now));
                self.records
                    .build_into(report, &names, &self.clock, translation, record);
            }
        }
        match self.sink.send(&self.built[..count]) {
            Ok(()) => self.metrics.records_emitted(reports),
            Err(err) => {
                let lost = err.lost(count);
                tracing::error!(%err, records = lost, "sink failed; records dropped");
                let reason = match err {
                    SinkError::GaveUp { .. } => "sink_full_at_stop",
                    _ => "sink_error",
                };
                self.metrics
                    .records_dropped
                    .get_or_create(&crate::metrics::ReasonLabel { reason })
                    .inc_by(lost as u64);
            }
        }
        reports.clear();
    }
}

/// Turns tracker reports into protocol records: node and interface names, wall-clock times.
pub struct RecordBuilder {
    pub node_name: String,
    pub names: InterfaceNames,
}

impl RecordBuilder {
    /// Writes the record of `report` into `record`, reusing its strings' and addresses' room
    /// (`names`: the interface names as read for this scan).
    pub fn build_into(
        &self,
        report: &Report,
        names: &NamesNow<'_>,
        clock: &WallClock,
        translation: Option<Translation>,
        record: &mut FlowRecord,
    ) {
        let key = &report.key;
        let address_len = if key.ip_version == 4 { 4 } else { 16 };
        let set = |text: &mut String, value: &str| {
            text.clear();
            text.push_str(value);
        };
        let set_bytes = |bytes: &mut Vec<u8>, value: &[u8]| {
            bytes.clear();
            bytes.extend_from_slice(value);
        };
        set(&mut record.node_name, &self.node_name);
        set(
            &mut record.interface_name,
            names.get(key.ifindex).unwrap_or_default(),
        );
        set_bytes(&mut record.source_address, &key.src_addr[..address_len]);
        set_bytes(
            &mut record.destination_address,
            &key.dst_addr[..address_len],
        );
        record.interface_index = key.ifindex;
        record.direction = match key.direction {
            direction::INGRESS => Direction::Ingress,
            direction::EGRESS => Direction::Egress,
            _ => Direction::Unspecified,
        } as i32;
        record.source_port = u32::from(key.src_port);
        record.destination_port = u32::from(key.dst_port);
        record.ip_protocol = u32::from(key.protocol);
        record.icmp_type = u32::from(key.icmp_type);
        record.icmp_code = u32::from(key.icmp_code);
        record.delta_packets = report.delta_packets;
        record.delta_octets = report.delta_bytes;
        record.first_seen_unix_nanos = clock.unix_nanos(report.first_seen_ns);
        record.last_seen_unix_nanos = clock.unix_nanos(report.last_seen_ns);
        record.flow_start_unix_nanos = clock.unix_nanos_as_of(report.flow_start_ns);
        record.tcp_flags = report.tcp_flags;
        record.first_tcp_flags = report.first_tcp_flags;
        record.end_reason = end_reason(report.reason) as i32;
        record.record_sequence = report.sequence;
        record.translation = translation;
    }
}

fn end_reason(reason: Reason) -> EndReason {
    match reason {
        Reason::ActiveTimeout => EndReason::ActiveTimeout,
        Reason::IdleTimeout => EndReason::IdleTimeout,
        Reason::TcpClose => EndReason::TcpClose,
        Reason::TablePressure => EndReason::TablePressure,
        Reason::AgentShutdown => EndReason::AgentShutdown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_ipv4_record_with_wall_clock_times() {
        let key = FlowKey {
            src_addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port: 43210,
            dst_port: 443,
            ifindex: 7,
            ip_version: 4,
            protocol: 6,
            direction: direction::INGRESS,
            ..FlowKey::default()
        };
        let report = Report {
            key,
            reason: Reason::TcpClose,
            delta_packets: 12,
            delta_bytes: 3456,
            first_seen_ns: 100,
            last_seen_ns: 200,
            flow_start_ns: 50,
            tcp_flags: 0x1b,
            first_tcp_flags: 0x02,
            sequence: 4,
        };
        let builder = RecordBuilder {
            node_name: "node-a".into(),
            names: InterfaceNames::default(),
        };
        // Built over an IPv6 record of another interface: nothing of it stays.
        let mut record = FlowRecord {
            interface_name: "eth1".into(),
            source_address: vec![0xfd; 16],
            destination_address: vec![0xfd; 16],
            translation: Some(Translation::default()),
            ..FlowRecord::default()
        };
        let clock = WallClock::with_offset(1_000_000);
        builder.build_into(&report, &builder.names.read(), &clock, None, &mut record);
        assert_eq!(record.source_address, [192, 0, 2, 1]);
        assert_eq!(record.destination_address, [192, 0, 2, 2]);
        assert_eq!(record.direction, Direction::Ingress as i32);
        assert_eq!(record.end_reason, EndReason::TcpClose as i32);
        assert_eq!(record.first_seen_unix_nanos, 1_000_100);
        assert_eq!(record.last_seen_unix_nanos, 1_000_200);
        assert_eq!(record.flow_start_unix_nanos, 1_000_050);
        assert_eq!(record.record_sequence, 4);
        assert_eq!(record.node_name, "node-a");
        assert_eq!(record.interface_name, "");
        assert_eq!(record.translation, None);
    }
}
