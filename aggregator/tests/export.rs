//! The exporter against a real OTLP receiver on loopback, over gRPC (opentelemetry-proto's
//! generated TraceService) and over OTLP/HTTP, each case run with both: delivery in order, an
//! endpoint that is down and comes back, permanent rejects, an outbox that survives a restart,
//! the drop-oldest quota policy, and https endpoints (the CA given trusted and no other; a
//! client certificate for an endpoint that asks for one).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::Actor;
use mermin_aggregator::{
    export::{
        ExportConfig, ExportTls, Exporter, OtlpHeader, OtlpProtocol, OutboxChanged, outbox_entry,
    },
    metrics::Metrics,
    store::{SledStore, Store},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use support::{otlp::Receiver, reopen};
use tokio::net::TcpListener;
use tonic::Status;

use mermin_test_support as support;

/// An outbox entry holding one request with spans of these names.
fn request(names: &[&str]) -> Vec<u8> {
    outbox_entry(&ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: names
                    .iter()
                    .map(|n| Span {
                        name: (*n).into(),
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        ..Span::default()
                    })
                    .collect(),
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    })
}

/// The exporter actor, running in the test's actix system until the test ends.
struct Running {
    metrics: Arc<Metrics>,
}

/// Runs a test case once per OTLP transport, each in its own actix system.
macro_rules! over_both_protocols {
    ($case:ident) => {
        mod $case {
            #[actix::test]
            async fn grpc() {
                super::$case(mermin_aggregator::export::OtlpProtocol::Grpc).await
            }
            #[actix::test]
            async fn http() {
                super::$case(mermin_aggregator::export::OtlpProtocol::HttpProtobuf).await
            }
        }
    };
}

async fn serve(
    receiver: Receiver,
    listener: TcpListener,
    protocol: OtlpProtocol,
) -> tokio::task::JoinHandle<()> {
    match protocol {
        OtlpProtocol::Grpc => support::otlp::serve(receiver, listener).await,
        OtlpProtocol::HttpProtobuf => support::otlp::serve_http(receiver, listener).await,
    }
}

fn start_exporter(store: &Store, addr: SocketAddr, protocol: OtlpProtocol) -> Running {
    start_exporter_with(
        store,
        ExportConfig {
            protocol,
            ..ExportConfig::new(format!("http://{addr}"))
        },
    )
}

fn start_exporter_with(store: &Store, config: ExportConfig) -> Running {
    start_exporter_actor(store, config).0
}

fn start_exporter_actor(store: &Store, config: ExportConfig) -> (Running, actix::Addr<Exporter>) {
    let metrics = Arc::new(Metrics::new());
    let config = ExportConfig {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        ..config
    };
    let address = Exporter::new(store.clone(), config, metrics.clone())
        .unwrap()
        .start();
    (Running { metrics }, address)
}

/// Waits (at most 10 s) until the outbox is empty.
async fn drained(store: &Store) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.outbox_len() > 0 {
        assert!(Instant::now() < deadline, "outbox not drained within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn metric(metrics: &Metrics, series: &str) -> u64 {
    support::metric_value(&metrics.render(), series)
}

over_both_protocols!(an_endpoint_that_is_down_gets_everything_once_it_is_up);
async fn an_endpoint_that_is_down_gets_everything_once_it_is_up(protocol: OtlpProtocol) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    // Reserve a port, then leave it closed: the endpoint is down.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    for names in [&["a1", "a2"][..], &["b1"], &["c1", "c2", "c3"]] {
        store.outbox_push(&request(names)).await.unwrap();
    }
    let exporter = start_exporter(&store, addr, protocol);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&exporter.metrics, "mermin_aggregator_export_retries_total") < 3 {
        assert!(
            Instant::now() < deadline,
            "no retries while the endpoint is down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.outbox_len(),
        3,
        "nothing dropped while the endpoint is down"
    );

    let receiver = Receiver::default();
    let server = serve(
        receiver.clone(),
        TcpListener::bind(addr).await.unwrap(),
        protocol,
    )
    .await;
    drained(&store).await;
    assert_eq!(receiver.names(), ["a1", "a2", "b1", "c1", "c2", "c3"]);
    assert_eq!(
        metric(&exporter.metrics, "mermin_aggregator_spans_exported_total"),
        6
    );
    server.abort();
}

