//! What a ticket or a CMD descriptor means.
//!
//! Three encodings share the same bytes (docs/protocol.md), told apart in this order:
//! 1. a protobuf `Any` whose type URL is a Flight SQL message
//!    (`type.googleapis.com/arrow.flight.protocol.sql.*`): a Flight SQL request;
//! 2. a protobuf `Any` whose type URL is [`QUERY_TICKET_TYPE_URL`]: Quiver's own
//!    versioned [`QueryTicket`] (`proto/quiver/v1/ticket.proto`);
//! 3. anything else: UTF-8 SQL text, as `flight.Ticket(b"SELECT ...")` sends.
//!
//! SQL text can happen to decode as an `Any` (an empty ticket, `EXPLAIN ...`, short
//! strings), but then its type URL is empty or holds spaces. An `Any` whose type URL
//! looks like one (`host/package.Message`) but is neither of ours is refused with
//! `InvalidArgument` rather than run as SQL.

use std::sync::Arc;
use std::time::Duration;

use arrow_flight::sql::{self, Any};
use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::reader::StreamDecoder;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::common::ScalarValue;
use prost::Message;

use crate::error::{Error, Result};
use crate::query;

/// Code generated from `proto/quiver/v1/*.proto` by `proto/codegen`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!("generated/quiver.v1.rs");
}

pub use proto::{Compression, Distribution, QueryTicket};

/// Type URL prefix of every Flight SQL command message.
pub const FLIGHT_SQL_TYPE_URL_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// Type URL of [`QueryTicket`].
pub const QUERY_TICKET_TYPE_URL: &str = "type.googleapis.com/quiver.v1.QueryTicket";

/// The current [`QueryTicket::version`].
pub const QUERY_TICKET_VERSION: u32 = 1;

impl QueryTicket {
    /// A current-version ticket for `sql`.
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            version: QUERY_TICKET_VERSION,
            sql: sql.into(),
            ..Self::default()
        }
    }

    /// The same ticket, naming the query it will start.
    pub fn with_query_id(mut self, id: impl Into<String>) -> Self {
        self.query_id = Some(id.into());
        self
    }

    /// Encodes as an `Any` with [`QUERY_TICKET_TYPE_URL`].
    pub fn encode_any(&self) -> Bytes {
        Any {
            type_url: QUERY_TICKET_TYPE_URL.to_string(),
            value: self.encode_to_vec().into(),
        }
        .encode_to_vec()
        .into()
    }

    /// The ticket's own time limit.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }

    /// The result compression the ticket asks for: `None` for the server's default,
    /// `Some(None)` for uncompressed.
    pub fn result_compression(&self) -> Result<Option<Option<CompressionType>>> {
        let Some(value) = self.compression else {
            return Ok(None);
        };
        match Compression::try_from(value) {
            Ok(Compression::Unspecified) => Ok(None),
            Ok(Compression::None) => Ok(Some(None)),
            Ok(Compression::Lz4Frame) => Ok(Some(Some(CompressionType::LZ4_FRAME))),
            Ok(Compression::Zstd) => Ok(Some(Some(CompressionType::ZSTD))),
            Err(_) => Err(Error::invalid(format!(
                "the ticket's compression {value} is unknown: use COMPRESSION_NONE (1), \
                 COMPRESSION_LZ4_FRAME (2) or COMPRESSION_ZSTD (3)"
            ))),
        }
    }

    /// How the ticket asks the query to be planned in a cluster: `None` for the server's
    /// default.
    pub fn requested_distribution(&self) -> Result<Option<query::Distribution>> {
        let Some(value) = self.distribution else {
            return Ok(None);
        };
        match Distribution::try_from(value) {
            Ok(Distribution::Unspecified) => Ok(None),
            Ok(Distribution::Auto) => Ok(Some(query::Distribution::Auto)),
            Ok(Distribution::On) => Ok(Some(query::Distribution::On)),
            Ok(Distribution::Off) => Ok(Some(query::Distribution::Off)),
            Err(_) => Err(Error::invalid(format!(
                "the ticket's distribution {value} is unknown: use DISTRIBUTION_AUTO (1), \
                 DISTRIBUTION_ON (2) or DISTRIBUTION_OFF (3)"
            ))),
        }
    }

    /// The part of the result the ticket asks for: `None` for all of it.
    pub fn requested_slice(&self) -> Result<Option<query::Slice>> {
        match (self.slice_index, self.slice_count) {
            (None, None) => Ok(None),
            (Some(index), Some(count)) => Ok(Some(query::Slice::checked(
                index,
                count,
                self.slice_fingerprint.unwrap_or_default(),
            )?)),
            _ => Err(Error::invalid(
                "the ticket sets one of slice_index and slice_count: set both or neither",
            )),
        }
    }

    /// The same ticket, for slice `index` of `count` over pieces with `fingerprint`.
    pub fn with_slice(mut self, index: u32, count: u32, fingerprint: u64) -> Self {
        self.slice_index = Some(index);
        self.slice_count = Some(count);
        self.slice_fingerprint = Some(fingerprint);
        self
    }

    /// The same ticket, running with `values` bound to its placeholders.
    pub fn with_parameters(mut self, values: &[ScalarValue]) -> Result<Self> {
        if values.is_empty() {
            return Ok(self);
        }
        let columns = values
            .iter()
            .map(|v| v.to_array())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let fields: Vec<Field> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Field::new(format!("${}", i + 1), v.data_type(), true))
            .collect();
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema())?;
        writer.write(&batch)?;
        self.parameters = Some(writer.into_inner()?);
        Ok(self)
    }

    /// The values the ticket binds to its statement's placeholders, `$1` first.
    ///
    /// Client bytes: decoded push-style with arrow-ipc's `StreamDecoder`, which holds no
    /// more than the bytes present (its `StreamReader` allocates whatever body length a
    /// message claims before reading it), and a decoder panic on a malformed message is
    /// the client's error (as for `DoPut` parameters). Fuzzed (`fuzz_ticket`).
    pub fn bound_parameters(&self) -> Result<Vec<ScalarValue>> {
        let Some(bytes) = &self.parameters else {
            return Ok(vec![]);
        };
        std::panic::catch_unwind(|| decode_parameters(bytes))
            .unwrap_or_else(|_panic| Err(bad_parameters(&"a malformed message")))
    }

    /// Decodes and checks the value of an `Any` with [`QUERY_TICKET_TYPE_URL`].
    pub fn decode_checked(value: &[u8]) -> Result<Self> {
        let ticket = QueryTicket::decode(value)
            .map_err(|e| Error::invalid(format!("malformed Quiver QueryTicket: {e}")))?;
        if ticket.version != QUERY_TICKET_VERSION {
            return Err(Error::invalid(format!(
                "Quiver ticket version {} is not supported (this server reads version \
                 {QUERY_TICKET_VERSION}); ask GetFlightInfo for a new ticket",
                ticket.version
            )));
        }
        check_sql(&ticket.sql)?;
        if let Some(id) = &ticket.query_id {
            crate::query::check_query_id(id)?;
        }
        ticket.result_compression()?;
        Ok(ticket)
    }
}

