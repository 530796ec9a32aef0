//! TLS for the aggregator's servers (rustls, ring): mutual TLS from PEM files, reloaded when the
//! files change, and the accepted connections of any listener turned into TLS streams.
//!
//! [`ServerTls::load`] reads the server's certificate chain and key and the CA that client
//! certificates must chain to; every client must present a valid certificate. [`ServerTls::watch`]
//! polls the three files and swaps in a new configuration when their content changes (as
//! cert-manager rotates them): new connections get it, open ones keep theirs; a change that does
//! not load is logged and the previous configuration stays. [`ServerTls::incoming`] handshakes
//! each accepted connection on its own task (a slow client holds up nobody) and counts every
//! refused one in `tls_handshake_failures{endpoint, reason}`.
//!
//! The agent endpoint, the admin API and the replicas' replication endpoint use it (it knows
//! nothing of what is served over it).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::{Stream, StreamExt as _};
use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls::{
    CertificateError, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use tokio::{io::AsyncRead, io::AsyncWrite, sync::mpsc};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::EndpointReasonLabel;

/// The PEM files of a server (the Helm chart mounts them as `tls.crt`, `tls.key`, `ca.crt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that client certificates must chain to.
    pub client_ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A server's TLS configuration, swapped when its files change.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<RwLock<Loaded>>,
}

struct Loaded {
    /// The files' content it was built from.
    content: [Vec<u8>; 3],
    acceptor: TlsAcceptor,
}

impl ServerTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let content = read_all(&files)?;
        let acceptor = build(&files, &content)?;
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(Loaded { content, acceptor })),
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .acceptor
            .clone()
    }

    /// Reloads the files if their content changed; `Ok(true)` if a new configuration is in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let content = read_all(&self.files)?;
        if self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .content
            == content
        {
            return Ok(false);
        }
        let acceptor = build(&self.files, &content)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Loaded { content, acceptor };
        Ok(true)
    }

    /// Checks the files every `interval` until `stopping` turns true (see the module docs);
    /// what it finds is logged with `endpoint`'s name.
    pub fn watch(
        &self,
        endpoint: &'static str,
        interval: Duration,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopping.wait_for(|stop| *stop) => return,
                }
                match tls.reload() {
                    Ok(true) => tracing::info!(
                        endpoint,
                        cert = %tls.files.cert.display(),
                        client_ca = %tls.files.client_ca.display(),
                        "TLS files reloaded"
                    ),
                    Ok(false) => {}
                    Err(err) => tracing::warn!(
                        %err,
                        endpoint,
                        "TLS files changed but do not load; keeping the previous ones"
                    ),
                }
            }
        });
    }

    /// The TLS streams of `accepted` connections, each handshaken within `timeout`; refusals are
    /// counted under `endpoint` in `failures`, logged, and dropped.
    pub fn incoming<S, E>(
        &self,
        accepted: impl Stream<Item = Result<S, E>> + Send + 'static,
        endpoint: &'static str,
        timeout: Duration,
        failures: Family<EndpointReasonLabel, Counter>,
    ) -> ReceiverStream<Result<TlsStream<S>, std::io::Error>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let (streams, receiver) = mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            let mut accepted = std::pin::pin!(accepted);
            loop {
                let next = tokio::select! {
                    next = accepted.next() => next,
                    () = streams.closed() => return,
                };
                let stream = match next {
                    None => return,
                    Some(Ok(stream)) => stream,
                    Some(Err(err)) => {
                        tracing::warn!(%err, endpoint, "accept failed");
                        continue;
                    }
                };
                let (acceptor, streams, failures) =
                    (tls.acceptor(), streams.clone(), failures.clone());
                tokio::spawn(async move {
                    let reason = match tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            let _ = streams.send(Ok(tls)).await;
                            return;
                        }
                        Ok(Err(err)) => {
                            let reason = refusal(&err);
                            tracing::warn!(%err, endpoint, reason, "TLS handshake refused");
                            reason
                        }
                        Err(_) => "timeout",
                    };
                    failures
                        .get_or_create(&EndpointReasonLabel {
                            endpoint: endpoint.to_owned(),
                            reason: reason.to_owned(),
                        })
                        .inc();
                });
            }
        });
        ReceiverStream::new(receiver)
    }
}

/// Why a handshake failed, as a metric label.
fn refusal(err: &std::io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired_certificate",
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        rustls::Error::InvalidCertificate(_) => "invalid_certificate",
        _ => "handshake",
    }
}

fn read_all(files: &TlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    Ok([
        read(&files.cert)?,
        read(&files.key)?,
        read(&files.client_ca)?,
    ])
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

fn build(files: &TlsFiles, [cert, key, ca]: &[Vec<u8>; 3]) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(&files.cert, cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
        path: files.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.client_ca, ca)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            path: files.client_ca.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
