//! Quiver: SQL over Hive-partitioned Parquet directories, served over Arrow Flight.
//!
//! ```text
//!  client (pyarrow.flight, ADBC, JDBC)
//!     │ gRPC / HTTP/2: flight::serve (hyper)
//!     ▼
//!  flight::stack: RpcMetricsLayer ─▶ route::DoGetRoute (every DoGet) ─▶ tonic's routes
//!     │ QuiverFlightService: caller() ─▶ ticket::decode ─▶ do_get::serve | the other RPCs
//!     ▼
//!  query::QueryEngine ── limits, read-only guard, the caller's tables ── plan (CPU runtime)
//!     │                                                              │ execute_stream()
//!     ▼                                                              ▼
//!  catalog::Catalog ── HiveTable snapshots ──▶ DataFusion Parquet scan (io: memory maps)
//!                                                                    │
//!  response body ◀── bounded channel ◀── wire::frames (zero-copy) or arrow-flight + prost
//! ```
//!
//! The library holds everything but process glue: the `quiver` binary
//! (`crates/quiver-server`) parses flags, binds sockets and serves [`flight::stack`]
//! with [`flight::serve`].
//! Dependencies point one way: `flight -> query -> catalog -> {io, wire}`, and all of them
//! on `metrics`, `audit` and `error` (docs/architecture.md).

#![warn(missing_docs)]

pub mod audit;
pub mod catalog;
pub mod cluster;
pub mod demo;
pub mod error;
pub mod flight;
pub mod io;
pub mod metrics;
pub mod query;
pub mod wire;

pub use error::{Error, Result};
