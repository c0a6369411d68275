//! Quiver: SQL over Hive-partitioned Parquet directories, served over Arrow Flight.
//!
//! ```text
//!  client (pyarrow.flight, ADBC, JDBC)
//!     │ gRPC / HTTP/2
//!     ▼
//!  flight::QuiverFlightService ── ticket::decode ──▶ SQL text | Quiver ticket | Flight SQL
//!     │ DoGet / GetFlightInfo / GetSchema / ListFlights / DoAction
//!     ▼
//!  query::QueryEngine ── read-only guard ── plan (CPU runtime) ── execute_stream()
//!     │                                                              │
//!     ▼                                                              ▼
//!  catalog::Catalog ── HiveTable snapshots ──▶ DataFusion Parquet scan (pruning, pushdown)
//!                                                                    │
//!  response stream ◀── bounded channel ◀── FlightDataEncoder ◀── expand views
//! ```
//!
//! The library holds everything but process glue: the `quiver` binary
//! (`crates/quiver-server`) parses flags, binds sockets and wires these pieces together.
//! Dependencies point one way: `flight -> query -> catalog`, all of them on `wire` (the
//! shape batches take on their way to the network).

#![warn(missing_docs)]

pub mod audit;
pub mod catalog;
pub mod demo;
pub mod error;
pub mod flight;
pub mod io;
pub mod metrics;
pub mod query;
pub mod wire;

pub use error::{Error, Result};
