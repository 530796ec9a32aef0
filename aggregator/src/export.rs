//! Delivery of the export outbox to an OTLP endpoint (Tempo, or a collector), over gRPC or
//! OTLP/HTTP with protobuf bodies ([`OtlpProtocol`]).
//!
//! The [`Exporter`] is an actix actor. Its mailbox takes [`OutboxChanged`] from the flow shards
//! after a checkpoint that queued spans; it keeps one delivery in flight and, once idle, waits for
//! the next such message. Requests are taken from the [`Store`]'s outbox oldest first, one at a
//! time, and removed only after the endpoint answered. Policy, the same for both transports:
//! - **accepted** (gRPC OK, HTTP 2xx) — removed; spans the endpoint reports as rejected in a
//!   partial success are counted as `spans_rejected{reason="partial_success"}`;
//! - **refused for good** (gRPC `INVALID_ARGUMENT`, HTTP 400 or 413) — the endpoint saw the data and
//!   refuses it: removed, counted as `spans_rejected{reason="invalid_argument"}`, logged with the
//!   endpoint's message;
//! - **anything else** (endpoint down, overloaded, 429/5xx, timeouts, auth, TLS or path
//!   misconfiguration) — kept and retried with exponential backoff and jitter (each wait
//!   between half and all of the next delay, never over the maximum), forever:
//!   acknowledged data is never dropped because an endpoint is unreachable or misconfigured.
//!   Retries are counted.
//!
//! **Quota.** With the `drop_oldest` outbox policy ([`ExportConfig::drop_oldest_above_bytes`]),
//! the exporter deletes the oldest requests while the outbox is over quota, counting their spans
//! as `spans_dropped{reason="outbox_full"}`; it checks before every attempt, so the outbox exceeds
//! its quota for at most one backoff period. (The default policy, backpressure, is ingest's.)
//!
//! OTLP/HTTP endpoints follow the OTLP exporters' convention for a base endpoint: the path
//! gets `/v1/traces` (`http://tempo:4318` → `/v1/traces`, `https://gateway/otlp` →
//! `/otlp/v1/traces`), unless it already ends with it.
//!
//! **TLS.** An `https://` endpoint is reached over TLS with either transport, its certificate
//! checked against the system's CA certificates, or only against the CA of
//! [`ExportTls::ca_file`] when one is given (as the OTLP exporters' `ca_file`); a client
//! certificate is presented when the endpoint asks for one and
//! [`ExportTls::client_cert_and_key`] is set (mutual TLS). The files are read when the exporter
//! starts; one that cannot be read or parsed stops it with the file named (they are not read
//! again: a renewed client certificate takes a restart). A refused handshake is a failed
//! attempt like any other: retried, counted, logged with the reason.
//!
//! **Headers** ([`OtlpHeader`]) go with every request, as gRPC metadata or HTTP headers; their
//! values are marked sensitive and never shown.
//!
//! **A broken store** (an I/O error sled keeps until a restart; `/livez` fails) exports nothing:
//! what its outbox holds may not have become durable, and the restart recovers what did.
//!
//! Span ids are deterministic, so a request delivered twice (an answer lost after the endpoint
//! stored it) is deduplicated by Tempo.

use std::{path::PathBuf, sync::Arc, time::Duration};

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message as ActixMessage, WrapFuture,
};
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tonic::{
    Code,
    metadata::MetadataMap,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::{
    metrics::{Metrics, ReasonLabel},
    store::{Store, StoreError},
};

/// How spans travel to the endpoint; named as the OTLP exporters name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    HttpProtobuf,
}

