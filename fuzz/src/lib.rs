//! Fuzz targets: everything Quiver decodes from a client before it trusts it.
//!
//! Each target takes arbitrary bytes and must return without panicking, aborting or
//! allocating without bound; errors are the expected answer to most inputs. The binaries
//! in `fuzz_targets/` hand libFuzzer's inputs to these functions; `tests/properties.rs`
//! runs them under `cargo test` over the seed corpora and seeded random mutations, so
//! every CI run exercises them even without a fuzzer.
//!
//! | target            | what it decodes                                              |
//! |-------------------|--------------------------------------------------------------|
//! | `fuzz_ticket`     | DoGet tickets and CMD descriptors (`flight::ticket::decode`) |
//! | `fuzz_flight_sql` | Flight SQL commands packed in a protobuf `Any`               |
//! | `fuzz_sql`        | SQL text through the statement limits, guard and planner     |
//! | `fuzz_auth`       | `authorization` headers (Bearer tokens, Basic credentials)   |
//! | `fuzz_do_put`     | DoPut parameter binding (Arrow IPC in `FlightData`)          |

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow_flight::FlightData;
use arrow_flight::sql::Any;
use datafusion::arrow::datatypes::DataType;
use prost::Message;
use quiver::flight::auth::{Authenticator, LoginLimits, claimed_user};
use quiver::flight::ticket::{self, Command};
use quiver::query::{Caller, QueryEngine, QueryOptions};
use sha2::{Digest, Sha256};
use tonic::metadata::{MetadataMap, MetadataValue};

/// Panics the server catches (and answers as the client's error) are not crashes:
/// libFuzzer's hook aborts on every panic, caught or not, so the standard hook is put
/// back; a panic that escapes a target still aborts (libfuzzer-sys checks each call).
fn panics_as_in_the_server() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}

/// A DoGet ticket or a CMD descriptor's bytes.
pub fn ticket(data: &[u8]) {
    panics_as_in_the_server();
    if let Ok(command) = ticket::decode(data) {
        inspect(&command);
    }
}

/// What the server does with a decoded command before running it.
fn inspect(command: &Command) {
    let _ = command.query_id();
    match command {
        Command::Query(t) => {
            let _ = t.timeout();
            let _ = t.result_compression();
            let _ = t.requested_slice();
            let _ = t.bound_parameters();
        }
        Command::FlightSql(command) => {
            // Unpacked already by `decode`; statement tickets by `query_id` above.
            let _ = command.type_url();
        }
        Command::Sql(_) => {}
    }
}

/// Every Flight SQL message type a client can send, as the type URL of its `Any`.
pub const FLIGHT_SQL_TYPES: &[&str] = &[
    "CommandStatementQuery",
    "TicketStatementQuery",
    "CommandPreparedStatementQuery",
    "CommandGetCatalogs",
    "CommandGetDbSchemas",
    "CommandGetTables",
    "CommandGetTableTypes",
    "CommandGetSqlInfo",
    "CommandGetXdbcTypeInfo",
    "CommandGetPrimaryKeys",
    "CommandGetExportedKeys",
    "CommandGetImportedKeys",
    "CommandGetCrossReference",
    "CommandStatementUpdate",
    "CommandPreparedStatementUpdate",
    "CommandStatementSubstraitPlan",
    "CommandStatementIngest",
    "ActionCreatePreparedStatementRequest",
    "ActionClosePreparedStatementRequest",
    "ActionBeginTransactionRequest",
    "ActionEndTransactionRequest",
    "ActionCancelQueryRequest",
];

/// A Flight SQL message: the first byte picks the type, the rest is its protobuf body
/// (so the fuzzer reaches each message's decoder, not only `Any`'s).
pub fn flight_sql(data: &[u8]) {
    panics_as_in_the_server();
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let name = FLIGHT_SQL_TYPES[usize::from(pick) % FLIGHT_SQL_TYPES.len()];
    let any = Any {
        type_url: format!("type.googleapis.com/arrow.flight.protocol.sql.{name}"),
        value: body.to_vec().into(),
    };
    ticket(&any.encode_to_vec());
}

