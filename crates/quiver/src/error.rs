//! One error type for the library and its single mapping to a gRPC [`Status`].
//!
//! Variants are grouped by who is at fault: the client (bad ticket, bad SQL,
//! unknown table, a write attempt), the data on disk (a corrupt file, an
//! incompatible schema), or Quiver itself (`Internal`). The mapping to a status
//! code lives in exactly one place, [`Error::code`], an exhaustive match.

use datafusion::error::DataFusionError;
use tonic::{Code, Status};

/// Result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest message a client sees; longer ones are cut with a marker. Planner
/// errors can quote whole schemas and must not turn into megabyte trailers.
const MAX_MESSAGE_BYTES: usize = 2048;

/// Everything that can go wrong serving a request or loading the catalog.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ticket or descriptor could not be understood.
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What was wrong and what to send instead.
        reason: String,
    },

    /// The statement would change state or read outside registered tables.
    #[error("{what} is not allowed: Quiver serves read-only SQL over registered tables ({hint})")]
    NotReadOnly {
        /// The kind of statement or construct that was rejected.
        what: String,
        /// What the client can do instead.
        hint: String,
    },

    /// A query named a table that is not registered.
    #[error("table '{name}' not found; available tables: {}", available.join(", "))]
    TableNotFound {
        /// The name as written in the query.
        name: String,
        /// Registered table names, sorted.
        available: Vec<String>,
    },

    /// Missing, wrong or expired credentials.
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// What was wrong and what to send.
        reason: String,
    },

    /// The caller is authenticated but may not do this (e.g. cancel another user's query).
    #[error("permission denied: {reason}")]
    PermissionDenied {
        /// What was refused and why.
        reason: String,
    },

    /// Admission control turned the query away. Retryable.
    #[error("server busy: {reason}; retry later")]
    Overloaded {
        /// Which limit was hit, naming its flag.
        reason: String,
    },

    /// The query was cancelled by `cancel-query` or `CancelFlightInfo`. ABORTED, not
    /// CANCELLED: pyarrow turns a CANCELLED status into a `KeyboardInterrupt` in the
    /// reading thread, which a service cannot tell from a real Ctrl-C.
    #[error("query cancelled: {reason}")]
    Cancelled {
        /// Who or what cancelled it.
        reason: String,
    },

    /// A deadline expired: the client's, or one of the server's limits.
    #[error("{stage} exceeded its deadline of {} ({source_of_limit})", humantime::format_duration(*.limit))]
    DeadlineExceeded {
        /// What took too long: "the query", "planning", "the first batch", ...
        stage: &'static str,
        /// The time it had.
        limit: std::time::Duration,
        /// Where the limit came from: the client's grpc-timeout, or a flag.
        source_of_limit: String,
    },

    /// The memory guard stopped the query: the process allocated more than
    /// `--memory-hard-limit`.
    #[error("query stopped to protect the server's memory: {reason}")]
    MemoryExhausted {
        /// What the guard saw, naming the flag.
        reason: String,
    },

    /// The server is shutting down. Retryable on another replica.
    #[error("the server is shutting down; retry (on another replica)")]
    ShuttingDown,

    /// The feature exists in the protocol but is not served.
    #[error("{what} is not supported: {hint}")]
    Unsupported {
        /// The RPC, command, action or form of request.
        what: String,
        /// What to do instead.
        hint: String,
    },

    /// A gRPC message over a size limit.
    #[error("{message}")]
    MessageTooLarge {
        /// What was too large, by how much, and which flag sets the limit.
        message: String,
    },

    /// The client went away (reset its stream or closed the connection) before the end.
    #[error("the client went away")]
    ClientGone,

    /// The configuration (a flag, the catalog file, a file a flag names) is wrong.
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// Files of one table cannot be read as one schema.
    #[error("table '{table}': {message}")]
    Schema {
        /// The table being registered.
        table: String,
        /// The conflict, naming both files.
        message: String,
    },

    /// Reading the file system failed outside a query.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A table file changed since the catalog listed it. Retryable: the next refresh
    /// lists the new version.
    #[error(
        "{path} changed since the table was listed ({reason}); retry after the next catalog \
         refresh, or refresh now with DoAction \"refresh\" (Parquet files must be immutable: \
         publish new files by rename)"
    )]
    FileChanged {
        /// The file.
        path: String,
        /// What differs.
        reason: String,
    },

    /// An S3 table's store cannot be reached or refuses Quiver: the table's queries fail
    /// until it answers (the message says what to check).
    #[error("{message}")]
    ObjectStore {
        /// `s3://bucket`.
        store: String,
        /// What went wrong and what to check.
        message: String,
    },

    /// A node of the cluster could not be reached, refused this node, or does not have
    /// the files the query was planned on.
    #[error("{message}")]
    Cluster {
        /// Which node, what went wrong and what to check.
        message: String,
    },

    /// A slice ticket planned on other files than this node lists now.
    #[error(
        "the files this endpoint's ticket was planned on changed since GetFlightInfo (a \
         refresh published new files, or this node lists them differently); call \
         GetFlightInfo again for new endpoints"
    )]
    SliceChanged,

    /// A table path that is not a regular file (a directory, socket, FIFO or device).
    #[error("{path} is a {kind}, not a regular file")]
    NotAFile {
        /// The path.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },

    /// A table file could not be opened or read.
    #[error("{}", file_read_message(.path, .source))]
    FileRead {
        /// The file.
        path: String,
        /// The storage error; its kind decides the status code.
        source: Box<object_store::Error>,
    },

    /// An error from planning or executing a query.
    #[error(transparent)]
    DataFusion(Box<DataFusionError>),

    /// Encoding the result for the wire failed.
    #[error("encoding the result failed: {0}")]
    Flight(Box<arrow_flight::error::FlightError>),

    /// A bug in Quiver.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        Self::DataFusion(Box::new(e))
    }
}