impl OtlpProtocol {
    pub const NAMES: &str = "\"grpc\" or \"http/protobuf\"";

    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

impl std::fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            other => Err(format!(
                "unknown OTLP protocol {other:?}; expected {}",
                OtlpProtocol::NAMES
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// `http://host:4317` for gRPC, `http://host:4318` for OTLP/HTTP (see the module docs).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// The `drop_oldest` outbox policy's quota; `None` under the backpressure policy.
    pub drop_oldest_above_bytes: Option<u64>,
    /// How an `https://` endpoint is trusted.
    pub tls: ExportTls,
    /// Sent with every request (a tenant, an API key): gRPC metadata, or HTTP headers.
    pub headers: Vec<OtlpHeader>,
}

/// Headers the transports set themselves, and those that would change how a body is read or
/// the connection is used (HTTP/2 refuses connection-specific headers; a `content-encoding`
/// would make the endpoint decode a plain body).
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "te",
    "host",
    "user-agent",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// One header of every export request, `name=value` as the command line and the file give it
/// (`X-Scope-OrgID=dev`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpHeader {
    pub name: http::HeaderName,
    pub value: http::HeaderValue,
}

impl OtlpHeader {
    fn map(headers: &[OtlpHeader]) -> http::HeaderMap {
        headers
            .iter()
            .map(|header| (header.name.clone(), header.value.clone()))
            .collect()
    }
}

impl std::str::FromStr for OtlpHeader {
    type Err = String;

    /// Errors never repeat the value (often a credential), nor the text when it has no `=`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, value) = text.split_once('=').ok_or_else(|| {
            "a header is name=value, and one given has no `=` (not shown: it may hold a credential)"
                .to_owned()
        })?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        // gRPC metadata: names ending in -bin carry binary values, and these are text.
        if name.as_str().ends_with("-bin") {
            return Err(format!("{name:?}: binary (-bin) headers are not supported"));
        }
        // What the transports set themselves (tonic would drop them silently).
        if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("grpc-") {
            return Err(format!("{name:?} is set by the exporter itself"));
        }
        let mut value = http::HeaderValue::from_str(value.trim())
            .map_err(|_| format!("the value of {name:?} is not a header value"))?;
        // Often a credential: never shown by `Debug`, never indexed by HTTP/2's header
        // compression.
        value.set_sensitive(true);
        Ok(Self { name, value })
    }
}

/// The PEM files of the exporter's TLS (see the module docs), read when the exporter starts.
/// Default: the system's CA certificates, no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportTls {
    /// The CA certificates the endpoint's certificate must chain to, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its key.
    pub client_cert_and_key: Option<(PathBuf, PathBuf)>,
}

impl ExportTls {
    /// Whether anything is set that only an `https://` endpoint uses.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_and_key.is_some()
    }

    /// Reads the files, checking that each holds what it should (errors name the file).
    fn read(&self) -> Result<TlsPems, ExportError> {
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| ExportError::Tls(format!("reading {}: {e}", path.display())))
        };
        let certificates = |path: &PathBuf| {
            let pem = read(path)?;
            let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
            match parsed {
                Ok(certs) if !certs.is_empty() => Ok(pem),
                _ => Err(ExportError::Tls(format!(
                    "{}: no PEM certificate in it",
                    path.display()
                ))),
            }
        };
        let key = |path: &PathBuf| {
            let pem = read(path)?;
            match PrivateKeyDer::from_pem_slice(&pem) {
                Ok(_) => Ok(pem),
                Err(err) => Err(ExportError::Tls(format!(
                    "{}: no PEM private key in it ({err})",
                    path.display()
                ))),
            }
        };
        Ok(TlsPems {
            ca: self.ca_file.as_ref().map(certificates).transpose()?,
            identity: match &self.client_cert_and_key {
                Some((cert, key_file)) => Some((certificates(cert)?, key(key_file)?)),
                None => None,
            },
        })
    }
}

