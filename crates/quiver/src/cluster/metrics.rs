//! What crosses the cluster port and the connections to workers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tonic::Code;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::FLIGHT_URL_HEADER;

/// Task outcomes, the `outcome` label.
const OUTCOMES: [&str; 3] = ["ok", "error", "cancelled"];

/// `quiver_cluster_*`.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    tasks: IntCounterVec,
    sent: IntCounter,
    received: IntCounter,
    queries: IntGauge,
    refused: IntCounter,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        let tasks = IntCounterVec::new(
            Opts::new(
                "quiver_cluster_tasks_total",
                "Tasks of other nodes' queries this node ran, by outcome (cancelled: the \
                 coordinator went away first).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in OUTCOMES {
            tasks.with_label_values(&[outcome]);
        }
        Self {
            tasks,
            sent: IntCounter::new(
                "quiver_cluster_bytes_sent_total",
                "Bytes of gRPC messages this node sent to other nodes (task results as a \
                 worker, plans and requests as a coordinator).",
            )
            .expect("valid metric"),
            received: IntCounter::new(
                "quiver_cluster_bytes_received_total",
                "Bytes of gRPC messages this node received from other nodes.",
            )
            .expect("valid metric"),
            queries: IntGauge::new(
                "quiver_cluster_queries_active",
                "Other nodes' queries holding a slot on this node's worker port \
                 (--max-cluster-queries).",
            )
            .expect("valid metric"),
            refused: IntCounter::new(
                "quiver_cluster_queries_refused_total",
                "Other nodes' queries refused on this node's worker port (no slot \
                 free within --cluster-queue-timeout, or a message over \
                 --max-cluster-message-size).",
            )
            .expect("valid metric"),
        }
    }
}

impl ClusterMetrics {
    /// Adds the families to `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.tasks.clone()))?;
        registry.register(Box::new(self.sent.clone()))?;
        registry.register(Box::new(self.received.clone()))?;
        registry.register(Box::new(self.queries.clone()))?;
        registry.register(Box::new(self.refused.clone()))
    }

    /// Other nodes' queries admitted on this node's worker port.
    pub fn queries_active(&self) -> IntGauge {
        self.queries.clone()
    }

    /// Other nodes' queries refused on this node's worker port.
    pub fn queries_refused(&self) -> IntCounter {
        self.refused.clone()
    }

    /// `body`, its bytes counted as sent.
    pub(super) fn sending(&self, body: Body) -> Body {
        Body::new(Counted::new(body, self.sent.clone(), None))
    }

    /// `body`, its bytes counted as received.
    pub(super) fn receiving(&self, body: Body) -> Body {
        Body::new(Counted::new(body, self.received.clone(), None))
    }
}

/// Counts the worker port's traffic, and each task (a `CoordinatorChannel` call: one per
/// task a coordinator sends) by how its call ended; every answer says where the node's
/// Flight port is ([`FLIGHT_URL_HEADER`]) when it is known.
#[derive(Debug, Clone)]
pub struct ClusterMetricsLayer {
    metrics: Arc<ClusterMetrics>,
    flight_url: Option<HeaderValue>,
}

impl ClusterMetricsLayer {
    /// Counting into `metrics`.
    pub fn new(metrics: Arc<ClusterMetrics>) -> Self {
        Self {
            metrics,
            flight_url: None,
        }
    }

    /// Every answer also says where clients reach this node's Flight port.
    pub fn with_flight_url(mut self, url: &str) -> Self {
        self.flight_url = HeaderValue::from_str(url).ok();
        self
    }
}

impl<S> Layer<S> for ClusterMetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: Arc::clone(&self.metrics),
            flight_url: self.flight_url.clone(),
        }
    }
}

/// The service [`ClusterMetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<ClusterMetrics>,
    flight_url: Option<HeaderValue>,
}

impl<S> Service<Request<Body>> for Metered<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let task = request.uri().path().ends_with("/CoordinatorChannel");
        let metrics = Arc::clone(&self.metrics);
        let request = request.map(|body| metrics.receiving(body));
        let response = self.inner.call(request);
        let flight_url = self.flight_url.clone();
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(url) = flight_url {
                response.headers_mut().insert(FLIGHT_URL_HEADER, url);
            }
            let outcome = task.then(|| TaskOutcome {
                tasks: metrics.tasks.clone(),
                code: grpc_status(response.headers()),
            });
            Ok(response.map(|body| Body::new(Counted::new(body, metrics.sent.clone(), outcome))))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// A task's call, counted by its status when its response body is dropped.
struct TaskOutcome {
    tasks: IntCounterVec,
    code: Option<Code>,
}

impl Drop for TaskOutcome {
    fn drop(&mut self) {
        let outcome = match self.code {
            Some(Code::Ok) => "ok",
            Some(Code::Cancelled) | None => "cancelled",
            Some(_) => "error",
        };
        self.tasks.with_label_values(&[outcome]).inc();
    }
}

/// A body whose data bytes are added to a counter as they pass.
struct Counted {
    inner: Body,
    bytes: IntCounter,
    task: Option<TaskOutcome>,
}

impl Counted {
    fn new(inner: Body, bytes: IntCounter, task: Option<TaskOutcome>) -> Self {
        Self { inner, bytes, task }
    }
}

impl HttpBody for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let Some(data) = frame.data_ref() {
                this.bytes.inc_by(data.len() as u64);
            }
            if let (Some(task), Some(code)) = (
                this.task.as_mut(),
                frame.trailers_ref().and_then(grpc_status),
            ) {
                task.code = Some(code);
            }
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
