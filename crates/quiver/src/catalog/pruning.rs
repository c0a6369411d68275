//! What partition pruning (and a pinned table's batch statistics) skipped in one query,
//! and what its scans read from the row group cache, which DataFusion's Parquet scan
//! never sees: the catalog's table scans report into it, the query's scan summary
//! (`query::ScanReport`) reads it.

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
    /// Scans of pinned tables, of the `tables` scanned.
    pinned_scans: AtomicU64,
    cached: CachedReads,
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
        self.record_pinned(&PinnedScans {
            tables: vec![table.to_string()],
            batches: (
                selected.total as u64,
                selected.total.saturating_sub(selected.kept) as u64,
                selected.rows_skipped as u64,
            ),
        });
    }

    /// What was recorded, when every scan so far read a pinned table (and there was one).
    pub(crate) fn pinned_scans(&self) -> Option<PinnedScans> {
        let tables = self.tables.lock().clone();
        let all_pinned = self.pinned_scans.load(Ordering::Relaxed) == tables.len() as u64;
        (all_pinned && !tables.is_empty()).then(|| PinnedScans {
            tables,
            batches: self.batches(),
        })
    }

    /// Records `scans` (of another query that planned the same scans).
    pub(crate) fn record_pinned(&self, scans: &PinnedScans) {
        let (total, pruned, skipped) = scans.batches;
        self.tables.lock().extend(scans.tables.iter().cloned());
        self.pinned_scans
            .fetch_add(scans.tables.len() as u64, Ordering::Relaxed);
        self.batches_total.fetch_add(total, Ordering::Relaxed);
        self.batches_pruned.fetch_add(pruned, Ordering::Relaxed);
        self.batch_rows_skipped
            .fetch_add(skipped, Ordering::Relaxed);
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

    /// Records what a scan did with the row groups of one file that went through the row
    /// group cache (some of them taken from it); see [`CachedFile`].
    pub(crate) fn record_cached(&self, file: CachedFile) {
        let c = &self.cached;
        c.files_read
            .fetch_add(u64::from(file.no_file_scan), Ordering::Relaxed);
        c.row_groups
            .fetch_add(file.row_groups as u64, Ordering::Relaxed);
        c.row_groups_pruned
            .fetch_add(file.pruned as u64, Ordering::Relaxed);
        c.row_groups_from_cache
            .fetch_add(file.from_cache as u64, Ordering::Relaxed);
    }

    /// Records bytes read from a file to decode a row group into the cache.
    pub(crate) fn record_loaded(&self, bytes: usize) {
        self.cached
            .bytes_loaded
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// What the query's scans took from (or read into) the row group cache.
    pub fn cached(&self) -> CachedTotals {
        let c = &self.cached;
        CachedTotals {
            files_read: c.files_read.load(Ordering::Relaxed),
            row_groups: c.row_groups.load(Ordering::Relaxed),
            row_groups_pruned: c.row_groups_pruned.load(Ordering::Relaxed),
            row_groups_from_cache: c.row_groups_from_cache.load(Ordering::Relaxed),
            bytes_loaded: c.bytes_loaded.load(Ordering::Relaxed),
        }
    }
}

/// What the scans of pinned tables recorded in one query: the tables, in order, and the
/// sums of [`PartitionPruning::batches`].
#[derive(Debug, Clone)]
pub(crate) struct PinnedScans {
    tables: Vec<String>,
    batches: (u64, u64, u64),
}

/// One file's row groups as a scan with the row group cache planned them. The row groups
/// it prunes by statistics and those it takes from the cache are skipped by the Parquet
/// scan's access plan, so DataFusion counts neither; the rest it counts as without the
/// cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedFile {
    /// Every row group was pruned or taken from the cache: the Parquet scan does not open
    /// the file, so it is counted here as read.
    pub no_file_scan: bool,
    /// Row groups the Parquet scan skips: `pruned + from_cache`.
    pub row_groups: usize,
    /// Of them, skipped by their statistics.
    pub pruned: usize,
    /// Of them, taken decoded from the cache (found there, or read into it by this scan).
    pub from_cache: usize,
}

#[derive(Debug, Default)]
struct CachedReads {
    files_read: AtomicU64,
    row_groups: AtomicU64,
    row_groups_pruned: AtomicU64,
    row_groups_from_cache: AtomicU64,
    bytes_loaded: AtomicU64,
}

/// The sums of [`PartitionPruning::record_cached`] and [`PartitionPruning::record_loaded`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CachedTotals {
    /// Files whose rows all came from the cache (or were pruned).
    pub files_read: u64,
    /// Row groups the Parquet scans skipped because the cache planned them.
    pub row_groups: u64,
    /// Of them, pruned by statistics.
    pub row_groups_pruned: u64,
    /// Of them, taken from the cache.
    pub row_groups_from_cache: u64,
    /// Bytes read from files to decode row groups into the cache.
    pub bytes_loaded: u64,
}
