//! What callers ask of the engine, and what it answers besides results.

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use std::time::Duration;

use super::caller::Caller;
use super::distributed::Distribution;
use super::slice::{Pieces, Slice};

/// A query to run, and on whose behalf.
#[derive(Debug, Clone, Default)]
pub struct QueryRequest {
    /// The statement.
    pub sql: String,
    /// The id from a `GetFlightInfo` ticket; a new one is made when `None`.
    pub id: Option<String>,
    /// On whose behalf: the tables they may read, their deadline, their origin.
    pub caller: Caller,
    /// A time limit the ticket carries (`QueryTicket.timeout_ms`).
    pub ticket_timeout: Option<Duration>,
    /// How the ticket asks to be planned in a cluster (`QueryTicket.distribution`);
    /// `None`: the server's `--distributed`.
    pub distribution: Option<Distribution>,
    /// The part of the result to return (`QueryTicket.slice_*`); `None`: all of it.
    pub slice: Option<Slice>,
    /// Values for the placeholders (`?` or `$1..$n`), cast to the types the statement
    /// needs; empty when it has none.
    pub params: Vec<ScalarValue>,
    /// Run the query even if the result cache holds its answer, and keep none
    /// (`QueryTicket.no_result_cache`).
    pub no_result_cache: bool,
}

/// What a `FlightInfo` says of a statement's result.
#[derive(Debug, Clone)]
pub struct Described {
    /// The result schema.
    pub schema: SchemaRef,
    /// Whether the statement orders its result (`ORDER BY`).
    pub ordered: bool,
    /// Into how many slices (`count`, within `--endpoints-per-query`) its result splits,
    /// and their fingerprint; `None`: one endpoint.
    pub slices: Option<Pieces>,
}

/// A table or view clients can query, for metadata calls.
#[derive(Debug, Clone)]
pub struct TableListing {
    /// Catalog name (`datafusion`).
    pub catalog: String,
    /// Schema name (`public` for Quiver's tables).
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `TABLE` or `VIEW`, as Flight SQL and JDBC name them.
    pub table_type: &'static str,
    /// Its columns.
    pub arrow_schema: SchemaRef,
}

/// What a prepared statement returns and takes.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The result schema.
    pub schema: SchemaRef,
    /// The parameter types, `$1` first; `None` where the statement does not say.
    pub params: Vec<Option<DataType>>,
}

impl From<String> for QueryRequest {
    fn from(sql: String) -> Self {
        Self {
            sql,
            ..Self::default()
        }
    }
}

impl From<&str> for QueryRequest {
    fn from(sql: &str) -> Self {
        sql.to_string().into()
    }
}

/// A fresh query id: 64 random bits, hex. Not guessable, so one user cannot cancel
/// another's query by counting (and with authentication on, only its user may).
pub fn new_query_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
