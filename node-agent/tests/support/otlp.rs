//! An OTLP/gRPC trace receiver in the test process (opentelemetry-proto's generated service):
//! records every span with its resource's `service.name`.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
pub struct Receiver(pub Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .and_then(|r| r.attributes.into_iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value?.value)
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

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

impl Receiver {
    /// Serves on a free loopback port of `runtime`; returns the address.
    pub fn serve(&self, runtime: &tokio::runtime::Runtime) -> std::net::SocketAddr {
        let service = TraceServiceServer::new(self.clone());
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
            addr
        })
    }

    /// Every span received so far, with its side's `service.name`.
    pub fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}
