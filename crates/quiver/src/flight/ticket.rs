//! What a ticket or a CMD descriptor means.
//!
//! Three encodings share the same bytes, told apart in this order:
//! 1. a protobuf `Any` whose type URL is a Flight SQL command
//!    (`type.googleapis.com/arrow.flight.protocol.sql.*`): a Flight SQL request;
//! 2. a protobuf `Any` whose type URL is [`QUIVER_TICKET_TYPE_URL`]: Quiver's own
//!    versioned ticket (see `proto/quiver/v1/ticket.proto`), which `GetFlightInfo` hands out;
//! 3. anything else: UTF-8 SQL text, as `flight.Ticket(b"SELECT ...")` sends.
//!
//! Plain text rarely decodes as an `Any`, and when it does (an empty ticket, some short
//! strings) the type URL is not one of ours, so it falls through to SQL.

use arrow_flight::sql::Any;
use bytes::Bytes;
use prost::Message;

use crate::error::{Error, Result};

/// Type URL prefix of every Flight SQL command message.
pub const FLIGHT_SQL_TYPE_URL_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// Type URL of [`QuiverTicket`].
pub const QUIVER_TICKET_TYPE_URL: &str = "type.googleapis.com/quiver.v1.Ticket";

/// The current [`QuiverTicket::version`].
pub const QUIVER_TICKET_VERSION: u32 = 1;

/// Longest SQL text accepted, in bytes.
pub const MAX_SQL_BYTES: usize = 1024 * 1024;

/// Quiver's ticket, mirrored in `proto/quiver/v1/ticket.proto`.
#[derive(Clone, PartialEq, Message)]
pub struct QuiverTicket {
    /// Format version; a server rejects versions it does not know.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The statement to run.
    #[prost(string, tag = "2")]
    pub sql: String,
    /// Set by `GetFlightInfo`: the query's id while it runs, so that `CancelFlightInfo`
    /// (and `cancel-query`) can reach it.
    #[prost(string, optional, tag = "3")]
    pub query_id: Option<String>,
}

impl QuiverTicket {
    /// A current-version ticket for `sql`.
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            version: QUIVER_TICKET_VERSION,
            sql: sql.into(),
            query_id: None,
        }
    }

    /// The same ticket, naming the query it will start.
    pub fn with_query_id(mut self, id: impl Into<String>) -> Self {
        self.query_id = Some(id.into());
        self
    }

    /// Encodes as an `Any` with [`QUIVER_TICKET_TYPE_URL`].
    pub fn encode_any(&self) -> Bytes {
        Any {
            type_url: QUIVER_TICKET_TYPE_URL.to_string(),
            value: self.encode_to_vec().into(),
        }
        .encode_to_vec()
        .into()
    }
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run this SQL.
    Sql(String),
    /// Run this SQL as the query with this id (a ticket from `GetFlightInfo`).
    Query {
        /// The statement.
        sql: String,
        /// The id it runs under.
        query_id: String,
    },
    /// A Flight SQL command, still packed.
    FlightSql(Any),
}

/// Decodes ticket or CMD descriptor bytes.
pub fn decode(bytes: &[u8]) -> Result<Command> {
    if bytes.is_empty() {
        return Err(Error::invalid(
            "the ticket is empty: send SQL text, e.g. Ticket(b\"SELECT 1\")",
        ));
    }
    if let Ok(any) = Any::decode(bytes) {
        if any.type_url.starts_with(FLIGHT_SQL_TYPE_URL_PREFIX) {
            return Ok(Command::FlightSql(any));
        }
        if any.type_url == QUIVER_TICKET_TYPE_URL {
            let ticket = QuiverTicket::decode(any.value)
                .map_err(|e| Error::invalid(format!("malformed Quiver ticket: {e}")))?;
            if ticket.version != QUIVER_TICKET_VERSION {
                return Err(Error::invalid(format!(
                    "Quiver ticket version {} is not supported (this server reads version {QUIVER_TICKET_VERSION}); \
                     ask GetFlightInfo for a new ticket",
                    ticket.version
                )));
            }
            let command = sql(ticket.sql.into_bytes())?;
            return Ok(match (command, ticket.query_id) {
                (Command::Sql(sql), Some(query_id)) => Command::Query { sql, query_id },
                (command, _) => command,
            });
        }
    }
    sql(bytes.to_vec())
}

fn sql(bytes: Vec<u8>) -> Result<Command> {
    if bytes.len() > MAX_SQL_BYTES {
        return Err(Error::invalid(format!(
            "the SQL text is {} bytes; the limit is {MAX_SQL_BYTES}",
            bytes.len()
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::invalid(format!(
            "the ticket is neither a Flight SQL command nor UTF-8 SQL text (invalid UTF-8 at byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(Error::invalid("the SQL text is blank: send a query"));
    }
    Ok(Command::Sql(text))
}

/// `SELECT * FROM "table"`, quoting the name.
pub fn select_all(table: &str) -> String {
    format!("SELECT * FROM \"{}\"", table.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_sql() {
        assert_eq!(
            decode(b"SELECT 1").unwrap(),
            Command::Sql("SELECT 1".into())
        );
        // Short texts that happen to be valid protobuf still read as SQL.
        assert_eq!(decode(b"\n\x00").unwrap(), Command::Sql("\n\u{0}".into()));
    }

    #[test]
    fn quiver_ticket_round_trips() {
        let bytes = QuiverTicket::new("SELECT 2").encode_any();
        assert_eq!(decode(&bytes).unwrap(), Command::Sql("SELECT 2".into()));
        let bytes = QuiverTicket::new("SELECT 3")
            .with_query_id("00ff")
            .encode_any();
        assert_eq!(
            decode(&bytes).unwrap(),
            Command::Query {
                sql: "SELECT 3".into(),
                query_id: "00ff".into()
            }
        );
        let future = Any {
            type_url: QUIVER_TICKET_TYPE_URL.into(),
            value: QuiverTicket {
                version: 99,
                sql: "x".into(),
                query_id: None,
            }
            .encode_to_vec()
            .into(),
        }
        .encode_to_vec();
        assert!(
            decode(&future)
                .unwrap_err()
                .to_string()
                .contains("version 99")
        );
    }

    #[test]
    fn flight_sql_is_recognised() {
        let any = Any {
            type_url: format!("{FLIGHT_SQL_TYPE_URL_PREFIX}CommandStatementQuery"),
            value: Bytes::from_static(b""),
        };
        assert!(matches!(
            decode(&any.encode_to_vec()).unwrap(),
            Command::FlightSql(_)
        ));
    }

    #[test]
    fn garbage_is_invalid() {
        for bad in [&b""[..], b"   ", b"\xff\xfe\xfd"] {
            let e = decode(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
        assert_eq!(select_all("a\"b"), "SELECT * FROM \"a\"\"b\"");
    }
}
