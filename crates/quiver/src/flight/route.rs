//! The `DoGet` route: a tower layer in front of tonic that answers every `DoGet` itself,
//! writing each result message to the HTTP/2 stream as the chain of `Bytes` it is
//! ([`crate::wire::frames`]).
//!
//! ```text
//!  HTTP/2 request ── RpcMetricsLayer ── DoGetRoute ──┬─ DoGet ──▶ read the Ticket ─▶ QuiverFlightService::do_get_frames
//!                                                    │            (response body: Frame chunks, then trailers)
//!                                                    └─ every other RPC ──▶ tonic's routes
//! ```
//!
//! tonic's codec writes each response message into one contiguous buffer, so `DoGet` is
//! answered here instead: the request (a unary `Ticket`) is read once, and the service
//! authenticates, decodes and runs it exactly as any other RPC; the response body yields
//! each message's chunks as HTTP/2 data, ending with the gRPC status in the trailers.
//! Nothing is handed back to tonic: whichever encoder made the messages
//! (`--send-path`), this is how they are sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow_flight::Ticket;
use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame as BodyFrame};
use prost::Message;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use super::do_get::MessageStream;
use super::{MessageLimits, QuiverFlightService};
use crate::error::Error;

/// The gRPC path of `DoGet`.
const DO_GET_PATH: &str = "/arrow.flight.protocol.FlightService/DoGet";

/// Serves every `DoGet` of `service`; everything else goes on to tonic.
#[derive(Debug, Clone)]
pub struct DoGetRouteLayer {
    service: Arc<QuiverFlightService>,
    limits: MessageLimits,
}

impl DoGetRouteLayer {
    /// A layer serving `service`'s `DoGet`s within `limits`, the limits of its tonic
    /// server.
    pub fn new(service: Arc<QuiverFlightService>, limits: MessageLimits) -> Self {
        Self { service, limits }
    }
}

impl<S> Layer<S> for DoGetRouteLayer {
    type Service = DoGetRoute<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DoGetRoute {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`DoGetRouteLayer`] makes.
#[derive(Debug, Clone)]
pub struct DoGetRoute<S> {
    inner: S,
    layer: DoGetRouteLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<tonic::body::Body>> for DoGetRoute<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != DO_GET_PATH {
            return Box::pin(self.inner.call(request));
        }
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let message = match read_unary(body, layer.limits.max_decoding_message_size).await {
                Ok(message) => message,
                Err(status) => return Ok(status.into_http()),
            };
            let ticket = match Ticket::decode(message) {
                Ok(ticket) => ticket,
                Err(e) => {
                    return Ok(
                        Status::from(Error::invalid(format!("malformed Ticket: {e}"))).into_http(),
                    );
                }
            };
            let request = tonic::Request::from_http(Request::from_parts(parts, ticket));
            match layer.service.do_get_frames(request).await {
                Ok(frames) => Ok(response(frames, layer.limits.max_encoding_message_size)),
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The one message of a unary gRPC request body.
async fn read_unary(mut body: tonic::body::Body, max: usize) -> Result<Bytes, Status> {
    let mut buf = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Error::invalid(format!("reading the request: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max.saturating_add(5) {
                return Err(Error::MessageTooLarge {
                    message: format!(
                        "the request message is too large: over {max} bytes, the limit of \
                         --max-decoding-message-size"
                    ),
                }
                .into());
            }
            buf.extend_from_slice(&data);
        }
    }
    if buf.len() < 5 {
        return Err(Error::invalid("DoGet needs one Ticket message").into());
    }
    let compressed = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if compressed != 0 {
        return Err(Error::Unsupported {
            what: "Compressed requests".into(),
            hint: "send the Ticket uncompressed".into(),
        }
        .into());
    }
    if buf.len() != 5 + len {
        return Err(Error::invalid("DoGet needs exactly one Ticket message").into());
    }
    buf.advance(5);
    Ok(buf.freeze())
}

fn response(frames: MessageStream, max_message_size: usize) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::new(FrameBody {
        frames,
        chunks: Vec::new().into_iter(),
        max_message_size,
        done: false,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A `DoGet` response body: each message's chunks as data, then the status as trailers.
struct FrameBody {
    frames: MessageStream,
    chunks: std::vec::IntoIter<Bytes>,
    max_message_size: usize,
    done: bool,
}

impl FrameBody {
    fn trailers(&mut self, status: &Status) -> BodyFrame<Bytes> {
        self.done = true;
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("13"));
        }
        BodyFrame::trailers(trailers)
    }
}

impl Body for FrameBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(chunk) = this.chunks.next() {
            return Poll::Ready(Some(Ok(BodyFrame::data(chunk))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.frames).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if frame.len() - 5 > this.max_message_size {
                    // The query is dropped with the stream when the body is.
                    let status = Status::from(Error::MessageTooLarge {
                        message: format!(
                            "a result message of {} bytes exceeds --max-encoding-message-size \
                             ({} bytes): raise it, or lower --max-flight-data-size",
                            frame.len() - 5,
                            this.max_message_size
                        ),
                    });
                    return Poll::Ready(Some(Ok(this.trailers(&status))));
                }
                this.chunks = frame.into_chunks().into_iter();
                match this.chunks.next() {
                    Some(chunk) => Poll::Ready(Some(Ok(BodyFrame::data(chunk)))),
                    None => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Ok(this.trailers(&status)))),
            Poll::Ready(None) => Poll::Ready(Some(Ok(this.trailers(&Status::ok(""))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.chunks.len() == 0
    }
}
