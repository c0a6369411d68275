//! One query's life, from its arrival to its last message: its entry in the active
//! queries, its admission slot, and its metrics.

use std::sync::Arc;
use std::time::Instant;

use super::active::{ActiveQueries, ActiveQuery};
use super::admission::Slot;
use crate::error::Result;
use crate::metrics::{Outcome, QueryMetrics};

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
}

impl RunningQuery {
    /// Lists the query. Fails (and counts the outcome) if it may not start.
    pub(super) fn start(
        metrics: QueryMetrics,
        active: Arc<ActiveQuery>,
        queries: Arc<ActiveQueries>,
    ) -> Result<Self> {
        if let Err(e) = queries.insert(&active) {
            metrics
                .queries
                .with_label_values(&[Outcome::of(&e).as_str()])
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
    /// batch message (schema and dictionary messages carry no rows).
    pub fn sent(&mut self, rows: Option<u64>, bytes: u64) {
        self.metrics.bytes_sent.inc_by(bytes);
        let Some(rows) = rows else { return };
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
        self.metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
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