fn bad_parameters(e: &dyn std::fmt::Display) -> Error {
    Error::invalid(format!(
        "the ticket's parameters are not one row of Arrow IPC ({e}); use the tickets \
         GetFlightInfo returns"
    ))
}

/// One row of Arrow IPC stream bytes, as scalar values.
fn decode_parameters(bytes: &[u8]) -> Result<Vec<ScalarValue>> {
    let mut decoder = StreamDecoder::new();
    let mut buffer = Buffer::from(bytes.to_vec());
    let mut row: Option<RecordBatch> = None;
    while !buffer.is_empty() {
        let decoded = decoder
            .decode(&mut buffer)
            .map_err(|e| bad_parameters(&e))?;
        if let Some(batch) = decoded {
            if row.is_some() || batch.num_rows() != 1 {
                return Err(bad_parameters(&"not exactly one row"));
            }
            row = Some(batch);
        }
    }
    decoder.finish().map_err(|e| bad_parameters(&e))?;
    let row = row.ok_or_else(|| bad_parameters(&"no batch"))?;
    row.columns()
        .iter()
        .map(|column| ScalarValue::try_from_array(column, 0).map_err(|e| bad_parameters(&e)))
        .collect()
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run this SQL (a plain-text ticket).
    Sql(String),
    /// A Quiver ticket, checked.
    Query(QueryTicket),
    /// A Flight SQL message, unpacked (`Unknown` for a type this arrow-flight lacks).
    FlightSql(sql::Command),
}

impl Command {
    /// The id of the query the ticket starts, when it names one (tickets from our
    /// `GetFlightInfo`, plain or Flight SQL).
    pub fn query_id(&self) -> Option<String> {
        match self {
            Command::Query(ticket) => ticket.query_id.clone(),
            Command::FlightSql(sql::Command::TicketStatementQuery(statement)) => {
                QueryTicket::decode_checked(&statement.statement_handle)
                    .ok()?
                    .query_id
            }
            Command::FlightSql(_) => None,
            Command::Sql(_) => None,
        }
    }
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
            let type_url = any.type_url.clone();
            let command = sql::Command::try_from(any).map_err(|e| {
                Error::invalid(format!("malformed Flight SQL message {type_url}: {e}"))
            })?;
            return Ok(Command::FlightSql(command));
        }
        if any.type_url == QUERY_TICKET_TYPE_URL {
            return Ok(Command::Query(QueryTicket::decode_checked(&any.value)?));
        }
        if looks_like_type_url(&any.type_url) {
            return Err(Error::invalid(format!(
                "the ticket is a protobuf Any of type '{}', which this server does not read: \
                 send SQL text, a {QUERY_TICKET_TYPE_URL} or a Flight SQL command",
                any.type_url
            )));
        }
    }
    sql(bytes.to_vec())
}