/// [`ExportTls`]'s files, read.
struct TlsPems {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsPems {
    /// The client configuration of the OTLP/HTTP transport.
    fn rustls_config(&self) -> Result<rustls::ClientConfig, ExportError> {
        let error =
            |what: &str, e: &dyn std::fmt::Display| ExportError::Tls(format!("{what}: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| error("the CA certificates", &e))?;
                    roots
                        .add(cert)
                        .map_err(|e| error("the CA certificates", &e))?;
                }
            }
            None => {
                let system = rustls_native_certs::load_native_certs();
                // Certificates the platform holds that rustls cannot use are skipped.
                let _ = roots.add_parsable_certificates(system.certs);
            }
        }
        if roots.is_empty() {
            return Err(ExportError::Tls(
                "no CA certificate to check the endpoint's certificate against (give a CA file)"
                    .into(),
            ));
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| error("the client certificate", &e))?;
                let key =
                    PrivateKeyDer::from_pem_slice(key).map_err(|e| error("the client key", &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| error("the client certificate", &e))
            }
        }
    }

    /// The same for tonic's gRPC channel.
    fn tonic_config(&self) -> ClientTlsConfig {
        let config = match &self.ca {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        match &self.identity {
            Some((chain, key)) => config.identity(Identity::from_pem(chain, key)),
            None => config,
        }
    }
}

impl ExportConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            protocol: OtlpProtocol::Grpc,
            timeout: crate::defaults::OTLP_TIMEOUT,
            min_backoff: crate::defaults::EXPORT_MIN_BACKOFF,
            max_backoff: crate::defaults::EXPORT_MAX_BACKOFF,
            drop_oldest_above_bytes: None,
            tls: ExportTls::default(),
            headers: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// The TLS files of an `https://` endpoint: unreadable, or not what they should hold.
    #[error("OTLP endpoint TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store cannot make anything durable until a restart (`/livez` fails meanwhile): what
    /// its outbox holds may not be durable, and a span sent from it could differ from the one
    /// the restart recovers under the same id. Nothing is sent until then.
    #[error("the store is broken until a restart ({0}); nothing is exported until then")]
    StoreBroken(String),
}

/// The exporter actor (see the module docs).
pub struct Exporter {
    store: Store,
    transport: Transport,
    config: ExportConfig,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    /// A delivery (or the wait before a retry) is under way.
    busy: bool,
    /// The outbox changed while busy: look again before going idle.
    changed: bool,
    /// Requests the endpoint took whose removal from the outbox failed (a full disk): skipped,
    /// and removed again before each delivery, so that export goes on and nothing is sent twice.
    delivered: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

type Backoff = Box<dyn Iterator<Item = Duration> + Send>;

/// Something was queued in the outbox.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct OutboxChanged;

/// Wake-ups the mailbox holds; more are redundant (one is enough to look at the outbox).
const MAILBOX_CAPACITY: usize = 4;

/// What one delivery attempt came to.
enum Attempt {
    Done,
    Retry(String),
}

/// What the endpoint said to one request.
enum Delivery {
    /// Taken; the number of spans it rejected in a partial success, and why.
    Accepted { rejected: u64, message: String },
    /// Refused for good.
    Refused(String),
    /// Not taken this time.
    Failed(String),
}

#[derive(Clone)]
enum Transport {
    Grpc(RawTraceClient),
    Http(Arc<HttpTransport>),
}

/// An outbox entry: the request's span count (u32, big-endian), then the encoded
/// `ExportTraceServiceRequest`, sent as stored — decoding and re-encoding every request cost the
/// aggregator a sixth of its CPU.
pub fn outbox_entry(request: &ExportTraceServiceRequest) -> Vec<u8> {
    let spans = span_count(request) as u32;
    let mut entry = Vec::with_capacity(4 + request.encoded_len());
    entry.extend_from_slice(&spans.to_be_bytes());
    // Writing into a Vec cannot run out of room.
    let _ = request.encode(&mut entry);
    entry
}

/// An entry's span count and request; `None` if it is too short to be one.
pub fn split_entry(entry: Vec<u8>) -> Option<(u64, Bytes)> {
    let spans = u32::from_be_bytes(entry.get(..4)?.try_into().ok()?);
    Some((u64::from(spans), Bytes::from(entry).slice(4..)))
}

/// `TraceService/Export` over gRPC with the request already encoded, and the configured
/// headers as metadata.
#[derive(Clone)]
struct RawTraceClient {
    grpc: tonic::client::Grpc<Channel>,
    headers: Arc<http::HeaderMap>,
}

impl RawTraceClient {
    async fn export(
        &mut self,
        request: Bytes,
    ) -> Result<ExportTraceServiceResponse, tonic::Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
        let path = http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        );
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = MetadataMap::from_headers(http::HeaderMap::clone(&self.headers));
        let response = self.grpc.unary(request, path, RawCodec).await?;
        Ok(response.into_inner())
    }
}

