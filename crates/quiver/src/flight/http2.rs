//! The Flight port's HTTP/2 server: hyper's, each connection in a task of its own.
//!
//! ```text
//!  accepted connections ─▶ serve ─▶ one task per connection: hyper's HTTP/2 ─▶ [`FlightPort`]
//!                                   (until it closes, the server shuts down, or it ages out)
//! ```
//!
//! tonic's own server fixes a response body's data to `Bytes`; serving the port through
//! hyper lets `DoGet` hand h2 each message as the list of buffers it is, written as one
//! DATA frame with one `writev` (see [`super::body`]). What tonic's server did around a
//! connection is done here: the HTTP/2 settings, the peer (tonic's `Connected`) in every
//! request's extensions, graceful shutdown, and a maximum connection age.

use std::fmt::Display;
use std::pin::pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tower::ServiceExt;

use super::FlightPort;

/// HTTP/2 settings of the Flight port (the `--http2-*` and `--max-connection-age` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Settings {
    /// Initial flow-control window of each stream.
    pub stream_window: u32,
    /// Initial flow-control window of each connection.
    pub connection_window: u32,
    /// Size the windows by measuring bandwidth-delay (overrides the two above).
    pub adaptive_window: bool,
    /// Largest frame the server accepts.
    pub max_frame_size: u32,
    /// Concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Interval of keepalive pings on idle connections; `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    /// A connection whose ping is not answered within this is closed.
    pub keepalive_timeout: Duration,
    /// Connections older than this are sent a GOAWAY; `None`: never.
    pub max_connection_age: Option<Duration>,
    /// After the GOAWAY of an aged connection, how long its calls may still run.
    pub max_connection_age_grace: Duration,
}

impl Default for Http2Settings {
    /// The defaults of `quiver serve`.
    fn default() -> Self {
        Self {
            stream_window: 1 << 20,
            connection_window: 2 << 20,
            adaptive_window: false,
            max_frame_size: 16 << 10,
            max_concurrent_streams: 256,
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(300),
        }
    }
}

/// Serves `port` on every connection of `incoming` until `shutdown`, then stops accepting,
/// sends every connection a GOAWAY and returns once all have closed (a caller that
/// cannot wait that long stops waiting: see `quiver serve`'s shutdown grace).
pub async fn serve<I, IO, E>(
    incoming: I,
    port: FlightPort,
    settings: &Http2Settings,
    shutdown: CancellationToken,
) where
    I: Stream<Item = Result<IO, E>>,
    E: Display,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .adaptive_window(settings.adaptive_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout);
    let connections = TaskTracker::new();
    // Boxed to be dropped (and the listening socket with it) before the wait below.
    let mut incoming = Box::pin(incoming);
    loop {
        let io = tokio::select! {
            () = shutdown.cancelled() => break,
            io = incoming.next() => match io {
                Some(Ok(io)) => io,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection not accepted");
                    continue;
                }
                None => break,
            },
        };
        // Every request carries the connection's peer, as tonic's server puts it there.
        let peer = io.connect_info();
        let port = port.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(tonic::body::Body::new);
            request.extensions_mut().insert(peer.clone());
            port.clone().oneshot(request)
        });
        let connection = builder.serve_connection(TokioIo::new(io), service);
        let shutdown = shutdown.clone();
        let (age, grace) = (
            settings.max_connection_age,
            settings.max_connection_age_grace,
        );
        connections.spawn(async move {
            let mut connection = pin!(connection);
            let aged = async {
                match age {
                    Some(age) => tokio::time::sleep(age).await,
                    None => std::future::pending().await,
                }
            };
            let grace = tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "connection failed");
                    }
                    return;
                }
                // Shutting down: as long as `quiver serve` waits.
                () = shutdown.cancelled() => None,
                () = aged => Some(grace),
            };
            // GOAWAY: no new calls; the connection closes once its calls end.
            connection.as_mut().graceful_shutdown();
            let closed = async {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection failed while closing");
                }
            };
            match grace {
                None => closed.await,
                Some(grace) => {
                    if tokio::time::timeout(grace, closed).await.is_err() {
                        tracing::debug!("aged connection closed with calls still running");
                    }
                }
            }
        });
    }
    drop(incoming);
    connections.close();
    connections.wait().await;
}
