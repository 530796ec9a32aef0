//! The agent stream's gRPC service, written by hand rather than generated: its codec keeps each
//! batch as the bytes the agent sent
//! ([`BatchBytes`](mermin_protocol::wire::read::BatchBytes)), which the session reads in place
//! and the store logs as they are, instead of prost decoding every record into owned values
//! that the log then encodes again. Answers are encoded by prost. The path, the status of an
//! unknown method and the message size limit are those of the generated `AgentServiceServer`
//! (no compression either); a message that is not an `AgentMessage` ends the stream with
//! INVALID_ARGUMENT naming what is wrong (prost's decoder said INTERNAL).

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use mermin_protocol::{agent::v1::AggregatorMessage, wire::read::AgentMessageRead};
use prost::bytes::Buf;
use tonic::{
    Status, Streaming,
    body::Body,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    codegen::{BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, StreamingService},
};
use tonic_prost::ProstEncoder;

/// The service's name, as `agent.proto` declares it.
const SERVICE: &str = "mermin.agent.v1.AgentService";
/// Its one method.
const STREAM_PATH: &str = "/mermin.agent.v1.AgentService/Stream";

/// What a stream answers: a stream of acknowledgements and, at its end, a status.
pub type Answers = tokio_stream::wrappers::ReceiverStream<Result<AggregatorMessage, Status>>;

/// What [`AgentStreamServer`] serves: one call per agent stream.
pub trait AgentStreams: Clone + Send + Sync + 'static {
    fn stream(&self, inbound: Streaming<Inbound>) -> Answers;
}

/// One message of an agent stream: `None` holds neither a Hello nor a batch.
pub type Inbound = Option<AgentMessageRead>;

/// The tonic service of [`AgentStreams`].
#[derive(Clone)]
pub struct AgentStreamServer<T> {
    streams: T,
    max_message_bytes: usize,
}

impl<T: AgentStreams> AgentStreamServer<T> {
    pub fn new(streams: T, max_message_bytes: usize) -> Self {
        AgentStreamServer {
            streams,
            max_message_bytes,
        }
    }
}

impl<T> NamedService for AgentStreamServer<T> {
    const NAME: &'static str = SERVICE;
}

impl<T, B> Service<http::Request<B>> for AgentStreamServer<T>
where
    T: AgentStreams,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Any request ends the connection's first-request deadline.
        if let Some(connection) = super::AgentConnection::of(request.extensions()) {
            connection.started();
        }
        if request.uri().path() != STREAM_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = Method(self.streams.clone());
        let mut grpc =
            Grpc::new(AgentStreamCodec).max_decoding_message_size(self.max_message_bytes);
        Box::pin(async move { Ok(grpc.streaming(method, request).await) })
    }
}

struct Method<T>(T);

impl<T: AgentStreams> StreamingService<Inbound> for Method<T> {
    type Response = AggregatorMessage;
    type ResponseStream = Answers;
    type Future = std::future::Ready<Result<tonic::Response<Answers>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<Inbound>>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(
            self.0.stream(request.into_inner()),
        )))
    }
}

/// Reads `AgentMessage`s with [`AgentMessageRead`]; writes answers with prost.
struct AgentStreamCodec;

impl Codec for AgentStreamCodec {
    type Encode = AggregatorMessage;
    type Decode = Inbound;
    type Encoder = ProstEncoder<AggregatorMessage>;
    type Decoder = AgentStreamCodec;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        AgentStreamCodec
    }
}

impl Decoder for AgentStreamCodec {
    type Item = Inbound;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, Status> {
        // The message's bytes, taken without a copy when they are contiguous.
        let bytes = src.copy_to_bytes(src.remaining());
        AgentMessageRead::read(bytes)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("AgentMessage: {e}")))
    }
}
