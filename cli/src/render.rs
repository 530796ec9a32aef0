//! What `mermin` prints: aligned tables for people, or the admin API's answers as JSON or YAML
//! (their protobuf field names; addresses as text, enums by name). Flows are printed with the
//! shared one-line form ([`mermin_protocol::display::flow_line`]).

use std::io::IsTerminal as _;

use mermin_protocol::{
    admin::v1::{AgentsResponse, ObservedFlow, QueuesResponse, ReasonCount, StatusResponse},
    display::{bytes, flow_line},
};
use serde::Serialize;

use crate::args::Output;

pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// `value` as pretty JSON or YAML; `table` otherwise.
fn structured(
    value: &impl Serialize,
    out: Output,
    table: impl FnOnce() -> String,
) -> Result<String, String> {
    match out {
        Output::Table => Ok(table()),
        Output::Json => serde_json::to_string_pretty(value)
            .map(|json| json + "\n")
            .map_err(|e| e.to_string()),
        Output::Yaml => serde_saphyr::to_string(value).map_err(|e| e.to_string()),
    }
}

/// Columns separated by two spaces, each as wide as its widest cell; no trailing spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut text = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if index > 0 {
                line.push_str("  ");
            }
            line.push_str(&format!("{cell:<width$}"));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `45s`, `12m`, `3h`, `2d`: the largest whole unit.
fn age(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86400),
    }
}

fn reasons(counts: &[ReasonCount]) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|c| format!("{} {}", c.reason, c.count))
        .collect();
    counts.join(", ")
}

pub fn status(status: &StatusResponse, out: Output) -> Result<String, String> {
    structured(status, out, || {
        let store = match status.store_write_failure.as_str() {
            "" => "writing".to_owned(),
            why => format!("cannot write: {why}"),
        };
        let cluster = status.cluster.clone().unwrap_or_default();
        let metadata = status.metadata.clone().unwrap_or_default();
        let sources = match (metadata.kubernetes, metadata.static_file) {
            (true, true) => "Kubernetes API and static file",
            (true, false) => "Kubernetes API",
            (false, true) => "static file",
            (false, false) => "none (flows carry addresses only)",
        };
        let mut text = table(
            &["FIELD", "VALUE"],
            &[
                vec!["version".into(), status.version.clone()],
                vec!["uptime".into(), age(status.uptime_seconds)],
                vec!["data dir".into(), status.data_dir.clone()],
                vec!["store".into(), store],
                vec!["shards".into(), status.shard_count.to_string()],
                vec!["this replica".into(), cluster.self_id.clone()],
                vec!["metadata".into(), sources.into()],
            ],
        );
        text.push('\n');
        let members: Vec<Vec<String>> = cluster
            .members
            .iter()
            .map(|m| {
                vec![
                    m.id.clone(),
                    m.address.clone(),
                    m.leader_of_shards.to_string(),
                ]
            })
            .collect();
        text.push_str(&table(&["MEMBER", "ADDRESS", "LEADS SHARDS"], &members));
        if !metadata.kinds.is_empty() {
            // Ages by the aggregator's clock (its start + uptime), not this machine's.
            let now = status.started_unix_nanos / 1_000_000_000 + status.uptime_seconds;
            let kinds: Vec<Vec<String>> = metadata
                .kinds
                .iter()
                .map(|k| {
                    vec![
                        k.kind.clone(),
                        if k.synced { "yes" } else { "no" }.into(),
                        k.events.to_string(),
                        k.watch_errors.to_string(),
                        k.skipped_objects.to_string(),
                        match k.last_event_unix_seconds {
                            0 => "never".into(),
                            t => format!("{} ago", age(now.saturating_sub(t))),
                        },
                    ]
                })
                .collect();
            text.push('\n');
            text.push_str(&table(
                &[
                    "KIND",
                    "SYNCED",
                    "EVENTS",
                    "WATCH ERRORS",
                    "SKIPPED",
                    "LAST EVENT",
                ],
                &kinds,
            ));
        }
        text
    })
}