/// For errors raised inside DataFusion callbacks (table scans, file readers); the
/// status mapping finds them again in the source chain.
impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        DataFusionError::External(Box::new(e))
    }
}

impl From<arrow_flight::error::FlightError> for Error {
    fn from(e: arrow_flight::error::FlightError) -> Self {
        Self::Flight(Box::new(e))
    }
}

impl From<datafusion::arrow::error::ArrowError> for Error {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        Self::DataFusion(Box::new(DataFusionError::ArrowError(Box::new(e), None)))
    }
}

impl Error {
    /// Shorthand for [`Error::FileRead`].
    pub fn file_read(path: String, source: object_store::Error) -> Self {
        Self::FileRead {
            path,
            source: Box::new(source),
        }
    }

    /// An object store outage anywhere in this error's source chain, as an error of its
    /// own (a refresh that meets one fails whole instead of skipping files).
    pub(crate) fn object_store_outage(&self) -> Option<Error> {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = current {
            if let Some(Error::ObjectStore { store, message }) = e.downcast_ref::<Error>() {
                return Some(Error::ObjectStore {
                    store: store.clone(),
                    message: message.clone(),
                });
            }
            current = e.source();
        }
        None
    }

    /// Shorthand for [`Error::InvalidRequest`].
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            reason: reason.into(),
        }
    }

    /// The gRPC status code for this error. Exhaustive on purpose: a new
    /// variant must decide who is at fault.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidRequest { .. } | Self::NotReadOnly { .. } => Code::InvalidArgument,
            Self::TableNotFound { .. } => Code::NotFound,
            Self::Unsupported { .. } => Code::Unimplemented,
            Self::MessageTooLarge { .. } => Code::OutOfRange,
            Self::ClientGone => Code::Cancelled,
            Self::Unauthenticated { .. } => Code::Unauthenticated,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::Overloaded { .. } | Self::ShuttingDown => Code::Unavailable,
            Self::Cancelled { .. } => Code::Aborted,
            Self::MemoryExhausted { .. } => Code::ResourceExhausted,
            Self::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Self::Config { .. } => Code::InvalidArgument,
            Self::Schema { .. } => Code::FailedPrecondition,
            Self::Io { .. } => Code::Unavailable,
            Self::FileChanged { .. } => Code::Unavailable,
            Self::ObjectStore { .. } => Code::Unavailable,
            Self::Cluster { .. } => Code::Unavailable,
            Self::SliceChanged => Code::Aborted,
            // Only the operator can fix it.
            Self::NotAFile { .. } => Code::FailedPrecondition,
            Self::FileRead { source, .. } => match source.as_ref() {
                // Vanished since it was listed: the next refresh drops it.
                object_store::Error::NotFound { .. } => Code::Unavailable,
                // Only the operator can fix these.
                object_store::Error::PermissionDenied { .. } => Code::FailedPrecondition,
                // Ours, carried through the object store interface (`io`).
                object_store::Error::Generic { source, .. } => source
                    .downcast_ref::<Error>()
                    .map_or(Code::Unavailable, Error::code),
                _ => Code::Unavailable,
            },
            Self::DataFusion(e) => match ours_in(e.as_ref()) {
                // Our own error wrapped by DataFusion or Parquet keeps its code.
                Some(ours) => ours.code(),
                None => datafusion_code(e),
            },
            Self::Flight(e) => match e.as_ref() {
                arrow_flight::error::FlightError::Tonic(s) => s.code(),
                // Only what a client sends is decoded here (DoPut parameters).
                arrow_flight::error::FlightError::ProtocolError(_)
                | arrow_flight::error::FlightError::DecodeError(_) => Code::InvalidArgument,
                arrow_flight::error::FlightError::Arrow(_)
                | arrow_flight::error::FlightError::NotYetImplemented(_)
                | arrow_flight::error::FlightError::ExternalError(_) => Code::Internal,
            },
            Self::Internal(_) => Code::Internal,
        }
    }

    /// How a query that failed with this error ended, for `quiver_queries_total{outcome}`.
    /// Decided here, beside [`Self::code`], so that one place classifies every error.
    pub fn outcome(&self) -> Outcome {
        // Exhaustive on purpose, as `code` is: a new variant decides how it ends.
        match self {
            Self::Overloaded { .. } | Self::ShuttingDown => Outcome::Rejected,
            Self::Cancelled { .. } | Self::ClientGone => Outcome::Cancelled,
            Self::DeadlineExceeded { .. } => Outcome::Timeout,
            Self::InvalidRequest { .. }
            | Self::NotReadOnly { .. }
            | Self::TableNotFound { .. }
            | Self::Unauthenticated { .. }
            | Self::PermissionDenied { .. }
            | Self::MemoryExhausted { .. }
            | Self::Unsupported { .. }
            | Self::MessageTooLarge { .. }
            | Self::Config { .. }
            | Self::Schema { .. }
            | Self::Io { .. }
            | Self::FileChanged { .. }
            | Self::ObjectStore { .. }
            | Self::Cluster { .. }
            | Self::SliceChanged
            | Self::NotAFile { .. }
            | Self::FileRead { .. }
            | Self::DataFusion(_)
            | Self::Flight(_)
            | Self::Internal(_) => Outcome::Error,
        }
    }

    /// Whether the server, rather than the client or the data, is at fault:
    /// those are logged at `error`, the rest at `debug`.
    pub fn is_server_fault(&self) -> bool {
        matches!(self.code(), Code::Internal | Code::Unknown)
    }
}

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every batch was sent.
    Success,
    /// Planning or execution failed (bad SQL, a missing file, memory exhausted, ...).
    Error,
    /// The client went away or cancelled before the end.
    Cancelled,
    /// Refused by admission control before it started.
    Rejected,
    /// A deadline expired.
    Timeout,
}

