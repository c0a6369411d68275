//! The queries waiting or running now: what `list-queries` shows and what
//! `cancel-query`, `CancelFlightInfo` and shutdown cancel.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::caller::Caller;
use crate::error::{Error, Result};
use crate::metrics::Outcome;

/// Longest SQL text `list-queries` shows, in characters.
const LISTED_SQL_CHARS: usize = 1000;

/// Ids of queries cancelled before they started (a `CancelFlightInfo` for a ticket not
/// yet redeemed), remembered so that the ticket fails when it arrives.
const CANCELLED_EARLY_CAPACITY: usize = 4096;

/// Longest query id accepted from a client, in bytes. Ours are 16 hex digits.
pub const MAX_QUERY_ID_BYTES: usize = 64;

/// Checks a query id a client sent (in a ticket, `cancel-query`, `CancelFlightInfo`):
/// ids are kept and listed, so they are short and plain.
pub fn check_query_id(id: &str) -> Result<()> {
    let plain = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if id.is_empty() || id.len() > MAX_QUERY_ID_BYTES || !plain {
        return Err(Error::invalid(format!(
            "a query id is 1 to {MAX_QUERY_ID_BYTES} letters, digits, '-' or '_' (got {} bytes); \
             use the id from list-queries or the ticket GetFlightInfo returned",
            id.len()
        )));
    }
    Ok(())
}

/// Where a query is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryState {
    /// Waiting for a slot (admission control).
    Queued = 0,
    /// Parsing and planning.
    Planning = 1,
    /// Streaming results.
    Running = 2,
}

/// One query waiting or running.
#[derive(Debug)]
pub struct ActiveQuery {
    id: String,
    user: Option<String>,
    sql: String,
    started: SystemTime,
    state: AtomicU8,
    rows_sent: AtomicU64,
    bytes_sent: AtomicU64,
    /// Bytes this query holds in the memory pool (kept by its `QueryPool`).
    memory: Arc<AtomicUsize>,
    /// The most it held at once.
    memory_peak: Arc<AtomicUsize>,
    /// The tables its plan reads, once planned.
    tables: Mutex<Vec<String>>,
    /// The gRPC code of the error it ended with; the first recorded wins.
    code: Mutex<Option<tonic::Code>>,
    cancel: CancellationToken,
    cause: Mutex<Option<Cause>>,
    /// How the query ended, when decided outside the task that runs it (a deadline
    /// watched from the network runtime): the client saw this, so it is counted.
    outcome: Mutex<Option<Outcome>>,
}

/// Why a query was cancelled.
#[derive(Debug, Clone)]
enum Cause {
    /// By a client or operator, with who and how.
    Request(String),
    /// The shutdown grace period ended.
    Shutdown,
    /// The memory guard stopped it, with what it saw.
    Memory(String),
}

impl ActiveQuery {
    /// A query by `user` (when authentication is on) running `sql`.
    pub fn new(id: String, user: Option<String>, sql: &str) -> Self {
        Self {
            id,
            user,
            sql: sql.chars().take(LISTED_SQL_CHARS).collect(),
            started: SystemTime::now(),
            state: AtomicU8::new(QueryState::Planning as u8),
            rows_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            memory: Arc::default(),
            memory_peak: Arc::default(),
            tables: Mutex::default(),
            code: Mutex::default(),
            cancel: CancellationToken::new(),
            cause: Mutex::new(None),
            outcome: Mutex::new(None),
        }
    }

    /// The query's id, as `list-queries` shows it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Who runs it, when authentication is on.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Fires when the query is cancelled.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// The error the query ends with once cancelled: ABORTED, or UNAVAILABLE
    /// (retryable elsewhere) when the server shut down.
    pub fn cancel_error(&self) -> Error {
        match self.cause.lock().clone() {
            Some(Cause::Shutdown) => Error::ShuttingDown,
            Some(Cause::Memory(reason)) => Error::MemoryExhausted { reason },
            Some(Cause::Request(reason)) => Error::Cancelled { reason },
            None => Error::Cancelled {
                reason: "cancelled".into(),
            },
        }
    }

    /// Cancels the query; the first cause is kept.
    fn cancel_with(&self, cause: Cause) {
        self.cause.lock().get_or_insert(cause);
        self.cancel.cancel();
    }

    /// Records how the query ended for the client, from outside the task running it;
    /// the first call wins.
    pub fn set_outcome(&self, outcome: Outcome) {
        self.outcome.lock().get_or_insert(outcome);
    }

    /// The outcome [`Self::set_outcome`] recorded.
    pub(super) fn outcome(&self) -> Option<Outcome> {
        *self.outcome.lock()
    }