/// Sends bytes as they are; decodes the answer with prost.
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        // An OK whose body is not OTLP still took the request (as OTLP/HTTP's 2xx does):
        // nothing to count as rejected, and nothing to send again.
        Ok(Some(
            ExportTraceServiceResponse::decode(src).unwrap_or_default(),
        ))
    }
}

/// OTLP/HTTP with protobuf bodies.
struct HttpTransport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    headers: http::HeaderMap,
    /// The traces path included.
    uri: http::Uri,
    timeout: Duration,
}

impl Transport {
    fn new(config: &ExportConfig) -> Result<Self, ExportError> {
        let endpoint_error = |reason: String| ExportError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let https = config.endpoint.starts_with("https://");
        match config.protocol {
            OtlpProtocol::Grpc => {
                let mut endpoint = Channel::from_shared(config.endpoint.clone())
                    .map_err(|e| endpoint_error(e.to_string()))?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout);
                if https {
                    endpoint = endpoint
                        .tls_config(config.tls.read()?.tonic_config())
                        .map_err(|e| {
                            ExportError::Tls(with_sources(
                                e.to_string(),
                                std::error::Error::source(&e),
                            ))
                        })?;
                }
                let channel = endpoint.connect_lazy();
                Ok(Transport::Grpc(RawTraceClient {
                    grpc: tonic::client::Grpc::new(channel),
                    headers: Arc::new(OtlpHeader::map(&config.headers)),
                }))
            }
            OtlpProtocol::HttpProtobuf => {
                let uri = traces_uri(&config.endpoint).map_err(endpoint_error)?;
                let mut plain = HttpConnector::new();
                plain.set_connect_timeout(Some(config.timeout));
                plain.enforce_http(false);
                let tls = match https {
                    true => config.tls.read()?.rustls_config()?,
                    // Not used: the endpoint is plain http.
                    false => rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                };
                let connector = HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(plain);
                Ok(Transport::Http(Arc::new(HttpTransport {
                    headers: OtlpHeader::map(&config.headers),
                    client: Client::builder(TokioExecutor::new()).build(connector),
                    uri,
                    timeout: config.timeout,
                })))
            }
        }
    }

    async fn send(&mut self, request: Bytes) -> Delivery {
        match self {
            Transport::Grpc(client) => match client.export(request).await {
                Ok(response) => accepted(response),
                Err(status) if status.code() == Code::InvalidArgument => {
                    Delivery::Refused(status.message().to_owned())
                }
                Err(status) => Delivery::Failed(with_sources(
                    format!("{:?}: {}", status.code(), status.message()),
                    std::error::Error::source(&status),
                )),
            },
            Transport::Http(http) => http.send(request).await,
        }
    }
}

