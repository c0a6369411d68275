//! Per-call gRPC metrics, as a tower layer between tonic's HTTP/2 server and its routes.
//!
//! At the HTTP level one layer sees every call of every service, including calls that
//! fail authentication, unknown methods and health checks. A call's gRPC status is in
//! the response headers (a "trailers-only" response: errors before the first message)
//! or in the trailers after the last message; the call is recorded when the response
//! body is dropped. A body dropped before any status was seen means the client went
//! away mid-call (cancelled, reset the stream, or disconnected): it is counted in
//! `quiver_rpc_streams_aborted_total` and recorded with code `CANCELLED`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;

use super::LATENCY_BUCKETS;
use crate::error::Result;

/// Flight RPCs by their method name; the health service's two; anything else.
const METHODS: &[(&str, &str)] = &[
    (
        "/arrow.flight.protocol.FlightService/Handshake",
        "Handshake",
    ),
    (
        "/arrow.flight.protocol.FlightService/ListFlights",
        "ListFlights",
    ),
    (
        "/arrow.flight.protocol.FlightService/GetFlightInfo",
        "GetFlightInfo",
    ),
    (
        "/arrow.flight.protocol.FlightService/PollFlightInfo",
        "PollFlightInfo",
    ),
    (
        "/arrow.flight.protocol.FlightService/GetSchema",
        "GetSchema",
    ),
    ("/arrow.flight.protocol.FlightService/DoGet", "DoGet"),
    ("/arrow.flight.protocol.FlightService/DoPut", "DoPut"),
    (
        "/arrow.flight.protocol.FlightService/DoExchange",
        "DoExchange",
    ),
    ("/arrow.flight.protocol.FlightService/DoAction", "DoAction"),
    (
        "/arrow.flight.protocol.FlightService/ListActions",
        "ListActions",
    ),
    ("/grpc.health.v1.Health/Check", "Health.Check"),
    ("/grpc.health.v1.Health/Watch", "Health.Watch"),
];

/// The label of calls to any other path.
const OTHER_METHOD: &str = "other";

/// The `method` label of a request path: a fixed set, whatever a client sends.
fn method_label(path: &str) -> &'static str {
    METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(OTHER_METHOD, |(_, label)| label)
}

/// Every gRPC status code, for initialising label values.
const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The `code` label: the status code's name in the gRPC specification.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The `grpc-status` in response headers or trailers.
fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// The RPC families.
#[derive(Debug)]
pub struct RpcMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    aborted: IntCounterVec,
}

impl RpcMetrics {
    /// Registers the families in `registry`, with every method (and every code of each)
    /// initialised.
    pub fn register(registry: &Registry) -> Result<Arc<Self>> {
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "quiver_rpc_requests_total",
                    "gRPC calls finished, by method and status code.",
                ),
                &["method", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "quiver_rpc_duration_seconds",
                    "gRPC call duration, from the request to the end of the response stream.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["method"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new("quiver_rpc_in_flight", "gRPC calls in progress."),
                &["method"],
            )?,
            aborted: IntCounterVec::new(
                Opts::new(
                    "quiver_rpc_streams_aborted_total",
                    "gRPC calls the client abandoned before the end (cancel, reset, disconnect).",
                ),
                &["method"],
            )?,
        };
        let methods = METHODS.iter().map(|(_, m)| *m).chain([OTHER_METHOD]);
        for method in methods {
            for code in CODES {
                metrics
                    .requests
                    .with_label_values(&[method, code_label(code)]);
            }
            metrics.duration.with_label_values(&[method]);
            metrics.in_flight.with_label_values(&[method]);
            metrics.aborted.with_label_values(&[method]);
        }
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        registry.register(Box::new(metrics.aborted.clone()))?;
        Ok(Arc::new(metrics))
    }
}

/// One call, from the request until its response body is dropped.
struct Call {
    metrics: Arc<RpcMetrics>,
    method: &'static str,
    started: Instant,
    code: Option<Code>,
}

impl Call {
    fn start(metrics: Arc<RpcMetrics>, method: &'static str) -> Self {
        metrics.in_flight.with_label_values(&[method]).inc();
        Self {
            metrics,
            method,
            started: Instant::now(),
            code: None,
        }
    }

    /// The call's status is known; it is recorded when the call is dropped.
    fn ended(&mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.duration
            .with_label_values(&[self.method])
            .observe(self.started.elapsed().as_secs_f64());
        let code = self.code.unwrap_or_else(|| {
            m.aborted.with_label_values(&[self.method]).inc();
            Code::Cancelled
        });
        m.requests
            .with_label_values(&[self.method, code_label(code)])
            .inc();
        // Last: a scrape that sees the call gone also sees it counted.
        m.in_flight.with_label_values(&[self.method]).dec();
    }
}

/// Records every call of the service it wraps in [`RpcMetrics`].
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
}

impl RpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<RpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service [`RpcMetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S, B, ResBody> Service<Request<B>> for RpcMetricsService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut call = Call::start(
            Arc::clone(&self.metrics),
            method_label(request.uri().path()),
        );
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(e) => {
                    call.ended(Code::Unknown);
                    return Err(e);
                }
            };
            // A trailers-only response carries its status in the headers.
            call.code = grpc_status(response.headers());
            Ok(response.map(|body| MeteredBody { inner: body, call }))
        })
    }
}

/// A response body that records its call when dropped.
pub struct MeteredBody<B> {
    inner: B,
    call: Call,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.ended(code);
                }
            }
            // The server failed to produce the body; the client sees a reset stream.
            Some(Err(_)) => this.call.ended(Code::Internal),
            None => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_a_fixed_set_whatever_the_path() {
        assert_eq!(
            method_label("/arrow.flight.protocol.FlightService/DoGet"),
            "DoGet"
        );
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Health.Check");
        assert_eq!(method_label("/SELECT * FROM secrets/x"), OTHER_METHOD);
        assert_eq!(
            method_label("/arrow.flight.protocol.FlightService/DoGetX"),
            OTHER_METHOD
        );
        let names: std::collections::HashSet<_> = CODES.iter().map(|c| code_label(*c)).collect();
        assert_eq!(names.len(), 17);
        for (i, code) in CODES.iter().enumerate() {
            assert_eq!(*code as usize, i, "CODES is in numeric order");
        }
    }

    #[test]
    fn status_comes_from_headers_or_trailers() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(Code::NotFound));
        headers.insert("grpc-status", "junk".parse().unwrap());
        assert_eq!(grpc_status(&headers), None);
    }
}