    pub(super) fn set_state(&self, state: QueryState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    fn state(&self) -> QueryState {
        match self.state.load(Ordering::Relaxed) {
            0 => QueryState::Queued,
            1 => QueryState::Planning,
            _ => QueryState::Running,
        }
    }

    pub(super) fn add_rows_sent(&self, rows: u64) {
        self.rows_sent.fetch_add(rows, Ordering::Relaxed);
    }

    pub(super) fn add_bytes_sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Rows and bytes sent so far.
    pub(super) fn sent(&self) -> (u64, u64) {
        (
            self.rows_sent.load(Ordering::Relaxed),
            self.bytes_sent.load(Ordering::Relaxed),
        )
    }

    /// The counters the query's memory pool keeps: bytes held now, and the most at once.
    pub(super) fn memory(&self) -> (&Arc<AtomicUsize>, &Arc<AtomicUsize>) {
        (&self.memory, &self.memory_peak)
    }

    /// The most bytes the query held in the memory pool at once.
    pub(super) fn memory_peak(&self) -> usize {
        self.memory_peak.load(Ordering::Relaxed)
    }

    /// Records the tables the plan reads.
    pub(super) fn set_tables(&self, tables: Vec<String>) {
        *self.tables.lock() = tables;
    }

    /// The tables the plan reads (empty until planned).
    pub(super) fn tables(&self) -> Vec<String> {
        self.tables.lock().clone()
    }

    /// Records the gRPC code of the error the query ends with; the first call wins.
    pub fn set_code(&self, code: tonic::Code) {
        self.code.lock().get_or_insert(code);
    }

    /// The code [`Self::set_code`] recorded.
    pub(super) fn code(&self) -> Option<tonic::Code> {
        *self.code.lock()
    }

    fn snapshot(&self) -> QuerySnapshot {
        let started: chrono::DateTime<chrono::Utc> = self.started.into();
        QuerySnapshot {
            id: self.id.clone(),
            user: self.user.clone(),
            started: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            elapsed_seconds: self.started.elapsed().unwrap_or_default().as_secs_f64(),
            state: self.state(),
            rows_sent: self.rows_sent.load(Ordering::Relaxed),
            memory_reserved_bytes: self.memory.load(Ordering::Relaxed) as u64,
            sql: self.sql.clone(),
        }
    }
}

/// One entry of `list-queries`.
#[derive(Debug, Clone, Serialize)]
pub struct QuerySnapshot {
    /// Pass to `cancel-query`.
    pub id: String,
    /// Who runs it (when authentication is on).
    pub user: Option<String>,
    /// When it arrived (RFC 3339, UTC).
    pub started: String,
    /// Seconds since it arrived.
    pub elapsed_seconds: f64,
    /// Queued, planning or running.
    pub state: QueryState,
    /// Result rows sent so far.
    pub rows_sent: u64,
    /// Bytes it holds in the memory pool.
    pub memory_reserved_bytes: u64,
    /// The statement, cut at 1000 characters.
    pub sql: String,
}

/// A ticket cancelled before it was redeemed, and who cancelled it: it is void only
/// for its own user (or for anyone, when an admin or an unauthenticated server
/// cancelled it).
#[derive(Debug)]
struct EarlyCancel {
    id: String,
    /// `None`: whoever redeems it.
    user: Option<String>,
}

/// Every query waiting or running.
#[derive(Debug, Default)]
pub struct ActiveQueries {
    queries: Mutex<HashMap<String, Arc<ActiveQuery>>>,
    cancelled_early: Mutex<VecDeque<EarlyCancel>>,
    shutting_down: AtomicBool,
}

impl ActiveQueries {
    /// Adds a query. Fails if its id was cancelled before it arrived, is already
    /// running, or the server is shutting down.
    pub(super) fn insert(&self, query: &Arc<ActiveQuery>) -> Result<()> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        // One lock: the guard of an `if let` scrutinee lives through its block.
        let voided = {
            let mut early = self.cancelled_early.lock();
            let pos = early
                .iter()
                .position(|c| c.id == query.id && (c.user.is_none() || c.user == query.user));
            pos.and_then(|pos| early.remove(pos)).is_some()
        };
        if voided {
            return Err(Error::Cancelled {
                reason: "CancelFlightInfo cancelled this ticket before it was redeemed".into(),
            });
        }
        let mut queries = self.queries.lock();
        if queries.contains_key(&query.id) {
            return Err(Error::invalid(format!(
                "query {} is already running: a ticket from GetFlightInfo can be redeemed once at a time",
                query.id
            )));
        }
        queries.insert(query.id.clone(), Arc::clone(query));
        Ok(())
    }

    pub(super) fn remove(&self, id: &str) {
        self.queries.lock().remove(id);
    }

    /// The queries `caller` may see, oldest first.
    pub fn list(&self, caller: &Caller) -> Vec<QuerySnapshot> {
        let mut list: Vec<_> = self
            .queries
            .lock()
            .values()
            .filter(|q| caller.may_see(q))
            .map(|q| q.snapshot())
            .collect();
        list.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        list
    }

    /// Cancels query `id` on behalf of `caller` (`cancel-query`).
    pub fn cancel(&self, id: &str, caller: &Caller) -> Result<()> {
        self.cancel_via(id, caller, "cancel-query")
    }