impl Outcome {
    /// Every outcome, for initialising label values.
    pub const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Error,
        Outcome::Cancelled,
        Outcome::Rejected,
        Outcome::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
            Outcome::Timeout => "timeout",
        }
    }
}

/// "reading PATH: what went wrong", without object_store's wrapping of the cause.
fn file_read_message(path: &str, source: &object_store::Error) -> String {
    let cause = match source {
        object_store::Error::Generic { source, .. }
        | object_store::Error::NotFound { source, .. }
        | object_store::Error::PermissionDenied { source, .. } => {
            if let Some(ours) = source.downcast_ref::<Error>() {
                // Already names the file.
                return ours.to_string();
            }
            source.to_string()
        }
        other => other.to_string(),
    };
    format!("reading {path}: {cause}")
}

/// The first [`Error`] in `e`'s source chain, however deep DataFusion, Arrow and
/// Parquet have wrapped it.
fn ours_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(ours) = e.downcast_ref::<Error>() {
            return Some(ours);
        }
        current = e.source();
    }
    None
}

/// Classifies a DataFusion error on its root cause.
fn datafusion_code(e: &DataFusionError) -> Code {
    match e.find_root() {
        DataFusionError::SQL(..)
        | DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::Configuration(_)
        | DataFusionError::NotImplemented(_) => Code::InvalidArgument,
        DataFusionError::ResourcesExhausted(_) => Code::ResourceExhausted,
        // A file that cannot be decoded is damaged data, not a bad request.
        DataFusionError::ParquetError(_) => Code::DataLoss,
        DataFusionError::ObjectStore(e) => match e.as_ref() {
            object_store::Error::NotFound { .. } => Code::NotFound,
            _ => Code::Unavailable,
        },
        DataFusionError::IoError(_) => Code::Unavailable,
        DataFusionError::ArrowError(e, _) => match e.as_ref() {
            datafusion::arrow::error::ArrowError::DivideByZero
            | datafusion::arrow::error::ArrowError::CastError(_)
            | datafusion::arrow::error::ArrowError::ParseError(_)
            | datafusion::arrow::error::ArrowError::ComputeError(_)
            | datafusion::arrow::error::ArrowError::ArithmeticOverflow(_)
            | datafusion::arrow::error::ArrowError::InvalidArgumentError(_) => {
                Code::InvalidArgument
            }
            datafusion::arrow::error::ArrowError::MemoryError(_) => Code::ResourceExhausted,
            datafusion::arrow::error::ArrowError::ParquetError(_)
            | datafusion::arrow::error::ArrowError::IpcError(_) => Code::DataLoss,
            _ => Code::Internal,
        },
        // DataFusion's catch-all for failures while running: not the client's fault by
        // default (errors from bad input arrive as Arrow, plan or SQL errors, or ours).
        DataFusionError::Execution(_) => Code::Internal,
        DataFusionError::ExecutionJoin(_) => Code::Internal,
        DataFusionError::External(ext) => {
            if let Some(ours) = ext.downcast_ref::<Error>() {
                ours.code()
            } else if let Some(status) = ext.downcast_ref::<Status>() {
                // A call to another node of the cluster failed: the node refused it
                // (wrong secret), is gone, or is overloaded. Retryable here.
                match status.code() {
                    Code::InvalidArgument | Code::Unimplemented => Code::Internal,
                    _ => Code::Unavailable,
                }
            } else {
                Code::Internal
            }
        }
        DataFusionError::Internal(_)
        | DataFusionError::Substrait(_)
        | DataFusionError::Ffi(_)
        | DataFusionError::Context(..)
        | DataFusionError::Diagnostic(..)
        | DataFusionError::Collection(_)
        | DataFusionError::Shared(_) => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if e.is_server_fault() {
            tracing::error!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, ?code, "request rejected");
        }
        // Our own error wrapped by DataFusion says it best without the wrappers'
        // prefixes ("External error: Parquet error: ...").
        let message = match &e {
            Error::DataFusion(d) => {
                ours_in(d.as_ref()).map_or_else(|| e.to_string(), Error::to_string)
            }
            _ => e.to_string(),
        };
        Status::new(code, truncate(message))
    }
}