impl HttpTransport {
    async fn send(&self, request: Bytes) -> Delivery {
        let mut post = http::Request::post(self.uri.clone());
        if let Some(headers) = post.headers_mut() {
            headers.extend(self.headers.clone());
        }
        let post = post
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(request));
        let post = match post {
            Ok(post) => post,
            Err(err) => return Delivery::Failed(err.to_string()),
        };
        let exchange = async {
            let response = self
                .client
                .request(post)
                .await
                .map_err(|e| with_sources(e.to_string(), std::error::Error::source(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Delivery::Failed(format!("no answer within {:?}", self.timeout)),
            Ok(Err(err)) => Delivery::Failed(err),
            Ok(Ok((status, body))) if status.is_success() => {
                match ExportTraceServiceResponse::decode(body) {
                    Ok(response) => accepted(response),
                    // Taken, but the answer is not OTLP: nothing to count as rejected.
                    Err(_) => Delivery::Accepted {
                        rejected: 0,
                        message: String::new(),
                    },
                }
            }
            Ok(Ok((status, body)))
                if status == http::StatusCode::BAD_REQUEST
                    || status == http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Delivery::Refused(refusal_message(&body))
            }
            Ok(Ok((status, _))) => Delivery::Failed(format!("HTTP {status}")),
        }
    }
}

/// Where OTLP/HTTP posts traces: `endpoint`'s path with `/v1/traces` (see the module docs).
fn traces_uri(endpoint: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("{e}"))?;
    let path = uri.path().trim_end_matches('/').to_owned();
    if path.ends_with(TRACES_PATH) {
        return Ok(uri);
    }
    let mut parts = uri.into_parts();
    let query = parts
        .path_and_query
        .as_ref()
        .and_then(|p| p.query())
        .map_or(String::new(), |q| format!("?{q}"));
    parts.path_and_query = Some(
        format!("{path}{TRACES_PATH}{query}")
            .parse()
            .map_err(|e| format!("{e}"))?,
    );
    http::Uri::from_parts(parts).map_err(|e| format!("{e}"))
}

const TRACES_PATH: &str = "/v1/traces";

/// The `google.rpc.Status` an OTLP/HTTP endpoint answers a refusal with (its message is all
/// this reads).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(string, tag = "2")]
    message: String,
}