over_both_protocols!(transient_errors_retry_and_permanent_rejects_are_counted);
async fn transient_errors_retry_and_permanent_rejects_are_counted(protocol: OtlpProtocol) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    receiver.script.lock().unwrap().extend([
        Err(Status::unavailable("warming up")),
        Err(Status::resource_exhausted("slow down")),
        Err(Status::invalid_argument("span too large")),
        Ok(ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 1,
                error_message: "one span too old".into(),
            }),
        }),
    ]);
    let server = serve(receiver.clone(), listener, protocol).await;
    store
        .outbox_push(&request(&["refused1", "refused2"]))
        .await
        .unwrap();
    store
        .outbox_push(&request(&["p1", "p2", "p3"]))
        .await
        .unwrap();
    store.outbox_push(&request(&["last"])).await.unwrap();
    let exporter = start_exporter(&store, addr, protocol);
    drained(&store).await;
    // The first request was retried twice, then refused for good; the second partly accepted.
    assert_eq!(receiver.names(), ["p1", "p2", "p3", "last"]);
    let m = &exporter.metrics;
    assert_eq!(metric(m, "mermin_aggregator_export_retries_total"), 2);
    assert_eq!(
        metric(
            m,
            "mermin_aggregator_spans_rejected_total{reason=\"invalid_argument\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            m,
            "mermin_aggregator_spans_rejected_total{reason=\"partial_success\"}"
        ),
        1
    );
    assert_eq!(metric(m, "mermin_aggregator_spans_exported_total"), 3);
    server.abort();
}

over_both_protocols!(the_outbox_survives_a_restart);
async fn the_outbox_survives_a_restart(protocol: OtlpProtocol) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.outbox_push(&request(&["kept"])).await.unwrap();
    }
    let store = reopen(dir.path()).await;
    assert_eq!(store.outbox_len(), 1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let server = serve(receiver.clone(), listener, protocol).await;
    start_exporter(&store, addr, protocol);
    drained(&store).await;
    assert_eq!(receiver.names(), ["kept"]);
    server.abort();
}

#[test]
fn a_bad_endpoint_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let err = Exporter::new(
        store,
        ExportConfig::new("tempo:4317"),
        Arc::new(Metrics::new()),
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "invalid OTLP endpoint \"tempo:4317\": must start with http:// or https://"
    );
}

/// The drop-oldest policy: over quota, the oldest requests go first, and their spans are counted.
#[actix::test]
async fn over_quota_the_oldest_requests_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let requests = [
        request(&["old1", "old2"]),
        request(&["old3"]),
        request(&["new1"]),
        request(&["new2", "new3"]),
    ];
    for r in &requests {
        store.outbox_push(r).await.unwrap();
    }
    let total: u64 = requests.iter().map(|r| r.len() as u64).sum();
    assert_eq!(store.outbox_bytes(), total);
    let quota = (requests[2].len() + requests[3].len()) as u64;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let server = support::otlp::serve(receiver.clone(), listener).await;
    let exporter = start_exporter_with(
        &store,
        ExportConfig {
            drop_oldest_above_bytes: Some(quota),
            ..ExportConfig::new(format!("http://{addr}"))
        },
    );
    drained(&store).await;
    assert_eq!(receiver.names(), ["new1", "new2", "new3"]);
    assert_eq!(store.outbox_bytes(), 0);
    let m = &exporter.metrics;
    assert_eq!(
        metric(
            m,
            "mermin_aggregator_spans_dropped_total{reason=\"outbox_full\"}"
        ),
        3
    );
    assert_eq!(metric(m, "mermin_aggregator_spans_exported_total"), 3);
    server.abort();
}

/// Idle with an empty outbox, the exporter delivers what is queued once told — and only then:
/// an hour of paused (virtual) time passes without it looking at the outbox by itself.
#[actix::test]
async fn an_idle_exporter_delivers_when_told_the_outbox_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let server = support::otlp::serve(receiver.clone(), listener).await;
    // Paused, the clock moves only when every task waits: every timer due within the hour fires.
    tokio::time::pause();
    let (exporter, address) =
        start_exporter_actor(&store, ExportConfig::new(format!("http://{addr}")));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    store.outbox_push(&request(&["late"])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(store.outbox_len(), 1, "idle: nothing polls the outbox");
    tokio::time::resume();
    address.send(OutboxChanged).await.unwrap();
    drained(&store).await;
    assert_eq!(receiver.names(), ["late"]);
    assert_eq!(
        metric(&exporter.metrics, "mermin_aggregator_spans_exported_total"),
        1
    );
    server.abort();
}

