//! One query's life, from its arrival to its last message, in the metrics.

use std::time::Instant;

use crate::metrics::{Outcome, QueryMetrics};

/// A query that is planning or streaming. Counts in `quiver_queries_active` while it
/// lives; when dropped it records its duration and outcome: the one given to
/// [`RunningQuery::finish`], or `cancelled` if it never finished (the client went away
/// and the task holding it was dropped).
#[derive(Debug)]
pub struct RunningQuery {
    metrics: QueryMetrics,
    started: Instant,
    sent_first_batch: bool,
    outcome: Option<Outcome>,
}

impl RunningQuery {
    pub(super) fn start(metrics: QueryMetrics) -> Self {
        metrics.active.inc();
        Self {
            metrics,
            started: Instant::now(),
            sent_first_batch: false,
            outcome: None,
        }
    }

    /// Records planning time, measured from arrival.
    pub(super) fn planned(&self) {
        self.metrics
            .planning
            .observe(self.started.elapsed().as_secs_f64());
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
    }

    /// Sets how the query ended; the first call wins.
    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl Drop for RunningQuery {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        self.metrics
            .queries
            .with_label_values(&[outcome.as_str()])
            .inc();
        self.metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics.active.dec();
    }
}