/// The engine `sql` plans against: the demo tables, built once per process.
fn engine() -> &'static (tokio::runtime::Runtime, Arc<QueryEngine>) {
    static ENGINE: OnceLock<(tokio::runtime::Runtime, Arc<QueryEngine>)> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        quiver::demo::generate(dir.path(), 2_000, &mut |_| {}).expect("the demo dataset");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let tables = quiver::catalog::tables_in_data_dir(dir.path()).expect("demo tables");
        let options = QueryOptions {
            cpu_threads: 1,
            ..QueryOptions::default()
        };
        let engine = runtime
            .block_on(QueryEngine::new(tables, options))
            .expect("the engine");
        // Footers are read at start-up and files mapped on use; the directory stays
        // for the life of the process.
        std::mem::forget(dir);
        (runtime, Arc::new(engine))
    })
}

/// SQL text, through everything a planning RPC does (size, depth and read-only checks,
/// table resolution, planning on the query runtime with its stack) without running it.
pub fn sql(data: &[u8]) {
    panics_as_in_the_server();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (runtime, engine) = engine();
    let caller = Caller {
        client_timeout: Some(Duration::from_secs(10)),
        ..Caller::default()
    };
    let planned = runtime.block_on(engine.schema(text.to_string(), vec![], &caller));
    drop(planned);
}

/// The token `auth` accepts, and the user it knows.
const TOKEN: &str = "fuzz-token";

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let digest: String = Sha256::digest(TOKEN.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let file = format!(
            "[[users]]\nname = \"alice\"\npassword = \"{}\"\n\n\
             [[tokens]]\nname = \"bot\"\nsha256 = \"{digest}\"\ntables = [\"req*\"]\n",
            quiver::flight::auth::hash_password("pw"),
        );
        Authenticator::from_toml(&file, Duration::from_secs(60), LoginLimits::default())
            .expect("a valid auth file")
    })
}

/// An `authorization` header, as any call (Bearer) and a Handshake (Basic) read it.
/// Verifying a password (argon2) is left out: it runs on a known-good library, and it
/// is slow by design.
pub fn auth(data: &[u8]) {
    panics_as_in_the_server();
    let Ok(value) = MetadataValue::try_from(data) else {
        return;
    };
    let mut metadata = MetadataMap::new();
    metadata.insert("authorization", value);
    let _ = authenticator().authenticate(&metadata);
    let _ = claimed_user(&metadata);
}

/// Parameter types a prepared statement may have.
const PARAMETER_TYPES: &[Option<DataType>] = &[
    Some(DataType::Int64),
    Some(DataType::Utf8),
    None,
    Some(DataType::Float64),
];

/// `FlightData` messages from bytes: pieces split at `|||` alternate between IPC header
/// and body, so the fuzzer controls both.
pub fn flight_data_messages(data: &[u8]) -> Vec<FlightData> {
    let pieces: Vec<&[u8]> = split(data, b"|||");
    pieces
        .chunks(2)
        .map(|pair| FlightData {
            data_header: bytes::Bytes::copy_from_slice(pair[0]),
            data_body: bytes::Bytes::copy_from_slice(pair.get(1).copied().unwrap_or_default()),
            ..FlightData::default()
        })
        .collect()
}

fn split<'a>(data: &'a [u8], separator: &[u8]) -> Vec<&'a [u8]> {
    let mut pieces = vec![];
    let mut rest = data;
    while let Some(at) = rest.windows(separator.len()).position(|w| w == separator) {
        pieces.push(&rest[..at]);
        rest = &rest[at + separator.len()..];
    }
    pieces.push(rest);
    pieces
}

/// DoPut parameter binding: an Arrow IPC stream in `FlightData`, one row of values cast
/// to the statement's parameter types.
pub fn do_put(data: &[u8]) {
    panics_as_in_the_server();
    let messages = flight_data_messages(data);
    let stream = futures::stream::iter(messages.into_iter().map(Ok));
    let _ = futures::executor::block_on(quiver::flight::bound_parameters(stream, PARAMETER_TYPES));
}