/// Cuts `message` to [`MAX_MESSAGE_BYTES`] on a character boundary.
fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (truncated)");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        // Errors travel through every Result on the hot path: keep them two words or so.
        assert!(
            size_of::<Error>() <= 56,
            "Error is {} bytes",
            size_of::<Error>()
        );
    }

    #[test]
    fn codes_by_fault() {
        assert_eq!(Error::invalid("x").code(), Code::InvalidArgument);
        let nf = Error::TableNotFound {
            name: "t".into(),
            available: vec!["a".into(), "b".into()],
        };
        assert_eq!(nf.code(), Code::NotFound);
        assert!(nf.to_string().contains("available tables: a, b"));
        let plan = Error::from(DataFusionError::Plan("bad".into()));
        assert_eq!(plan.code(), Code::InvalidArgument);
        let mem = Error::from(DataFusionError::Context(
            "ctx".into(),
            Box::new(DataFusionError::ResourcesExhausted("pool".into())),
        ));
        assert_eq!(mem.code(), Code::ResourceExhausted);
        assert_eq!(Error::Internal("bug".into()).code(), Code::Internal);
    }

    #[test]
    fn long_messages_are_capped() {
        let status = Status::from(Error::invalid("é".repeat(5000)));
        assert!(status.message().len() < MAX_MESSAGE_BYTES + 20);
        assert!(status.message().ends_with("(truncated)"));
    }
}