    fn cancel_via(&self, id: &str, caller: &Caller, via: &str) -> Result<()> {
        check_query_id(id)?;
        let query = self.queries.lock().get(id).cloned();
        let Some(query) = query else {
            return Err(Error::invalid(format!(
                "no query with id '{id}' is running (DoAction \"list-queries\" lists them)"
            )));
        };
        if !caller.may_see(&query) {
            return Err(Error::PermissionDenied {
                reason: format!(
                    "query {id} belongs to another user; only its user or an admin may cancel it"
                ),
            });
        }
        query.cancel_with(Cause::Request(format!(
            "cancelled by {} ({via})",
            caller.name()
        )));
        Ok(())
    }

    /// Cancels the query a `GetFlightInfo` ticket starts: now if it runs, or when its
    /// ticket arrives. Returns whether it was running.
    pub fn cancel_ticket(&self, id: &str, caller: &Caller) -> Result<bool> {
        let running = self.queries.lock().contains_key(id);
        if running {
            self.cancel_via(id, caller, "CancelFlightInfo")?;
            return Ok(true);
        }
        check_query_id(id)?;
        let user = caller.cancels_for();
        let mut early = self.cancelled_early.lock();
        if early.len() == CANCELLED_EARLY_CAPACITY {
            early.pop_front();
        }
        early.push_back(EarlyCancel {
            id: id.to_string(),
            user,
        });
        Ok(false)
    }

    /// Cancels the query holding the most pool memory (the newest, when none holds any:
    /// allocations outside the pool are not attributed to queries, and a sudden spike
    /// most likely comes from what started last) with RESOURCE_EXHAUSTED. Returns its id.
    pub fn cancel_largest(&self, reason: &str) -> Option<String> {
        let queries = self.queries.lock();
        let largest = queries
            .values()
            .filter(|q| !q.cancel.is_cancelled())
            .max_by_key(|q| (q.memory.load(Ordering::Relaxed), q.started))?;
        largest.cancel_with(Cause::Memory(reason.to_string()));
        Some(largest.id.clone())
    }

    /// Refuses new queries and cancels every query; they end with UNAVAILABLE.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for query in self.queries.lock().values() {
            query.cancel_with(Cause::Shutdown);
        }
    }

    /// Queries waiting or running.
    pub fn len(&self) -> usize {
        self.queries.lock().len()
    }

    /// Whether no query is waiting or running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, admin: bool) -> Caller {
        Caller {
            user: Some(name.into()),
            admin,
            ..Caller::default()
        }
    }

    fn query(id: &str, user: Option<&str>) -> Arc<ActiveQuery> {
        Arc::new(ActiveQuery::new(
            id.into(),
            user.map(Into::into),
            "SELECT 1",
        ))
    }

    #[test]
    fn users_see_and_cancel_their_own_admins_everything() {
        let queries = ActiveQueries::default();
        let (a, b) = (query("a", Some("alice")), query("b", Some("bob")));
        queries.insert(&a).unwrap();
        queries.insert(&b).unwrap();
        let ids = |c: &Caller| {
            queries
                .list(c)
                .into_iter()
                .map(|q| q.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&user("alice", false)), ["a"]);
        assert_eq!(ids(&user("ops", true)).len(), 2);
        assert_eq!(ids(&Caller::default()).len(), 2);
        let err = queries.cancel("b", &user("alice", false)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(!b.cancelled().is_cancelled());
        queries.cancel("b", &user("ops", true)).unwrap();
        assert!(b.cancelled().is_cancelled());
        assert!(b.cancel_error().to_string().contains("cancelled by ops"));
        let err = queries.cancel("zzz", &Caller::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_ticket_cancelled_before_it_arrives_fails_once_it_does() {
        let queries = ActiveQueries::default();
        assert!(!queries.cancel_ticket("t", &Caller::default()).unwrap());
        let err = queries.insert(&query("t", None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        // The mark is used up: the same id may run later.
        queries.insert(&query("t", None)).unwrap();
        queries.remove("t");
        // A user's early cancel voids only their own ticket.
        assert!(!queries.cancel_ticket("u", &user("mallory", false)).unwrap());
        queries.insert(&query("u", Some("alice"))).unwrap();
        queries.remove("u");
        assert!(!queries.cancel_ticket("u", &user("alice", false)).unwrap());
        assert!(queries.insert(&query("u", Some("alice"))).is_err());
        // Ids are bounded.
        let long = "a".repeat(MAX_QUERY_ID_BYTES + 1);
        assert!(queries.cancel_ticket(&long, &Caller::default()).is_err());
        assert!(queries.cancel_ticket("a b", &Caller::default()).is_err());
        queries.insert(&query("t", None)).unwrap();
        // Not twice at once.
        let err = queries.insert(&query("t", None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        queries.remove("t");
        assert!(queries.is_empty());
    }

    #[test]
    fn shutdown_cancels_everything_and_refuses_newcomers() {
        let queries = ActiveQueries::default();
        let a = query("a", None);
        queries.insert(&a).unwrap();
        queries.shut_down();
        assert!(a.cancelled().is_cancelled());
        assert_eq!(a.cancel_error().code(), tonic::Code::Unavailable);
        let err = queries.insert(&query("b", None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
}