/// `type.googleapis.com/package.Message`: a host or prefix, a slash, and a dotted name,
/// with nothing SQL text would hold (spaces, quotes, parentheses).
fn looks_like_type_url(url: &str) -> bool {
    let Some((prefix, name)) = url.rsplit_once('/') else {
        return false;
    };
    let word = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || extra.contains(&c))
    };
    word(name, &[]) && word(prefix, &['/', '-', ':'])
}

/// Only blank text is refused here; the engine applies `--max-sql-size` and the other
/// statement limits on every path (`query::limits`).
fn check_sql(text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::invalid("the SQL text is blank: send a query"));
    }
    Ok(())
}

fn sql(bytes: Vec<u8>) -> Result<Command> {
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::invalid(format!(
            "the ticket is neither a Flight SQL command nor UTF-8 SQL text (invalid UTF-8 at byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    check_sql(&text)?;
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
        let ticket = QueryTicket::new("SELECT 2");
        assert_eq!(
            decode(&ticket.encode_any()).unwrap(),
            Command::Query(ticket)
        );
        let ticket = QueryTicket {
            timeout_ms: Some(1500),
            compression: Some(Compression::Zstd as i32),
            ..QueryTicket::new("SELECT 3").with_query_id("00ff")
        };
        let Command::Query(decoded) = decode(&ticket.encode_any()).unwrap() else {
            panic!("not a query ticket");
        };
        assert_eq!(decoded.query_id.as_deref(), Some("00ff"));
        assert_eq!(decoded.timeout(), Some(Duration::from_millis(1500)));
        assert_eq!(
            decoded.result_compression().unwrap(),
            Some(Some(CompressionType::ZSTD))
        );
        let any = |ticket: QueryTicket| {
            Any {
                type_url: QUERY_TICKET_TYPE_URL.into(),
                value: ticket.encode_to_vec().into(),
            }
            .encode_to_vec()
        };
        let future = QueryTicket {
            version: 99,
            ..QueryTicket::new("x")
        };
        let e = decode(&any(future)).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        let bad_compression = QueryTicket {
            compression: Some(42),
            ..QueryTicket::new("SELECT 1")
        };
        assert_eq!(
            decode(&any(bad_compression)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(decode(&any(QueryTicket::new(" "))).is_err());
    }

    #[test]
    fn foreign_any_is_invalid_but_sql_that_decodes_as_any_is_sql() {
        let foreign = Any {
            type_url: "type.googleapis.com/acme.v2.Ticket".into(),
            value: Bytes::from_static(b"\x08\x01"),
        };
        let e = decode(&foreign.encode_to_vec()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("acme.v2.Ticket"), "{e}");
        // `EXPLAIN ...` and friends: valid protobuf, but not an Any anyone sent.
        for text in ["EXPLAIN SELECT 1", "\nSELECT 1", "\n\x02ab"] {
            assert_eq!(decode(text.as_bytes()).unwrap(), Command::Sql(text.into()));
        }
        assert!(looks_like_type_url(
            "type.googleapis.com/quiver.v1.QueryTicket"
        ));
        assert!(!looks_like_type_url("SELECT a/b"));
        assert!(!looks_like_type_url(""));
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

    #[test]
    fn parameters_round_trip_and_corrupt_ones_are_refused() {
        let values = vec![
            ScalarValue::Int64(Some(400)),
            ScalarValue::Utf8(Some("web".into())),
            ScalarValue::Float64(None),
        ];
        let ticket = QueryTicket::new("SELECT $1, $2, $3")
            .with_parameters(&values)
            .unwrap();
        assert_eq!(ticket.bound_parameters().unwrap(), values);
        let bytes = ticket.parameters.clone().unwrap();
        // Every 8 bytes from each offset set to a huge length: refused, never allocated.
        for at in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            let end = (at + 8).min(corrupt.len());
            corrupt[at..end].fill(0x7f);
            let mut t = ticket.clone();
            t.parameters = Some(corrupt);
            if let Err(e) = t.bound_parameters() {
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
            }
        }
        let mut truncated = ticket.clone();
        truncated.parameters = Some(bytes[..bytes.len() / 2].to_vec());
        assert!(truncated.bound_parameters().is_err());
    }
}