/// A receiver behind a TLS front on loopback (see [`serve_over_tls`]).
struct TlsEndpoint {
    /// The https:// endpoint to reach it.
    url: String,
    /// What each connection's TLS handshake agreed on (ALPN).
    negotiated: support::otlp::Negotiated,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl TlsEndpoint {
    /// Checks that every connection agreed on the application protocol of `protocol` (gRPC
    /// needs HTTP/2; OTLP/HTTP speaks HTTP/1.1, for which hyper-rustls offers no ALPN), then
    /// stops the receiver and the front.
    fn check_alpn_and_stop(self, protocol: OtlpProtocol) {
        let expected: &[u8] = match protocol {
            OtlpProtocol::Grpc => b"h2",
            OtlpProtocol::HttpProtobuf => b"",
        };
        let negotiated = self.negotiated.lock().unwrap().clone();
        assert!(!negotiated.is_empty(), "no connection got through");
        assert!(
            negotiated.iter().all(|alpn| alpn == expected),
            "{negotiated:?}"
        );
        self.tasks.iter().for_each(|task| task.abort());
    }
}

/// A receiver behind a TLS front on loopback, its certificate for `localhost` signed by `ca`,
/// asking for a client certificate of `client_ca` if given.
async fn serve_over_tls(
    receiver: Receiver,
    protocol: OtlpProtocol,
    ca: &support::certs::Ca,
    client_ca: Option<&support::certs::Ca>,
) -> TlsEndpoint {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let server = serve(receiver, backend, protocol).await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = front.local_addr().unwrap().port();
    let (cert, key) = ca.issue(false);
    let client_ca = client_ca.map(support::certs::Ca::pem);
    let negotiated = support::otlp::Negotiated::default();
    let tls = support::otlp::serve_tls_front(
        front,
        backend_addr,
        &cert,
        &key,
        client_ca.as_deref(),
        negotiated.clone(),
    )
    .await;
    TlsEndpoint {
        url: format!("https://localhost:{port}"),
        negotiated,
        tasks: [server, tls],
    }
}

/// `pem` written to `name` in `dir`.
fn pem_file(dir: &tempfile::TempDir, name: &str, pem: String) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// Trusting only the CA `ca`, its certificate written in `dir`.
fn trusting(dir: &tempfile::TempDir, ca: &support::certs::Ca) -> ExportTls {
    ExportTls {
        ca_file: Some(pem_file(dir, "ca.pem", ca.pem())),
        client_cert_and_key: None,
    }
}

fn tls_exporter(
    store: &Store,
    endpoint: String,
    protocol: OtlpProtocol,
    tls: ExportTls,
) -> Running {
    start_exporter_with(
        store,
        ExportConfig {
            protocol,
            tls,
            ..ExportConfig::new(endpoint)
        },
    )
}

/// Waits (at most 10 s) until `exporter` retried three times, then checks that its one request
/// is still queued and that `receiver` got nothing.
async fn refused_every_time(exporter: &Running, store: &Store, receiver: &Receiver) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&exporter.metrics, "mermin_aggregator_export_retries_total") < 3 {
        assert!(Instant::now() < deadline, "no retries within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.outbox_len(), 1);
    assert_eq!(receiver.names(), Vec::<String>::new());
}

over_both_protocols!(an_https_endpoint_is_trusted_through_the_ca_given_and_no_other);
async fn an_https_endpoint_is_trusted_through_the_ca_given_and_no_other(protocol: OtlpProtocol) {
    let ca = support::certs::Ca::new("endpoint CA");
    let receiver = Receiver::default();
    let endpoint = serve_over_tls(receiver.clone(), protocol, &ca, None).await;

    // Another CA: every handshake is refused, retried, and nothing leaves the outbox.
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.outbox_push(&request(&["a1", "a2"])).await.unwrap();
    let other = support::certs::Ca::new("some other CA");
    let files = tempfile::tempdir().unwrap();
    let refused = tls_exporter(
        &store,
        endpoint.url.clone(),
        protocol,
        trusting(&files, &other),
    );
    refused_every_time(&refused, &store, &receiver).await;
    drop(store);

    // The endpoint's CA: delivered.
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.outbox_push(&request(&["a1", "a2"])).await.unwrap();
    store.outbox_push(&request(&["b1"])).await.unwrap();
    let trusted = tls_exporter(
        &store,
        endpoint.url.clone(),
        protocol,
        trusting(&files, &ca),
    );
    drained(&store).await;
    assert_eq!(receiver.names(), ["a1", "a2", "b1"]);
    assert_eq!(
        metric(&trusted.metrics, "mermin_aggregator_spans_exported_total"),
        3
    );
    endpoint.check_alpn_and_stop(protocol);
}

over_both_protocols!(an_endpoint_that_asks_for_a_client_certificate_gets_the_one_given);
async fn an_endpoint_that_asks_for_a_client_certificate_gets_the_one_given(protocol: OtlpProtocol) {
    let ca = support::certs::Ca::new("endpoint CA");
    let clients = support::certs::Ca::new("client CA");
    let receiver = Receiver::default();
    let endpoint = serve_over_tls(receiver.clone(), protocol, &ca, Some(&clients)).await;
    let files = tempfile::tempdir().unwrap();

    // No client certificate: refused, retried, nothing delivered.
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.outbox_push(&request(&["m1"])).await.unwrap();
    let refused = tls_exporter(
        &store,
        endpoint.url.clone(),
        protocol,
        trusting(&files, &ca),
    );
    refused_every_time(&refused, &store, &receiver).await;
    drop(store);

    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.outbox_push(&request(&["m1"])).await.unwrap();
    let (cert, key) = clients.issue_for(&["mermin-aggregator"], false);
    let exporter = tls_exporter(
        &store,
        endpoint.url.clone(),
        protocol,
        ExportTls {
            client_cert_and_key: Some((
                pem_file(&files, "client.pem", cert),
                pem_file(&files, "client.key", key),
            )),
            ..trusting(&files, &ca)
        },
    );
    drained(&store).await;
    assert_eq!(receiver.names(), ["m1"]);
    assert_eq!(
        metric(&exporter.metrics, "mermin_aggregator_spans_exported_total"),
        1
    );
    endpoint.check_alpn_and_stop(protocol);
}

over_both_protocols!(every_request_carries_the_headers_configured);
async fn every_request_carries_the_headers_configured(protocol: OtlpProtocol) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let server = serve(receiver.clone(), listener, protocol).await;
    for names in [&["h1"][..], &["h2"]] {
        store.outbox_push(&request(names)).await.unwrap();
    }
    let headers: Vec<OtlpHeader> = ["X-Scope-OrgID=tenant-a", "Authorization=Bearer s3cr3t"]
        .iter()
        .map(|text| text.parse().unwrap())
        .collect();
    let _exporter = start_exporter_with(
        &store,
        ExportConfig {
            protocol,
            headers,
            ..ExportConfig::new(format!("http://{addr}"))
        },
    );
    drained(&store).await;
    assert_eq!(receiver.names(), ["h1", "h2"]);
    let seen: Vec<(String, String)> = receiver
        .headers
        .lock()
        .unwrap()
        .iter()
        .map(|headers| {
            let get = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
            (get("x-scope-orgid"), get("authorization"))
        })
        .collect();
    let expected = ("tenant-a".to_owned(), "Bearer s3cr3t".to_owned());
    assert_eq!(seen, [expected.clone(), expected]);
    server.abort();
}

