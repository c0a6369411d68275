//! One query's life, from its arrival to its last message: its entry in the active
//! queries, its admission slot, and its metrics.

use std::sync::Arc;
use std::time::Instant;

use super::active::{ActiveQueries, ActiveQuery};
use super::admission::Slot;
use crate::audit::{AuditLog, MAX_SQL_BYTES, Origin, QueryRecord, cut};
use crate::error::Result;
use crate::metrics::{Outcome, QueryMetrics};

/// What the audit line of a query needs beyond its listing.
#[derive(Debug)]
pub(super) struct QueryAudit {
    log: Arc<AuditLog>,
    origin: Origin,
    /// The statement up to the audit log's limit.
    sql: String,
    sql_bytes: usize,
}

impl QueryAudit {
    pub(super) fn new(log: Arc<AuditLog>, origin: Origin, sql: &str) -> Self {
        Self {
            log,
            origin,
            sql: cut(sql, MAX_SQL_BYTES).0.to_string(),
            sql_bytes: sql.len(),
        }
    }
}

/// A query that is queued, planning or streaming. While it lives it is listed by
/// `list-queries` and counts in `quiver_queries_active` (once admitted); when dropped it
/// leaves the list, frees its slot and records its duration and outcome: the one given
/// to [`RunningQuery::finish`], or `cancelled` if it never finished (the client went
/// away and the task holding it was dropped).
#[derive(Debug)]
pub struct RunningQuery {
    metrics: QueryMetrics,
    active: Arc<ActiveQuery>,
    queries: Arc<ActiveQueries>,
    slot: Option<Slot>,
    started: Instant,
    sent_first_batch: bool,
    outcome: Option<Outcome>,
    audit: Option<QueryAudit>,
}

impl RunningQuery {
    /// Lists the query. Fails (and counts the outcome) if it may not start.
    pub(super) fn start(
        metrics: QueryMetrics,
        active: Arc<ActiveQuery>,
        queries: Arc<ActiveQueries>,
        audit: Option<QueryAudit>,
    ) -> Result<Self> {
        if let Err(e) = queries.insert(&active) {
            metrics
                .queries
                .with_label_values(&[e.outcome().as_str()])
                .inc();
            return Err(e);
        }
        Ok(Self {
            metrics,
            active,
            queries,
            slot: None,
            started: Instant::now(),
            sent_first_batch: false,
            outcome: None,
            audit,
        })
    }

    /// Holds `slot` until the query ends; from now on the query counts as active.
    pub(super) fn admitted(&mut self, slot: Slot) {
        self.metrics.active.inc();
        self.slot = Some(slot);
    }

    /// Records planning time, measured from arrival.
    pub(super) fn planned(&self) {
        self.metrics
            .planning
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// The query as `list-queries` shows it, and its cancellation token.
    pub fn active(&self) -> &Arc<ActiveQuery> {
        &self.active
    }

    /// When the query arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether a record batch has been sent yet.
    pub fn sent_first_batch(&self) -> bool {
        self.sent_first_batch
    }

    /// Records one Flight message handed to the network: `rows` is `Some` for a record
    /// batch message (schema and dictionary messages carry no rows). Empty batches
    /// (keep-alives) count as bytes only: the first batch is the first with rows.
    pub fn sent(&mut self, rows: Option<u64>, bytes: u64) {
        self.metrics.bytes_sent.inc_by(bytes);
        self.active.add_bytes_sent(bytes);
        let Some(rows) = rows.filter(|&rows| rows > 0) else {
            return;
        };
        if !self.sent_first_batch {
            self.sent_first_batch = true;
            self.metrics
                .first_batch
                .observe(self.started.elapsed().as_secs_f64());
        }
        self.metrics.batches_sent.inc();
        self.metrics.rows_sent.inc_by(rows);
        self.active.add_rows_sent(rows);
    }

    /// Sets how the query ended; the first call wins.
    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl Drop for RunningQuery {
    fn drop(&mut self) {
        // What the client was told, when that was decided outside this query's task.
        let outcome = self
            .active
            .outcome()
            .or(self.outcome)
            .unwrap_or(Outcome::Cancelled);
        let duration = self.started.elapsed();
        self.metrics.duration.observe(duration.as_secs_f64());
        if let Some(audit) = &self.audit {
            let (rows, bytes) = self.active.sent();
            let code = match outcome {
                Outcome::Success => tonic::Code::Ok,
                _ => self.active.code().unwrap_or(match outcome {
                    Outcome::Cancelled => tonic::Code::Cancelled,
                    Outcome::Timeout => tonic::Code::DeadlineExceeded,
                    Outcome::Rejected => tonic::Code::Unavailable,
                    _ => tonic::Code::Unknown,
                }),
            };
            audit.log.query(&QueryRecord {
                origin: &audit.origin,
                user: self.active.user(),
                query_id: self.active.id(),
                sql: &audit.sql,
                sql_bytes: audit.sql_bytes,
                tables: &self.active.tables(),
                outcome: outcome.as_str(),
                code,
                rows,
                bytes,
                duration,
                peak_memory: self.active.memory_peak(),
            });
        }
        self.metrics
            .queries
            .with_label_values(&[outcome.as_str()])
            .inc();
        self.queries.remove(self.active.id());
        // Last: a scrape that sees the query gone also sees it counted.
        if self.slot.take().is_some() {
            self.metrics.active.dec();
        }
    }
}
