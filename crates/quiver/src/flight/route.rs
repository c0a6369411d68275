//! The `DoGet` route: a tower layer in front of tonic that answers every `DoGet` itself,
//! writing each result message to the HTTP/2 stream as the chain of `Bytes` it is
//! ([`crate::wire::frames`]).
//!
//! ```text
//!  HTTP/2 request ── RpcMetricsLayer ── DoGetRoute ──┬─ DoGet ──▶ read the Ticket ─▶ QuiverFlightService::do_get_frames
//!                                                    │            (response body: messages' chunks, then trailers)
//!                                                    └─ every other RPC ──▶ tonic's routes
//! ```
//!
//! tonic's codec writes each response message into one contiguous buffer, so `DoGet` is
//! answered here instead: the request (a unary `Ticket`) is read once, and the service
//! authenticates, decodes and runs it exactly as any other RPC; the response body yields
//! the messages waiting as one piece of HTTP/2 data (their chunks, uncopied:
//! [`super::body::Chunks`]), ending with the gRPC status in the trailers.
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

use super::body::{Chunks, PortBody};
use super::do_get::MessageStream;
use super::{MessageLimits, QuiverFlightService};
use crate::error::Error;
use crate::wire::frames::Frame;

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
    type Response = Response<PortBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != DO_GET_PATH {
            let call = self.inner.call(request);
            return Box::pin(async move { Ok(call.await?.map(PortBody::Tonic)) });
        }
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let message = match read_unary(body, layer.limits.max_decoding_message_size).await {
                Ok(message) => message,
                Err(status) => return Ok(refused(status)),
            };
            let ticket = match Ticket::decode(message) {
                Ok(ticket) => ticket,
                Err(e) => {
                    return Ok(refused(Status::from(Error::invalid(format!(
                        "malformed Ticket: {e}"
                    )))));
                }
            };
            let request = tonic::Request::from_http(Request::from_parts(parts, ticket));
            match layer.service.do_get_frames(request).await {
                Ok(frames) => Ok(response(frames, layer.limits.max_encoding_message_size)),
                Err(status) => Ok(refused(status)),
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

/// A trailers-only response carrying `status`.
fn refused(status: Status) -> Response<PortBody> {
    status.into_http().map(PortBody::Tonic)
}

fn response(frames: MessageStream, max_message_size: usize) -> Response<PortBody> {
    let mut response = Response::new(PortBody::DoGet(FrameBody {
        frames,
        max_message_size,
        ending: None,
        done: false,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Most bytes of messages already waiting that are handed on as one piece of data.
const GATHER_BYTES: usize = 4 << 20;

/// A `DoGet` response body: the messages waiting when it is polled as one piece of data
/// (their chunks, not copied together: one HTTP/2 frame, one `writev`), then the status
/// as trailers.
pub struct FrameBody {
    frames: MessageStream,
    max_message_size: usize,
    /// The status that ends the stream, read while gathering messages: sent next.
    ending: Option<Status>,
    done: bool,
}

impl FrameBody {
    fn trailers(&mut self, status: &Status) -> BodyFrame<Chunks> {
        self.done = true;
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("13"));
        }
        BodyFrame::trailers(trailers)
    }

    /// The status that ends the stream when `frame` is a message too large to send.
    fn oversized(&self, frame: &Frame) -> Option<Status> {
        let size = frame.len() - 5;
        (size > self.max_message_size).then(|| {
            Status::from(Error::MessageTooLarge {
                message: format!(
                    "a result message of {size} bytes exceeds --max-encoding-message-size \
                     ({} bytes): raise it, or lower --max-flight-data-size",
                    self.max_message_size
                ),
            })
        })
    }
}

impl Body for FrameBody {
    type Data = Chunks;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Chunks>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(status) = this.ending.take() {
            return Poll::Ready(Some(Ok(this.trailers(&status))));
        }
        // Every message already waiting, up to GATHER_BYTES; the stream's end or error
        // after them is sent on the next poll.
        let mut chunks = Vec::new();
        let mut gathered = 0;
        while gathered < GATHER_BYTES {
            let ending = match Pin::new(&mut this.frames).poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => match this.oversized(&frame) {
                    // The query is dropped with the stream when the body is.
                    Some(status) => status,
                    None => {
                        gathered += frame.len();
                        chunks.extend(frame.into_chunks());
                        continue;
                    }
                },
                Poll::Ready(Some(Err(status))) => status,
                Poll::Ready(None) => Status::ok(""),
            };
            if gathered == 0 {
                return Poll::Ready(Some(Ok(this.trailers(&ending))));
            }
            this.ending = Some(ending);
            break;
        }
        let chunks = Chunks::new(chunks);
        if chunks.has_remaining() {
            Poll::Ready(Some(Ok(BodyFrame::data(chunks))))
        } else if gathered > 0 {
            // Only empty messages (none are made): poll again for the rest.
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Pending
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
