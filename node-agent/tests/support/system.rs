//! The whole system in one test: the aggregator in this process over real gRPC, exporting to an
//! in-process OTLP receiver, with both ends named from a static metadata file; the node agents
//! (started by the test in its namespaces) stream to it.

use std::time::{Duration, Instant};

use mermin_aggregator::{
    export::ExportConfig,
    ingest::IngestLimits,
    pipeline::{Aggregator, AggregatorConfig, MetadataConfig},
};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};

use super::{
    Agent,
    aggregator::left_to_export,
    otlp::{Receiver, serve},
};

/// Records per agent batch the aggregator takes here (agents send up to 4,096 by default).
pub const MAX_BATCH_RECORDS: u32 = 3;

pub struct System {
    pub runtime: tokio::runtime::Runtime,
    pub receiver: Receiver,
    pub data: tempfile::TempDir,
    pub aggregator: Aggregator,
}

impl System {
    /// Starts the aggregator (settle 1 s) with `endpoints` as its static metadata file. It takes
    /// at most [`MAX_BATCH_RECORDS`] records per batch (its Welcome says so), so the agents cut
    /// each scan into several batches and a connection's records arrive in different ones.
    pub fn start(endpoints: &str) -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let receiver = Receiver::default();
        let data = tempfile::tempdir().unwrap();
        let otlp = serve(&receiver, &runtime);
        let file = data.path().join("endpoints.hcl");
        std::fs::write(&file, endpoints).unwrap();
        let aggregator = runtime.block_on(async {
            Aggregator::start(AggregatorConfig {
                settle: Duration::from_secs(1),
                grace: Duration::from_secs(10),
                limits: IngestLimits {
                    max_batch_records: MAX_BATCH_RECORDS,
                    ..IngestLimits::default()
                },
                metadata: MetadataConfig {
                    static_file: Some(file),
                    ..MetadataConfig::default()
                },
                ..AggregatorConfig::loopback(
                    data.path().to_owned(),
                    ExportConfig::new(format!("http://{otlp}")),
                )
            })
            .await
            .unwrap()
        });
        System {
            runtime,
            receiver,
            data,
            aggregator,
        }
    }

    /// The arguments of an agent of node `node` streaming here, with short close and idle
    /// timeouts.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        [
            "--aggregator",
            &format!("http://{}", self.aggregator.local_addr),
            "--node-name",
            node,
            "--tcp-close-timeout",
            "1s",
            "--udp-idle-timeout",
            "1s",
            "--icmp-idle-timeout",
            "1s",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The CLIENT spans received so far.
    pub fn client_spans(&self) -> Vec<Span> {
        self.receiver
            .spans_with_service()
            .into_iter()
            .filter(|(_, s)| s.kind == SpanKind::Client as i32)
            .map(|(_, s)| s)
            .collect()
    }

    /// Waits (bounded) until `count` CLIENT spans arrived.
    pub fn wait_for_clients(&self, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.client_spans().len() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the agents and the aggregator (each emitting what it held) and checks that nothing
    /// is left to export — so nothing more could arrive; returns every span received.
    pub fn stop(self, agents: Vec<Agent>) -> Vec<(String, Span)> {
        for agent in agents {
            agent.stop();
        }
        self.runtime.block_on(self.aggregator.shutdown());
        assert_eq!(
            left_to_export(self.data.path()),
            0,
            "spans still queued after the stop"
        );
        self.receiver.spans_with_service()
    }
}
