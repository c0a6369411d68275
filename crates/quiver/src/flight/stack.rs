//! The whole Flight port, built in one place: the server and the integration tests
//! serve the same stack.
//!
//! ```text
//!  http2::serve: hyper's HTTP/2 server (settings from the caller)
//!    └─ RpcMetricsLayer: every call counted and timed
//!         └─ DoGetRoute: every DoGet, answered with its own response body
//!              └─ tonic's routes: grpc.health.v1.Health, arrow.flight.protocol.FlightService
//! ```

use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;
use tower_layer::Layer;

use super::QuiverFlightService;
use super::route::{DoGetRoute, DoGetRouteLayer};
use crate::metrics::{RpcMetrics, RpcMetricsLayer, RpcMetricsService};

/// Largest gRPC messages the Flight port reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// A request message (`--max-decoding-message-size`).
    pub max_decoding_message_size: usize,
    /// A response message (`--max-encoding-message-size`).
    pub max_encoding_message_size: usize,
}

impl Default for MessageLimits {
    fn default() -> Self {
        Self {
            max_decoding_message_size: 4 * 1024 * 1024,
            max_encoding_message_size: 64 * 1024 * 1024,
        }
    }
}

/// The service of a Flight port: the layers of [`stack`] over its routes.
pub type FlightPort = RpcMetricsService<DoGetRoute<Routes>>;

/// The Flight port's layers over its services, and a health reporter with the Flight
/// service SERVING (gRPC health needs no credentials: probes and load balancers send
/// none). Served by [`super::http2::serve`].
pub async fn stack(
    service: Arc<QuiverFlightService>,
    rpc_metrics: Arc<RpcMetrics>,
    limits: MessageLimits,
) -> (FlightPort, HealthReporter) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<FlightServiceServer<QuiverFlightService>>()
        .await;
    let flight = FlightServiceServer::from_arc(Arc::clone(&service))
        .max_decoding_message_size(limits.max_decoding_message_size)
        .max_encoding_message_size(limits.max_encoding_message_size);
    let routes = Routes::new(health_service).add_service(flight).prepare();
    let port = RpcMetricsLayer::new(rpc_metrics)
        .layer(DoGetRouteLayer::new(service, limits).layer(routes));
    (port, health)
}
