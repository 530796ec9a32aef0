//! The admin port over real gRPC on loopback, against the whole aggregator (real sled store):
//! health and reflection answer, the status shows the single-replica cluster, the agents view
//! shows each connected agent's sequence, the observe stream delivers emitted flows, and the
//! cluster operations are refused as not configured.

use std::time::Duration;

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig},
};
use mermin_protocol::admin::v1::{
    AgentsRequest, DrainRequest, ObserveRequest, Role, StatusRequest,
    admin_service_client::AdminServiceClient,
};
use support::{closed_connection, connect, record};
use tonic::{Code, transport::Channel};

use mermin_test_support as support;

async fn start(dir: &std::path::Path) -> Aggregator {
    Aggregator::start(AggregatorConfig {
        settle: Duration::from_millis(100),
        // Nothing listens there: spans stay in the outbox.
        ..AggregatorConfig::loopback(dir.to_owned(), ExportConfig::new("http://127.0.0.1:9"))
    })
    .await
    .unwrap()
}

async fn admin(aggregator: &Aggregator) -> AdminServiceClient<Channel> {
    AdminServiceClient::connect(format!("http://{}", aggregator.admin_addr))
        .await
        .unwrap()
}

#[tokio::test]
async fn health_and_reflection_answer_on_the_admin_port() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(dir.path()).await;
    let url = format!("http://{}", aggregator.admin_addr);
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "mermin.admin.v1.AdminService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1, "SERVING");

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "mermin.admin.v1.AdminService"
        ]
    );
    aggregator.shutdown().await;
}

#[tokio::test]
async fn status_agents_and_observe_show_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(dir.path()).await;
    let mut client = admin(&aggregator).await;

    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.data_dir, dir.path().display().to_string());
    assert_eq!(status.store_write_failure, "");
    assert_eq!(status.shard_count, 8);
    let cluster = status.cluster.unwrap();
    let me = aggregator.local_addr.to_string();
    assert_eq!(cluster.self_id, me);
    assert_eq!(cluster.members.len(), 1);
    assert_eq!(cluster.members[0].leader_of_shards, 8);
    assert_eq!(cluster.shards.len(), 8);
    for (index, shard) in cluster.shards.iter().enumerate() {
        assert_eq!(
            (shard.shard, &shard.leader, shard.term),
            (index as u32, &me, 0)
        );
        assert_eq!(shard.replicas[0].role(), Role::Leader);
    }
    // The loopback configuration watches no Kubernetes API and loads no static file.
    let metadata = status.metadata.unwrap();
    assert_eq!(
        (
            metadata.kubernetes,
            metadata.static_file,
            metadata.kinds.len()
        ),
        (false, false, 0)
    );

    let mut live = client
        .observe(ObserveRequest {
            follow: true,
            node: vec!["node-a".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut a = connect(aggregator.local_addr).await;
    a.hello("node-a", [1; 16]).await;
    assert_eq!(a.welcome().await, 0);
    a.batch(1, closed_connection(40_001)).await;
    assert_eq!(a.ack().await, 1);
    let mut b = connect(aggregator.local_addr).await;
    b.hello("node-b", [2; 16]).await;
    assert_eq!(b.welcome().await, 0);
    for sequence in 1..=3 {
        b.batch(sequence, vec![record("node-b", 1)]).await;
        assert_eq!(b.ack().await, sequence);
    }

    let agents = client
        .agents(AgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let seen: Vec<(&str, &str, u64, u64, u64)> = agents
        .iter()
        .map(|a| {
            (
                a.node.as_str(),
                a.boot_id.as_str(),
                a.last_acked_sequence,
                a.records_accepted,
                a.reconnects,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("node-a", "01010101010101010101010101010101", 1, 2, 0),
            ("node-b", "02020202020202020202020202020202", 3, 3, 0)
        ]
    );

    // The closed connection is emitted after the settle time (bounded wait).
    let flow = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .expect("a flow within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            flow.sent_bytes,
            flow.received_bytes,
            flow.server.unwrap().port
        ),
        (9_000, 48_000, 443)
    );
    aggregator.shutdown().await;
}

#[tokio::test]
async fn cluster_operations_are_refused_without_replication() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(dir.path()).await;
    let status = admin(&aggregator)
        .await
        .drain(DrainRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "replication is not configured: this aggregator is a single replica"
    );
    aggregator.shutdown().await;
}