pub fn agents(agents: &AgentsResponse, out: Output) -> Result<String, String> {
    structured(agents, out, || {
        let rows: Vec<Vec<String>> = agents
            .agents
            .iter()
            .map(|a| {
                vec![
                    a.node.clone(),
                    a.agent_version.clone(),
                    a.boot_id.clone(),
                    a.last_acked_sequence.to_string(),
                    age(a.lag_millis / 1000),
                    format!("{:.1}", a.records_per_second),
                    a.records_accepted.to_string(),
                    a.reconnects.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "NODE",
                "VERSION",
                "BOOT ID",
                "LAST ACK",
                "LAG",
                "RECORDS/S",
                "RECORDS",
                "RECONNECTS",
            ],
            &rows,
        )
    })
}

/// One row per shard: its placement (from the status) and its load (from the queues).
#[derive(Serialize)]
struct ShardRow {
    shard: u32,
    leader: String,
    term: u64,
    commit_lag: u64,
    mailbox_parts: u64,
    connections: u64,
}

pub fn shards(
    status: &StatusResponse,
    queues: &QueuesResponse,
    out: Output,
) -> Result<String, String> {
    let placements = status.cluster.clone().unwrap_or_default().shards;
    let rows: Vec<ShardRow> = placements
        .into_iter()
        .map(|p| {
            let queue = queues.shards.iter().find(|q| q.shard == p.shard);
            ShardRow {
                shard: p.shard,
                leader: p.leader,
                term: p.term,
                commit_lag: p.commit_lag,
                mailbox_parts: queue.map_or(0, |q| q.mailbox_parts),
                connections: queue.map_or(0, |q| q.connections),
            }
        })
        .collect();
    #[derive(Serialize)]
    struct Shards<'a> {
        shards: &'a [ShardRow],
    }
    structured(&Shards { shards: &rows }, out, || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.shard.to_string(),
                    r.leader.clone(),
                    r.term.to_string(),
                    r.commit_lag.to_string(),
                    r.mailbox_parts.to_string(),
                    r.connections.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "SHARD",
                "LEADER",
                "TERM",
                "COMMIT LAG",
                "MAILBOX",
                "CONNECTIONS",
            ],
            &cells,
        )
    })
}

pub fn queues(queues: &QueuesResponse, out: Output) -> Result<String, String> {
    structured(queues, out, || {
        let outbox = queues.outbox.unwrap_or_default();
        let mailboxes: Vec<String> = queues
            .shards
            .iter()
            .map(|s| s.mailbox_parts.to_string())
            .collect();
        let oldest = match outbox.oldest_span_end_unix_nanos {
            0 => "-".to_owned(),
            _ => format!("{} ago", age(outbox.oldest_age_seconds)),
        };
        table(
            &["QUEUE", "STATE"],
            &[
                vec!["shard mailboxes".into(), mailboxes.join(" ")],
                vec![
                    "outbox".into(),
                    format!(
                        "{} requests, {} of {}",
                        outbox.requests,
                        bytes(outbox.bytes),
                        bytes(outbox.max_bytes)
                    ),
                ],
                vec!["outbox oldest span".into(), oldest],
                vec!["export retries".into(), queues.export_retries.to_string()],
                vec!["spans rejected".into(), reasons(&queues.spans_rejected)],
                vec!["spans dropped".into(), reasons(&queues.spans_dropped)],
                vec!["observe dropped".into(), reasons(&queues.observe_dropped)],
            ],
        )
    })
}

/// One flow: its line (coloured with `colour`), a JSON line, or a YAML document.
pub fn flow(flow: &ObservedFlow, out: Output, colour: bool) -> Result<String, String> {
    match out {
        Output::Table => Ok(flow_line(flow, colour) + "\n"),
        Output::Json => serde_json::to_string(flow)
            .map(|json| json + "\n")
            .map_err(|e| e.to_string()),
        Output::Yaml => serde_saphyr::to_string(flow)
            .map(|yaml| format!("---\n{yaml}"))
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use mermin_protocol::admin::v1::{MetadataKind, MetadataSync};

    use super::*;

    #[test]
    fn the_status_names_the_metadata_sources_and_each_kinds_sync() {
        let kind = |kind: &str, synced, events, last| MetadataKind {
            kind: kind.into(),
            synced,
            events,
            watch_errors: u64::from(!synced),
            skipped_objects: 0,
            last_event_unix_seconds: last,
        };
        let status = StatusResponse {
            version: "0.1.0".into(),
            uptime_seconds: 100,
            started_unix_nanos: 1_000 * 1_000_000_000,
            data_dir: "/data".into(),
            shard_count: 8,
            metadata: Some(MetadataSync {
                kubernetes: true,
                static_file: false,
                kinds: vec![kind("Pod", true, 12, 1_095), kind("Node", false, 0, 0)],
            }),
            ..StatusResponse::default()
        };
        let text = status_text(&status);
        let kinds = text.split("\n\n").last().unwrap();
        assert_eq!(
            kinds,
            "KIND  SYNCED  EVENTS  WATCH ERRORS  SKIPPED  LAST EVENT\n\
             Pod   yes     12      0             0        5s ago\n\
             Node  no      0       1             0        never\n"
        );
        assert!(text.contains("metadata      Kubernetes API\n"), "{text}");
        let none = status_text(&StatusResponse::default());
        assert!(
            none.contains("metadata      none (flows carry addresses only)\n"),
            "{none}"
        );
        assert!(!none.contains("KIND"), "no watched kinds, no table: {none}");
    }

    fn status_text(response: &StatusResponse) -> String {
        status(response, Output::Table).unwrap()
    }

    #[test]
    fn tables_align_and_ages_use_the_largest_unit() {
        assert_eq!(
            table(
                &["A", "LONG HEADER"],
                &[vec!["wide cell".into(), "x".into()]]
            ),
            "A          LONG HEADER\nwide cell  x\n"
        );
        let ages: Vec<String> = [0, 59, 60, 3599, 3600, 86_400].map(age).to_vec();
        assert_eq!(ages, ["0s", "59s", "1m", "59m", "1h", "1d"]);
    }
}
