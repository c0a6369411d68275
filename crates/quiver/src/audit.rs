//! The audit log (`--audit-log PATH`, or `-` for stderr): one JSON line per query and
//! per authentication decision, for the people who must answer "who read what, when".
//!
//! ```text
//! {"time":"2026-12-03T20:31:07.412Z","event":"query","rpc":"DoGet","user":"alice",
//!  "peer":"10.0.0.7:51234","client_subject":null,"query_id":"9f2c...","sql":"SELECT ...",
//!  "sql_bytes":31,"sql_truncated":false,"tables":["requests"],"outcome":"success",
//!  "code":"OK","rows":120,"bytes":5310,"duration_ms":12.4,"peak_memory_bytes":1048576}
//! {"time":"...","event":"auth","rpc":"Handshake","user":"bob","peer":"10.0.0.9:40022",
//!  "client_subject":null,"outcome":"failure","code":"UNAUTHENTICATED",
//!  "reason":"wrong user name or password"}
//! ```
//!
//! Lines hold no secrets: no password, token or authorization header ever reaches this
//! module. SQL is cut at [`MAX_SQL_BYTES`] (`sql_truncated` says so; `sql_bytes` is the
//! full length). A file is opened for appending and reopened by [`AuditLog::reopen`]
//! (the server calls it on SIGHUP), so logrotate can move it away. Each line is written
//! with one `write` call; a write that fails is reported in the server log and the
//! request goes on.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};

/// Longest SQL text written per line, in bytes (cut at a character boundary).
pub const MAX_SQL_BYTES: usize = 4096;

/// Where a request came from, for the audit log.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The RPC (`DoGet`, `GetFlightInfo`, `Handshake`, ...).
    pub rpc: &'static str,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// Subject of the verified client certificate (mutual TLS).
    pub client_subject: Option<Arc<str>>,
}

/// A query that ended.
#[derive(Debug)]
pub struct QueryRecord<'a> {
    /// Where it came from.
    pub origin: &'a Origin,
    /// The authenticated user, if authentication is on.
    pub user: Option<&'a str>,
    /// The query id.
    pub query_id: &'a str,
    /// The statement, at most [`MAX_SQL_BYTES`] of it (longer statements are cut).
    pub sql: &'a str,
    /// Bytes of the whole statement.
    pub sql_bytes: usize,
    /// Tables the plan read.
    pub tables: &'a [String],
    /// `success`, `error`, `cancelled`, `rejected` or `timeout`.
    pub outcome: &'static str,
    /// The gRPC code the client got.
    pub code: tonic::Code,
    /// Rows sent.
    pub rows: u64,
    /// Bytes of Flight payload sent.
    pub bytes: u64,
    /// From arrival to the end.
    pub duration: Duration,
    /// Most bytes the query held in the memory pool at once.
    pub peak_memory: usize,
}

/// An authentication decision.
#[derive(Debug)]
pub struct AuthRecord<'a> {
    /// Where it came from.
    pub origin: &'a Origin,
    /// The user name claimed (Handshake) or established (a token's name); `None` when
    /// the credentials could not even be read.
    pub user: Option<&'a str>,
    /// Whether the caller got in.
    pub success: bool,
    /// Why not, or how (`password`, `token`).
    pub reason: &'a str,
    /// The gRPC code the client got.
    pub code: tonic::Code,
}

/// Where lines go.
#[derive(Debug)]
enum Target {
    Stderr,
    File(PathBuf),
}

/// The audit log.
#[derive(Debug)]
pub struct AuditLog {
    target: Target,
    /// The open file; `None` for stderr.
    file: Mutex<Option<File>>,
}

impl AuditLog {
    /// Opens `spec`: a path (created, appended to) or `-` for stderr.
    pub fn open(spec: &str) -> Result<Self> {
        if spec == "-" {
            return Ok(Self {
                target: Target::Stderr,
                file: Mutex::new(None),
            });
        }
        let path = PathBuf::from(spec);
        let file = open_append(&path)?;
        Ok(Self {
            target: Target::File(path),
            file: Mutex::new(Some(file)),
        })
    }

    /// Opens the file again by its name (after logrotate moved it); stderr stays.
    pub fn reopen(&self) -> Result<()> {
        if let Target::File(path) = &self.target {
            let file = open_append(path)?;
            *self.file.lock() = Some(file);
        }
        Ok(())
    }

