//! Mutual TLS on the aggregator's admin API and agent endpoint, with certificates made here by
//! rcgen: a valid client certificate is accepted; none, an expired one and one from another CA
//! are refused (exit 3, the reason counted); a server certificate rotated on disk is what new
//! connections get, without a restart; with a CA of the operators' own, an agent's certificate
//! opens the agent endpoint and not the admin API.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use certs::Ca;
use mermin_aggregator::{
    export::ExportConfig,
    metrics::Metrics,
    pipeline::{Aggregator, AggregatorConfig, ServerTlsConfig},
    tls::TlsFiles,
};
use mermin_protocol::agent::v1::{
    AgentMessage, Hello, agent_message, agent_service_client::AgentServiceClient,
    aggregator_message,
};

use mermin_test_support::certs;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A certificate and key issued by `ca`, written to `<name>.crt` and `<name>.key`: their paths.
fn issue(dir: &Path, ca: &Ca, name: &str, expired: bool) -> (String, String) {
    let (cert, key) = ca.issue(expired);
    (
        write(dir, &format!("{name}.crt"), &cert),
        write(dir, &format!("{name}.key"), &key),
    )
}

/// The server's files, all from `ca` (its certificate, and the CA clients must chain to), and
/// the CA's own file (what clients trust the server by).
fn server_files(dir: &Path, ca: &Ca) -> (String, TlsFiles) {
    let ca_file = write(dir, "ca.crt", &ca.pem());
    let (cert, key) = issue(dir, ca, "tls", false);
    let files = TlsFiles {
        cert: cert.into(),
        key: key.into(),
        client_ca: ca_file.clone().into(),
    };
    (ca_file, files)
}

/// An aggregator on loopback serving mutual TLS with `files` (checked for changes every
/// 100 ms), its admin API with `admin_client_ca`'s clients alone when given.
async fn start(d: &Path, files: TlsFiles, admin_client_ca: Option<PathBuf>) -> Aggregator {
    Aggregator::start(AggregatorConfig {
        tls: Some(ServerTlsConfig {
            files,
            reload_interval: Duration::from_millis(100),
        }),
        admin_client_ca,
        ..AggregatorConfig::loopback(d.join("data"), ExportConfig::new("http://127.0.0.1:9"))
    })
    .await
    .unwrap()
}

/// A refused client: exit 3, and an error that names the endpoint and says why.
fn assert_refused((code, stderr): (i32, String), endpoint: &str) {
    assert_eq!(code, 3, "{stderr}");
    let prefix = format!("error: cannot reach {endpoint}: transport error: ");
    assert!(stderr.starts_with(&prefix), "{stderr}");
    assert!(
        stderr.ends_with(
            " (over TLS: the aggregator refuses a client without a certificate it trusts)\n"
        ),
        "{stderr}"
    );
}

/// Every refused handshake, whatever the reason.
fn all_failures(metrics: &Metrics) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|line| line.starts_with("mermin_aggregator_tls_handshake_failures_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn failures(metrics: &Metrics, endpoint: &str, reason: &str) -> u64 {
    let series = format!(
        "mermin_aggregator_tls_handshake_failures_total{{endpoint=\"{endpoint}\",reason=\"{reason}\"}} "
    );
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0)
}

/// `mermin status` over TLS: exit code and standard error.
async fn status(endpoint: &str, ca: &str, client: Option<(&str, &str)>) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mermin"));
    command.args([
        "--endpoint",
        endpoint,
        "--ca",
        ca,
        "--server-name",
        "localhost",
    ]);
    if let Some((cert, key)) = client {
        command.args(["--cert", cert, "--key", key]);
    }
    command.arg("status");
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// An agent's Hello over `channel` is answered with a Welcome.
async fn assert_welcomed(channel: tonic::transport::Channel) {
    let hello = AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            protocol_version: 1,
            node_name: "node-a".into(),
            agent_version: "test".into(),
            boot_id: vec![7; 16],
        })),
    };
    let mut answers = AgentServiceClient::new(channel)
        .stream(tokio_stream::iter([hello]))
        .await
        .unwrap()
        .into_inner();
    let welcome = answers.message().await.unwrap().unwrap().message;
    assert!(
        matches!(welcome, Some(aggregator_message::Message::Welcome(_))),
        "{welcome:?}"
    );
}

