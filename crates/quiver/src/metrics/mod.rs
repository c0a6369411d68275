//! Prometheus metrics: what Quiver does, and the memory it holds.
//!
//! Nothing here uses a global registry. The server creates one [`prometheus::Registry`]
//! at start-up and passes it to each part that exports metrics:
//!
//! ```text
//!  RpcMetricsLayer (rpc.rs)      every gRPC call: method, status code, duration, in flight,
//!                                streams the client abandoned
//!  QueryMetrics (this file)      every query: outcome, planning, first batch, duration,
//!                                rows / batches / bytes sent, table scans
//!  query::collector              read at scrape time: memory pool, spill, scan totals,
//!                                memory maps, catalog (it reads the engine's own figures,
//!                                so it lives with the engine; this module depends on
//!                                nothing but `error`)
//! ```
//!
//! Label values come from bounded sets only (RPC method, gRPC code, outcome, table
//! names from the catalog), never from SQL text, user input or client addresses, and
//! every label value known at start-up is initialised then, so that every family is in
//! the first scrape.

mod rpc;

pub use rpc::{RpcMetrics, RpcMetricsLayer, RpcMetricsService};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::error::{Error, Result};

/// Latency buckets, in seconds: 1 ms to 10 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

pub use crate::error::Outcome;

/// Query counters and histograms, updated as queries run.
///
/// Created by the engine before any registry exists (tests run engines without one);
/// [`QueryMetrics::register`] adds them to the server's registry.
#[derive(Debug, Clone)]
pub struct QueryMetrics {
    /// `quiver_queries_total{outcome}`
    pub queries: IntCounterVec,
    /// `quiver_queries_active`: planning or streaming now.
    pub active: IntGauge,
    /// `quiver_queries_queued`: waiting for admission.
    pub queued: IntGauge,
    /// `quiver_query_planning_seconds`
    pub planning: Histogram,
    /// `quiver_query_first_batch_seconds`: from the request to the first batch sent.
    pub first_batch: Histogram,
    /// `quiver_query_duration_seconds`: from the request to the last message.
    pub duration: Histogram,
    /// `quiver_query_rows_sent_total`
    pub rows_sent: IntCounter,
    /// `quiver_query_batches_sent_total`
    pub batches_sent: IntCounter,
    /// `quiver_query_bytes_sent_total`: Flight message bytes (IPC header, body, metadata).
    pub bytes_sent: IntCounter,
    /// `quiver_table_scans_total{table}`
    pub table_scans: IntCounterVec,
}

impl QueryMetrics {
    /// The families, unregistered, with every outcome and each of `tables` initialised.
    pub fn new<'a>(tables: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        };
        let metrics = Self {
            queries: IntCounterVec::new(
                Opts::new("quiver_queries_total", "Queries by how they ended."),
                &["outcome"],
            )?,
            active: IntGauge::new(
                "quiver_queries_active",
                "Queries planning or streaming results now.",
            )?,
            queued: IntGauge::new("quiver_queries_queued", "Queries waiting for admission.")?,
            planning: histogram(
                "quiver_query_planning_seconds",
                "Time to parse, check and plan a query.",
            )?,
            first_batch: histogram(
                "quiver_query_first_batch_seconds",
                "Time from a query's arrival to its first record batch sent.",
            )?,
            duration: histogram(
                "quiver_query_duration_seconds",
                "Time from a query's arrival to its end, however it ended.",
            )?,
            rows_sent: IntCounter::new(
                "quiver_query_rows_sent_total",
                "Result rows sent to clients.",
            )?,
            batches_sent: IntCounter::new(
                "quiver_query_batches_sent_total",
                "Record batch messages sent to clients.",
            )?,
            bytes_sent: IntCounter::new(
                "quiver_query_bytes_sent_total",
                "Bytes of Flight messages sent to clients (IPC headers, bodies, metadata).",
            )?,
            table_scans: IntCounterVec::new(
                Opts::new("quiver_table_scans_total", "Scans of each table planned."),
                &["table"],
            )?,
        };
        for outcome in Outcome::ALL {
            metrics.queries.with_label_values(&[outcome.as_str()]);
        }
        for table in tables {
            metrics.table_scans.with_label_values(&[table]);
        }
        Ok(metrics)
    }

    /// Adds every family to `registry`.
    pub fn register(&self, registry: &Registry) -> Result<()> {
        registry.register(Box::new(self.queries.clone()))?;
        registry.register(Box::new(self.active.clone()))?;
        registry.register(Box::new(self.queued.clone()))?;
        registry.register(Box::new(self.planning.clone()))?;
        registry.register(Box::new(self.first_batch.clone()))?;
        registry.register(Box::new(self.duration.clone()))?;
        registry.register(Box::new(self.rows_sent.clone()))?;
        registry.register(Box::new(self.batches_sent.clone()))?;
        registry.register(Box::new(self.bytes_sent.clone()))?;
        registry.register(Box::new(self.table_scans.clone()))?;
        Ok(())
    }
}

impl From<prometheus::Error> for Error {
    fn from(e: prometheus::Error) -> Self {
        Error::Internal(format!("metrics: {e}"))
    }
}
