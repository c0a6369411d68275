//! What partition pruning (and a pinned table's batch statistics) skipped in one query: the catalog's table scans report into it,
//! the query's scan summary (`query::ScanReport`) reads it.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::pinned::Selected;

/// Partition pruning counts of one query, filled in by table scans.
#[derive(Debug, Default)]
pub struct PartitionPruning {
    files_total: AtomicU64,
    files_pruned: AtomicU64,
    batches_total: AtomicU64,
    batches_pruned: AtomicU64,
    batch_rows_skipped: AtomicU64,
    /// The table of every scan planned, in order (a self-join scans a table twice).
    tables: Mutex<Vec<String>>,
}

impl PartitionPruning {
    /// Records a scan of `table` that kept `kept` of `total` files.
    pub fn record(&self, table: &str, total: usize, kept: usize) {
        self.files_total.fetch_add(total as u64, Ordering::Relaxed);
        self.files_pruned
            .fetch_add(total.saturating_sub(kept) as u64, Ordering::Relaxed);
        self.tables.lock().push(table.to_string());
    }

    /// Records a scan of pinned `table` and what it `selected`.
    pub(crate) fn record_batches(&self, table: &str, selected: &Selected) {
        self.tables.lock().push(table.to_string());
        self.batches_total
            .fetch_add(selected.total as u64, Ordering::Relaxed);
        self.batches_pruned.fetch_add(
            selected.total.saturating_sub(selected.kept) as u64,
            Ordering::Relaxed,
        );
        self.batch_rows_skipped
            .fetch_add(selected.rows_skipped as u64, Ordering::Relaxed);
    }

    /// Batches of the scanned pinned tables, how many of them their statistics skipped,
    /// and the rows of the others that sorted columns skipped.
    pub fn batches(&self) -> (u64, u64, u64) {
        (
            self.batches_total.load(Ordering::Relaxed),
            self.batches_pruned.load(Ordering::Relaxed),
            self.batch_rows_skipped.load(Ordering::Relaxed),
        )
    }

    /// Files of the scanned tables, and how many of them their partition values skipped.
    pub fn files(&self) -> (u64, u64) {
        (
            self.files_total.load(Ordering::Relaxed),
            self.files_pruned.load(Ordering::Relaxed),
        )
    }

    /// The tables scanned so far.
    pub fn tables(&self) -> Vec<String> {
        self.tables.lock().clone()
    }
}