#[tokio::test]
async fn only_clients_with_a_valid_certificate_get_in_and_the_server_certificate_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, other_ca) = (Ca::new("mermin test CA"), Ca::new("another CA"));
    let (ca_file, files) = server_files(d, &ca);
    let other_ca_file = write(d, "other-ca.crt", &other_ca.pem());
    let valid = issue(d, &ca, "client", false);
    let expired = issue(d, &ca, "expired", true);
    let foreign = issue(d, &other_ca, "foreign", false);

    let aggregator = start(d, files.clone(), None).await;
    let metrics: Arc<Metrics> = aggregator.metrics.clone();
    let endpoint = format!("https://127.0.0.1:{}", aggregator.admin_addr.port());
    let pair = |p: &(String, String)| (p.0.clone(), p.1.clone());

    let (valid_cert, valid_key) = pair(&valid);
    assert_eq!(
        status(&endpoint, &ca_file, Some((&valid_cert, &valid_key))).await,
        (0, String::new())
    );
    // The files ask for TLS even with an http:// endpoint (the default one is): never plaintext.
    let plain = endpoint.replacen("https://", "http://", 1);
    assert_eq!(
        status(&plain, &ca_file, Some((&valid_cert, &valid_key))).await,
        (0, String::new())
    );

    // Each refused client's channel connects, is closed by the refusal, and reconnects once
    // for the call: one or two handshakes, each counted under its reason and no other.
    assert_refused(status(&endpoint, &ca_file, None).await, &endpoint);
    let (cert, key) = pair(&expired);
    assert_refused(
        status(&endpoint, &ca_file, Some((&cert, &key))).await,
        &endpoint,
    );
    let (cert, key) = pair(&foreign);
    assert_refused(
        status(&endpoint, &ca_file, Some((&cert, &key))).await,
        &endpoint,
    );
    let counted: Vec<u64> = [
        "no_client_certificate",
        "expired_certificate",
        "unknown_issuer",
    ]
    .into_iter()
    .map(|reason| failures(&metrics, "admin", reason))
    .collect();
    assert!(counted.iter().all(|n| (1..=2).contains(n)), "{counted:?}");
    assert_eq!(all_failures(&metrics), counted.iter().sum::<u64>());

    // The agent endpoint: the same server certificate and client CA.
    let agents = format!("https://127.0.0.1:{}", aggregator.local_addr.port());
    let tls = |cert: &str, key: &str| {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .domain_name("localhost")
    };
    let agent_channel = |config| async {
        tonic::transport::Endpoint::from_shared(agents.clone())
            .unwrap()
            .tls_config(config)
            .unwrap()
            .connect()
            .await
    };
    let channel = agent_channel(tls(
        &std::fs::read_to_string(&valid.0).unwrap(),
        &std::fs::read_to_string(&valid.1).unwrap(),
    ))
    .await
    .unwrap();
    assert_welcomed(channel).await;
    // A foreign certificate is refused in the handshake; over TLS 1.3 the client learns it on
    // its first read, so it opens a stream to see the refusal.
    let refused = match agent_channel(tls(
        &std::fs::read_to_string(&foreign.0).unwrap(),
        &std::fs::read_to_string(&foreign.1).unwrap(),
    ))
    .await
    {
        Err(_) => true,
        Ok(channel) => AgentServiceClient::new(channel)
            .stream(tokio_stream::empty())
            .await
            .is_err(),
    };
    assert!(refused, "a foreign certificate is refused");
    let counted = failures(&metrics, "agents", "unknown_issuer");
    assert!((1..=2).contains(&counted), "{counted}");

    // Rotation: a server certificate from the other CA, written over the files.
    assert_eq!(
        status(&endpoint, &other_ca_file, Some((&valid_cert, &valid_key)))
            .await
            .0,
        3,
        "before the rotation the server's certificate is not the other CA's"
    );
    let (rotated_cert, rotated_key) = other_ca.issue(false);
    std::fs::write(&files.key, rotated_key).unwrap();
    std::fs::write(&files.cert, rotated_cert).unwrap();
    let mut attempts = 0;
    while status(&endpoint, &other_ca_file, Some((&valid_cert, &valid_key)))
        .await
        .0
        != 0
    {
        attempts += 1;
        assert!(
            attempts < 50,
            "the rotated certificate not served within 50 tries"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status(&endpoint, &ca_file, Some((&valid_cert, &valid_key)))
            .await
            .0,
        3,
        "the old certificate is no longer served"
    );
    aggregator.shutdown().await;
}

/// With a CA of the operators' own (`tls { admin_client_ca_file }`), the admin API takes only
/// their certificates: an agent's, which the agent endpoint still takes, is refused there (a
/// node's key must not drain or reshape the cluster), counted as an unknown issuer.
#[tokio::test]
async fn an_agents_certificate_does_not_open_the_admin_api_when_operators_have_their_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (agents_ca, operators_ca) = (Ca::new("agents CA"), Ca::new("operators CA"));
    let (ca_file, files) = server_files(d, &agents_ca);
    let agent = issue(d, &agents_ca, "agent", false);
    let operator = issue(d, &operators_ca, "operator", false);
    let operators_ca_file = write(d, "operators-ca.crt", &operators_ca.pem());
    let aggregator = start(d, files, Some(operators_ca_file.into())).await;
    let admin = format!("https://127.0.0.1:{}", aggregator.admin_addr.port());

    assert_eq!(
        status(&admin, &ca_file, Some((&operator.0, &operator.1))).await,
        (0, String::new())
    );
    assert_refused(
        status(&admin, &ca_file, Some((&agent.0, &agent.1))).await,
        &admin,
    );
    let refused = failures(&aggregator.metrics, "admin", "unknown_issuer");
    assert!((1..=2).contains(&refused), "{refused}");

    // The agent endpoint takes the agent's certificate as before.
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://127.0.0.1:{}",
        aggregator.local_addr.port()
    ))
    .unwrap()
    .tls_config(
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(agents_ca.pem()))
            .identity(tonic::transport::Identity::from_pem(
                std::fs::read_to_string(&agent.0).unwrap(),
                std::fs::read_to_string(&agent.1).unwrap(),
            ))
            .domain_name("localhost"),
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    assert_welcomed(channel).await;
    aggregator.shutdown().await;
}
