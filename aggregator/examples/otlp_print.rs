//! A minimal OTLP/gRPC trace receiver that prints each span it receives: the demo's stand-in for
//! Tempo when no endpoint is given. `cargo run --example otlp_print -- 127.0.0.1:4317`

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::span::SpanKind,
};
use tonic::{Request, Response, Status};

struct Printer;

fn show(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| show(&Some(v.clone())))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn get(attributes: &[KeyValue], key: &str) -> String {
    attributes
        .iter()
        .find(|a| a.key == key)
        .map(|a| show(&a.value))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Printer {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| get(&r.attributes, "service.name"))
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                if span.kind != SpanKind::Client as i32 {
                    continue;
                }
                let a = &span.attributes;
                // `namespace/pod (address:port)` where the aggregator knew the pod.
                let side_label = |side: &str| {
                    let at = format!(
                        "{}:{}",
                        get(a, &format!("{side}.address")),
                        get(a, &format!("{side}.port"))
                    );
                    match get(a, &format!("{side}.pod.name")) {
                        pod if pod.is_empty() => at,
                        pod => format!("{}/{pod} ({at})", get(a, &format!("{side}.namespace"))),
                    }
                };
                println!(
                    "otlp span {name} trace={trace} service={service}: {proto} {src} -> {dst} sent={sent}B received={received}B end={end} community_id={cid}",
                    name = span.name,
                    trace = span
                        .trace_id
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>(),
                    proto = get(a, "network.protocol"),
                    src = side_label("source"),
                    dst = side_label("destination"),
                    sent = get(a, "flow.bytes.sent"),
                    received = get(a, "flow.bytes.received"),
                    end = get(a, "flow.end_reason"),
                    cid = get(a, "flow.community_id"),
                );
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into())
        .parse()?;
    eprintln!("otlp_print listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Printer))
        .serve(addr)
        .await?;
    Ok(())
}