/// What a refusal's body says: a `google.rpc.Status`'s message, or the body as text.
fn refusal_message(body: &[u8]) -> String {
    match RpcStatus::decode(body) {
        Ok(status) if !status.message.is_empty() => status.message,
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

/// `head`, then the errors from `source` down, as one line (a TLS failure's reason is a few
/// levels under the transport's error).
fn with_sources(head: String, mut source: Option<&dyn std::error::Error>) -> String {
    let mut text = head;
    while let Some(cause) = source {
        // tonic repeats a cause in the status's message.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn accepted(response: ExportTraceServiceResponse) -> Delivery {
    let (rejected, message) = response.partial_success.map_or((0, String::new()), |p| {
        (p.rejected_spans.max(0) as u64, p.error_message)
    });
    Delivery::Accepted { rejected, message }
}

impl Exporter {
    /// Checks the endpoint and prepares a lazily connecting channel (no I/O yet).
    pub fn new(
        store: Store,
        config: ExportConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ExportError> {
        let endpoint_error = |reason: String| ExportError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        if !(config.endpoint.starts_with("http://") || config.endpoint.starts_with("https://")) {
            return Err(endpoint_error("must start with http:// or https://".into()));
        }
        Ok(Self {
            store,
            transport: Transport::new(&config)?,
            backoff: backoff(&config),
            config,
            metrics,
            busy: false,
            changed: false,
            delivered: Arc::default(),
        })
    }

    /// Starts one delivery: the quota policy, then the oldest request, removed if the endpoint
    /// answered for good. What comes next depends on the outcome (see [`Self::delivered`]).
    fn deliver_next(&mut self, ctx: &mut Context<Self>) {
        self.busy = true;
        self.changed = false;
        let store = self.store.clone();
        let mut transport = self.transport.clone();
        let metrics = self.metrics.clone();
        let quota = self.config.drop_oldest_above_bytes;
        let delivered = self.delivered.clone();
        let delivery = async move {
            if let Some(why) = store.broken() {
                return Err(ExportError::StoreBroken(why));
            }
            remove_delivered(&store, &delivered).await;
            drop_over_quota(&store, quota, &metrics).await?;
            metrics.outbox_requests.set(store.outbox_len() as i64);
            metrics.outbox_bytes.set(store.outbox_bytes() as i64);
            // Delivered requests go oldest first, so those not removed yet are the oldest ones:
            // the next to deliver is the first after them.
            let skipped = lock(&delivered).last().copied();
            // Read on the blocking pool: the request comes from the value log on disk.
            let reader = store.clone();
            let next = tokio::task::spawn_blocking(move || match skipped {
                Some(after) => reader.outbox_after(after, 1),
                None => reader.outbox_oldest(1),
            })
            .await
            .map_err(|joined| StoreError::Backend(joined.to_string()))??;
            let Some((id, bytes)) = next.into_iter().next() else {
                return Ok(None);
            };
            let attempt = attempt(&mut transport, bytes, &metrics).await;
            if let Attempt::Done = attempt
                && let Err(err) = store.outbox_remove(id).await
            {
                metrics.store_write_failed("outbox_remove");
                tracing::warn!(%err, "cannot remove a delivered request from the outbox; skipping it until it can be");
                lock(&delivered).insert(id);
            }
            Ok(Some(attempt))
        };
        ctx.spawn(
            delivery
                .into_actor(self)
                .map(|outcome, exporter, ctx| exporter.delivered(outcome, ctx)),
        );
    }

    fn delivered(
        &mut self,
        outcome: Result<Option<Attempt>, ExportError>,
        ctx: &mut Context<Self>,
    ) {
        match outcome {
            Ok(Some(Attempt::Done)) => {
                self.backoff = backoff(&self.config);
                self.deliver_next(ctx);
            }
            Ok(None) if self.changed => self.deliver_next(ctx),
            Ok(None) => self.busy = false,
            Ok(Some(Attempt::Retry(why))) => {
                self.metrics.export_retries.inc();
                let delay = self.backoff.next().unwrap_or(self.config.max_backoff);
                tracing::warn!(endpoint = %self.config.endpoint, %why, ?delay, "export failed; will retry");
                ctx.run_later(delay, |exporter, ctx| exporter.deliver_next(ctx));
            }
            Err(err @ ExportError::StoreBroken(_)) => {
                self.metrics.export_paused.inc();
                tracing::error!(%err);
                ctx.run_later(Duration::from_secs(10), |exporter, ctx| {
                    exporter.deliver_next(ctx)
                });
            }
            Err(err) => {
                tracing::error!(%err, "cannot read or update the outbox; retrying");
                ctx.run_later(Duration::from_secs(1), |exporter, ctx| {
                    exporter.deliver_next(ctx)
                });
            }
        }
    }
}

impl Actor for Exporter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.deliver_next(ctx);
    }
}

impl Handler<OutboxChanged> for Exporter {
    type Result = ();

    fn handle(&mut self, _: OutboxChanged, ctx: &mut Context<Self>) {
        if self.busy {
            self.changed = true;
        } else {
            self.deliver_next(ctx);
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the requests delivered earlier whose removal failed; those that still fail stay.
async fn remove_delivered(
    store: &Store,
    delivered: &std::sync::Mutex<std::collections::BTreeSet<u64>>,
) {
    let ids: Vec<u64> = lock(delivered).iter().copied().collect();
    for id in ids {
        if store.outbox_remove(id).await.is_err() {
            return; // still failing: try again before the next delivery
        }
        lock(delivered).remove(&id);
    }
}

/// Exponential from the minimum to the maximum, each wait jittered between half and all of it
/// (backon's own jitter adds up to the whole delay again, past the maximum).
fn backoff(config: &ExportConfig) -> Backoff {
    Box::new(
        ExponentialBuilder::default()
            .with_min_delay(config.min_backoff)
            .with_max_delay(config.max_backoff)
            .without_max_times()
            .build()
            .map(|delay| delay.mul_f64(0.5 + fastrand::f64() / 2.0)),
    )
}

/// The `drop_oldest` policy: deletes the oldest requests while the outbox is over `quota`.
async fn drop_over_quota(
    store: &Store,
    quota: Option<u64>,
    metrics: &Metrics,
) -> Result<(), ExportError> {
    let Some(max) = quota else {
        return Ok(());
    };
    while store.outbox_bytes() > max {
        let Some((id, bytes)) = store.outbox_oldest(1)?.into_iter().next() else {
            break;
        };
        let spans = split_entry(bytes).map_or(0, |(spans, _)| spans);
        store.outbox_remove(id).await?;
        metrics
            .spans_dropped
            .get_or_create(&ReasonLabel {
                reason: "outbox_full".into(),
            })
            .inc_by(spans);
        tracing::warn!(
            spans,
            quota_bytes = max,
            "outbox over quota: oldest request dropped"
        );
    }
    Ok(())
}

/// One delivery attempt of an outbox entry, counted.
async fn attempt(transport: &mut Transport, entry: Vec<u8>, metrics: &Metrics) -> Attempt {
    let Some((spans, request)) = split_entry(entry) else {
        tracing::error!("outbox entry too short to hold a request; dropped");
        // Its spans cannot be counted; the entry counts as one.
        metrics.rejected("corrupt_outbox_entry", 1);
        return Attempt::Done;
    };
    match transport.send(request).await {
        Delivery::Accepted { rejected, message } => {
            if rejected > 0 {
                tracing::error!(spans = rejected, %message, "endpoint rejected part of a request");
                metrics.rejected("partial_success", rejected);
            } else if !message.is_empty() {
                // A partial success rejecting nothing is a warning (OTLP specification).
                tracing::warn!(%message, "endpoint took a request with a warning");
            }
            metrics
                .spans_exported
                .inc_by(spans.saturating_sub(rejected));
            Attempt::Done
        }
        Delivery::Refused(message) => {
            tracing::error!(spans, %message, "endpoint refused a request");
            metrics.rejected("invalid_argument", spans);
            Attempt::Done
        }
        Delivery::Failed(why) => Attempt::Retry(why),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_http_posts_to_the_base_path_with_v1_traces() {
        let posted = |endpoint: &str| traces_uri(endpoint).unwrap().to_string();
        assert_eq!(posted("http://tempo:4318"), "http://tempo:4318/v1/traces");
        assert_eq!(posted("http://tempo:4318/"), "http://tempo:4318/v1/traces");
        assert_eq!(
            posted("https://otlp-gateway.example.net/otlp"),
            "https://otlp-gateway.example.net/otlp/v1/traces"
        );
        assert_eq!(
            posted("https://gateway.example.net/otlp/?tenant=a"),
            "https://gateway.example.net/otlp/v1/traces?tenant=a"
        );
        assert_eq!(
            posted("http://collector:4318/v1/traces"),
            "http://collector:4318/v1/traces"
        );
    }

    #[test]
    fn a_refusal_s_message_is_read_from_its_rpc_status() {
        let status = RpcStatus {
            message: "span too large".into(),
        };
        assert_eq!(refusal_message(&status.encode_to_vec()), "span too large");
        assert_eq!(refusal_message(b"bad request"), "bad request");
    }

    #[test]
    fn connection_and_encoding_headers_are_refused() {
        for name in [
            "Content-Encoding",
            "connection",
            "Transfer-Encoding",
            "upgrade",
        ] {
            let refused = format!("{name}=x").parse::<OtlpHeader>().unwrap_err();
            assert_eq!(
                refused,
                format!(
                    "{:?} is set by the exporter itself",
                    name.to_ascii_lowercase()
                )
            );
        }
    }
}
