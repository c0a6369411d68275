//! The zero-copy `DoGet` route: a tower layer in front of tonic that serves query
//! results as chains of shared buffers ([`super::frames`]).
//!
//! ```text
//!  HTTP/2 request ── RpcMetricsLayer ── ZeroCopyDoGetLayer ──┬─ DoGet of a query ──▶ do_get_frames
//!                                                            │   (response body: Frame chunks, then trailers)
//!                                                            └─ everything else ──▶ tonic's routes
//! ```
//!
//! tonic's codec writes each response message into one contiguous buffer, so the
//! `DoGet` of a query is answered here instead: the request (a unary `Ticket`) is
//! decoded, authenticated and run exactly as tonic's route would, and the response
//! body yields each message's chunks as HTTP/2 data, ending with the gRPC status in the
//! trailers. Tickets this path does not serve (Flight SQL metadata, prepared statements,
//! compressed results) are handed to tonic unchanged.

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

use super::QuiverFlightService;
use super::do_get::MessageStream;
use crate::wire::frames::Frame;

/// The gRPC path of `DoGet`.
const DO_GET_PATH: &str = "/arrow.flight.protocol.FlightService/DoGet";

/// Routes query `DoGet`s to the zero-copy send path.
#[derive(Debug, Clone)]
pub struct ZeroCopyDoGetLayer {
    service: Arc<QuiverFlightService>,
    max_decoding_message_size: usize,
    max_encoding_message_size: usize,
    enabled: bool,
}

impl ZeroCopyDoGetLayer {
    /// A layer serving `service`'s query results, with the same message size limits
    /// as its tonic server.
    pub fn new(
        service: Arc<QuiverFlightService>,
        max_decoding_message_size: usize,
        max_encoding_message_size: usize,
    ) -> Self {
        Self {
            service,
            max_decoding_message_size,
            max_encoding_message_size,
            enabled: true,
        }
    }

    /// Off: every call goes to tonic (`--send-path standard`, for comparison).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }
}

impl<S> Layer<S> for ZeroCopyDoGetLayer {
    type Service = ZeroCopyDoGet<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ZeroCopyDoGet {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ZeroCopyDoGetLayer`] makes.
#[derive(Debug, Clone)]
pub struct ZeroCopyDoGet<S> {
    inner: S,
    layer: ZeroCopyDoGetLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<tonic::body::Body>> for ZeroCopyDoGet<S>
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
        if !self.layer.enabled || request.uri().path() != DO_GET_PATH {
            return Box::pin(self.inner.call(request));
        }
        // The ready inner service takes this call; a clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let message = match read_unary(body, layer.max_decoding_message_size).await {
                Ok(message) => message,
                Err(status) => return Ok(status.into_http()),
            };
            let ticket = match Ticket::decode(message.clone()) {
                Ok(ticket) => ticket,
                Err(e) => {
                    return Ok(
                        Status::invalid_argument(format!("malformed Ticket: {e}")).into_http()
                    );
                }
            };
            let tonic_request =
                tonic::Request::from_http(Request::from_parts(parts.clone(), ticket));
            match layer.service.do_get_frames(tonic_request).await {
                Ok(Some(frames)) => Ok(response(frames, layer.max_encoding_message_size)),
                Ok(None) => {
                    // Not ours to serve: tonic gets the request as it came.
                    let body =
                        tonic::body::Body::new(http_body_util::Full::new(grpc_frame(&message)));
                    inner.call(Request::from_parts(parts, body)).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The one message of a unary gRPC request body.
async fn read_unary(mut body: tonic::body::Body, max: usize) -> Result<Bytes, Status> {
    let mut buf = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Status::internal(format!("reading the request: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max.saturating_add(5) {
                return Err(Status::out_of_range(format!(
                    "the request message is too large: over {max} bytes, the limit of \
                     --max-decoding-message-size"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    if buf.len() < 5 {
        return Err(Status::invalid_argument("DoGet needs one Ticket message"));
    }
    let compressed = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if compressed != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not supported: send the Ticket uncompressed",
        ));
    }
    if buf.len() != 5 + len {
        return Err(Status::invalid_argument(
            "DoGet needs exactly one Ticket message",
        ));
    }
    buf.advance(5);
    Ok(buf.freeze())
}

/// `message` behind a 5-byte gRPC prefix.
fn grpc_frame(message: &Bytes) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(message.len() as u32).to_be_bytes());
    buf.extend_from_slice(message);
    buf.freeze()
}

fn response(frames: MessageStream<Frame>, max_message_size: usize) -> Response<tonic::body::Body> {
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
    frames: MessageStream<Frame>,
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
                    let status = Status::out_of_range(format!(
                        "a result message of {} bytes exceeds --max-encoding-message-size \
                         ({} bytes): raise it, or lower --max-flight-data-size",
                        frame.len() - 5,
                        this.max_message_size
                    ));
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