    /// Writes a query's line.
    pub fn query(&self, record: &QueryRecord<'_>) {
        let (sql, _) = cut(record.sql, MAX_SQL_BYTES);
        self.write(&QueryLine {
            header: Header::new("query", record.origin, record.user),
            query_id: record.query_id,
            sql,
            sql_bytes: record.sql_bytes,
            sql_truncated: record.sql_bytes > sql.len(),
            tables: record.tables,
            outcome: record.outcome,
            code: code_name(record.code),
            rows: record.rows,
            bytes: record.bytes,
            duration_ms: record.duration.as_secs_f64() * 1000.0,
            peak_memory_bytes: record.peak_memory,
        });
    }

    /// Writes an authentication decision's line.
    pub fn auth(&self, record: &AuthRecord<'_>) {
        let (user, _) = cut(record.user.unwrap_or_default(), 256);
        self.write(&AuthLine {
            header: Header::new("auth", record.origin, record.user.map(|_| user)),
            outcome: if record.success { "success" } else { "failure" },
            code: code_name(record.code),
            reason: record.reason,
        });
    }

    fn write(&self, line: &impl Serialize) {
        let mut text = match serde_json::to_vec(line) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, "audit line not serialisable");
                return;
            }
        };
        text.push(b'\n');
        let written = match &self.target {
            Target::Stderr => std::io::stderr().lock().write_all(&text),
            Target::File(_) => {
                let mut file = self.file.lock();
                match file.as_mut() {
                    Some(f) => f.write_all(&text),
                    None => Ok(()),
                }
            }
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "writing the audit log failed");
        }
    }
}

fn open_append(path: &PathBuf) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })
}

/// `text` cut to at most `max` bytes at a character boundary, and whether it was cut.
pub(crate) fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// The code as gRPC documents name it (`OK`, `INVALID_ARGUMENT`, ...).
fn code_name(code: tonic::Code) -> String {
    // tonic's Debug form is CamelCase (`InvalidArgument`).
    let camel = format!("{code:?}");
    let mut name = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// What every line starts with.
#[derive(Serialize)]
struct Header<'a> {
    time: String,
    event: &'static str,
    rpc: &'static str,
    user: Option<&'a str>,
    peer: Option<String>,
    client_subject: Option<&'a str>,
}

impl<'a> Header<'a> {
    fn new(event: &'static str, origin: &'a Origin, user: Option<&'a str>) -> Self {
        Self {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            event,
            rpc: origin.rpc,
            user,
            peer: origin.peer.map(|p| p.to_string()),
            client_subject: origin.client_subject.as_deref(),
        }
    }
}

#[derive(Serialize)]
struct QueryLine<'a> {
    #[serde(flatten)]
    header: Header<'a>,
    query_id: &'a str,
    sql: &'a str,
    sql_bytes: usize,
    sql_truncated: bool,
    tables: &'a [String],
    outcome: &'static str,
    code: String,
    rows: u64,
    bytes: u64,
    duration_ms: f64,
    peak_memory_bytes: usize,
}

#[derive(Serialize)]
struct AuthLine<'a> {
    #[serde(flatten)]
    header: Header<'a>,
    outcome: &'static str,
    code: String,
    reason: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }

    #[test]
    fn sql_is_cut_at_a_character_boundary() {
        let text = "é".repeat(10);
        let (cut_text, truncated) = cut(&text, 5);
        assert!(truncated);
        assert_eq!(cut_text, "éé");
        assert_eq!(cut("abc", 5), ("abc", false));
    }

    #[test]
    fn lines_are_appended_and_reopened_after_a_move() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(path.to_str().unwrap()).unwrap();
        let origin = Origin {
            rpc: "Handshake",
            ..Origin::default()
        };
        let record = AuthRecord {
            origin: &origin,
            user: Some("bob"),
            success: false,
            reason: "wrong user name or password",
            code: tonic::Code::Unauthenticated,
        };
        log.auth(&record);
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        log.reopen().unwrap();
        log.auth(&record);
        for name in ["audit.log", "audit.log.1"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 1, "{name}: {text}");
            assert_eq!(lines[0]["user"], "bob");
            assert_eq!(lines[0]["code"], "UNAUTHENTICATED");
        }
    }
}