#[actix::test]
async fn tls_files_that_cannot_be_read_or_parsed_stop_the_exporter_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let not_pem = pem_file(&dir, "not.pem", "not a certificate".into());
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        let start = |tls: ExportTls| {
            let config = ExportConfig {
                protocol,
                tls,
                ..ExportConfig::new("https://localhost:4317")
            };
            Exporter::new(store.clone(), config, Arc::new(Metrics::new()))
                .err()
                .unwrap()
                .to_string()
        };
        let missing = start(ExportTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            client_cert_and_key: None,
        });
        assert_eq!(
            missing,
            "OTLP endpoint TLS: reading /nonexistent/ca.pem: No such file or directory (os error 2)"
        );
        let not_a_certificate = start(ExportTls {
            ca_file: None,
            client_cert_and_key: Some((not_pem.clone(), not_pem.clone())),
        });
        assert_eq!(
            not_a_certificate,
            format!(
                "OTLP endpoint TLS: {}: no PEM certificate in it",
                not_pem.display()
            )
        );
        let (cert, _) = support::certs::Ca::new("client CA").issue(false);
        let cert = pem_file(&dir, "client.pem", cert);
        let not_a_key = start(ExportTls {
            ca_file: None,
            client_cert_and_key: Some((cert, not_pem.clone())),
        });
        assert_eq!(
            not_a_key,
            format!(
                "OTLP endpoint TLS: {}: no PEM private key in it (no items found)",
                not_pem.display()
            )
        );
    }
}

#[test]
fn a_header_is_name_equals_value_and_its_value_is_not_shown() {
    let header: OtlpHeader = "X-Scope-OrgID = dev".parse().unwrap();
    assert_eq!(header.name.as_str(), "x-scope-orgid");
    assert_eq!(header.value, "dev");
    assert!(!format!("{header:?}").contains("dev"), "{header:?}");
    let refused = |text: &str| text.parse::<OtlpHeader>().unwrap_err();
    assert_eq!(
        refused("Authorization: Bearer s3cr3t"),
        "a header is name=value, and one given has no `=` (not shown: it may hold a credential)"
    );
    assert_eq!(
        refused("Content-Type=text/plain"),
        "\"content-type\" is set by the exporter itself"
    );
    assert_eq!(
        refused("grpc-timeout=1S"),
        "\"grpc-timeout\" is set by the exporter itself"
    );
    assert_eq!(refused("bad name=1"), "\"bad name\" is not a header name");
    assert_eq!(
        refused("x-trace-bin=AAAA"),
        "\"x-trace-bin\": binary (-bin) headers are not supported"
    );
    assert_eq!(
        refused("x-key=line\nbreak"),
        "the value of \"x-key\" is not a header value"
    );
}
