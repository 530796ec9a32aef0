//! An OTLP trace receiver on loopback for the tests, over gRPC (opentelemetry-proto's generated
//! service) or OTLP/HTTP (protobuf bodies on `/v1/traces`): records what it accepts, answers from
//! a script first. A scripted gRPC status becomes the HTTP status the OTLP specification pairs
//! with it. [`serve_tls_front`] puts TLS (mutual, if asked) in front of either.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

pub type Answer = Result<ExportTraceServiceResponse, Status>;

/// Records every request it accepts; answers from a script first, then with success.
#[derive(Clone, Default)]
pub struct Receiver {
    pub accepted: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// When each accepted request arrived (Unix ns), in the order of `accepted`.
    pub accepted_at: Arc<Mutex<Vec<u64>>>,
    pub script: Arc<Mutex<VecDeque<Answer>>>,
    /// The headers (gRPC metadata) of each accepted request, in the order of `accepted`.
    pub headers: Arc<Mutex<Vec<axum::http::HeaderMap>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let answer = self.script.lock().unwrap().pop_front();
        match answer {
            Some(Err(status)) => Err(status),
            other => {
                let mut accepted = self.accepted.lock().unwrap();
                self.headers
                    .lock()
                    .unwrap()
                    .push(request.metadata().clone().into_headers());
                accepted.push(request.into_inner());
                self.accepted_at.lock().unwrap().push(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                );
                Ok(Response::new(
                    other.map_or_else(Default::default, Result::unwrap),
                ))
            }
        }
    }
}

pub async fn serve(receiver: Receiver, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    })
}

/// The same receiver behind OTLP/HTTP.
pub async fn serve_http(receiver: Receiver, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    use axum::{body::Bytes, http::StatusCode, routing::post};
    use prost::Message;
    let route = post(|headers: axum::http::HeaderMap, body: Bytes| async move {
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return (
                StatusCode::BAD_REQUEST,
                b"not an ExportTraceServiceRequest".to_vec(),
            );
        };
        match receiver.script.lock().unwrap().pop_front() {
            Some(Err(status)) => {
                let code = match status.code() {
                    tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                    tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                (code, status.message().as_bytes().to_vec())
            }
            answer => {
                receiver.accepted.lock().unwrap().push(request);
                receiver.headers.lock().unwrap().push(headers);
                let response = answer.map_or_else(Default::default, Result::unwrap);
                (StatusCode::OK, response.encode_to_vec())
            }
        }
    });
    let app = axum::Router::new().route("/v1/traces", route);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() })
}

impl Receiver {
    /// Every span accepted so far.
    pub fn spans(&self) -> Vec<Span> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// Every span accepted so far, with its resource's `service.name`.
    pub fn spans_with_service(&self) -> Vec<(String, Span)> {
        let accepted = self.accepted.lock().unwrap();
        let mut spans = Vec::new();
        for resource_spans in accepted.iter().flat_map(|r| &r.resource_spans) {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.clone()?.value)
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in &resource_spans.scope_spans {
                spans.extend(scope.spans.iter().map(|s| (service.clone(), s.clone())));
            }
        }
        spans
    }

    /// The names of every span accepted so far, in order.
    pub fn names(&self) -> Vec<String> {
        self.spans().into_iter().map(|s| s.name).collect()
    }
}

/// A span attribute's value; panics naming the attribute if it is missing.
pub fn attr(span: &Span, key: &str) -> Value {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone()?.value)
        .unwrap_or_else(|| panic!("no attribute {key} on {}", span.name))
}

pub fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Value::StringValue(s) => s,
        other => panic!("{key} is not a string: {other:?}"),
    }
}

pub fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Value::IntValue(i) => i,
        other => panic!("{key} is not an int: {other:?}"),
    }
}

/// The application protocols (ALPN) that connections through a TLS front agreed on, in order
/// (empty: none).
pub type Negotiated = Arc<Mutex<Vec<Vec<u8>>>>;

/// Terminates TLS for the plaintext receiver at `backend`: every connection accepted on
/// `listener` is handshaken with `cert_pem` / `key_pem` (ALPN `h2` and `http/1.1`, so gRPC and
/// OTLP/HTTP clients both get on; what each agreed goes to `negotiated`), asking for a client
/// certificate that chains to `client_ca_pem` if one is given, then relayed byte for byte. A
/// refused handshake closes the connection.
pub async fn serve_tls_front(
    listener: TcpListener,
    backend: std::net::SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
    negotiated: Negotiated,
) -> tokio::task::JoinHandle<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let negotiated = negotiated.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
                negotiated.lock().unwrap().push(alpn);
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    })
}
