//! What a query read and what pushdown let it skip, from the metrics of its executed plan.
//!
//! Partition pruning happens in our table provider, before DataFusion sees any file;
//! it reports into a per-query [`PartitionPruning`] extension of the session (defined
//! in the catalog, which fills it). Everything
//! after it (file and row-group statistics, bloom filters, page index, row filters,
//! bytes read) is counted by DataFusion's Parquet scan in the plan's metrics.

use parking_lot::Mutex;
use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::NetworkBoundaryExt;

use crate::catalog::PartitionPruning;
use datafusion::physical_plan::metrics::MetricValue;
use serde::Serialize;

/// Scan figures of one query, or summed over many.
///
/// "Files" are file ranges as DataFusion opens them: a large file may be split into
/// several ranges when a scan is repartitioned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ScanSummary {
    /// Files of the scanned tables.
    pub files_total: u64,
    /// Files skipped by partition values.
    pub files_pruned_partition: u64,
    /// Batches of the scanned pinned tables (`--pin-table`).
    pub batches_total: u64,
    /// Pinned batches skipped by their statistics.
    pub batches_pruned: u64,
    /// Rows of the other pinned batches skipped because a sorted column put them outside
    /// a filter's range.
    pub batch_rows_skipped: u64,
    /// Files skipped by file-level statistics.
    pub files_pruned_statistics: u64,
    /// Files opened.
    pub files_scanned: u64,
    /// Row groups in the opened files.
    pub row_groups_total: u64,
    /// Row groups skipped by min/max statistics.
    pub row_groups_pruned_statistics: u64,
    /// Row groups skipped by bloom filters.
    pub row_groups_pruned_bloom_filter: u64,
    /// Row groups skipped because a LIMIT was already satisfied or a dynamic filter
    /// (e.g. from a join or TopK) excluded them.
    pub row_groups_pruned_other: u64,
    /// Row groups read, from their files or decoded from the row group cache.
    pub row_groups_scanned: u64,
    /// Of them, taken decoded from the row group cache (found there, or read into it by
    /// this query).
    pub row_groups_from_cache: u64,
    /// Pages skipped by the page index.
    pub pages_pruned: u64,
    /// Rows in pages skipped by the page index.
    pub rows_pruned_page_index: u64,
    /// Rows decoded and then dropped by filters pushed into the reader.
    pub rows_pruned_filter: u64,
    /// Rows that passed the filters pushed into the reader.
    pub rows_matched_filter: u64,
    /// Bytes read from files (footers excluded when cached).
    pub bytes_scanned: u64,
    /// Bytes of S3 objects fetched from the store.
    pub bytes_from_store: u64,
    /// Bytes of S3 objects served from the local cache.
    pub bytes_from_cache: u64,
    /// Spill files written by sorts, aggregations and joins over the memory limit.
    pub spill_files: u64,
    /// Bytes written to spill files.
    pub spilled_bytes: u64,
    /// Stages of a query run across the cluster (0 when it ran on one node).
    pub stages: u64,
}

impl ScanSummary {
    /// Reads the figures from an executed `plan` and its query's partition pruning.
    pub fn collect(plan: &dyn ExecutionPlan, pruning: &PartitionPruning) -> Self {
        let mut summary = Self {
            files_total: pruning.files().0,
            files_pruned_partition: pruning.files().1,
            batches_total: pruning.batches().0,
            batches_pruned: pruning.batches().1,
            batch_rows_skipped: pruning.batches().2,
            ..Self::default()
        };
        let mut pruned_limit = 0;
        let mut plans = vec![plan];
        while let Some(plan) = plans.pop() {
            plans.extend(plan.children().into_iter().map(|c| c.as_ref()));
            // Each network boundary reads a stage; the head stage reads them.
            if plan.is_network_boundary() {
                summary.stages += 1;
            }
            let Some(metrics) = plan.metrics() else {
                continue;
            };
            for metric in metrics.iter() {
                match metric.value() {
                    MetricValue::Count { name, count } => {
                        let value = count.value() as u64;
                        match name.as_ref() {
                            "bytes_scanned" => summary.bytes_scanned += value,
                            "bytes_from_store" => summary.bytes_from_store += value,
                            "bytes_from_cache" => summary.bytes_from_cache += value,
                            "pushdown_rows_pruned" => summary.rows_pruned_filter += value,
                            "pushdown_rows_matched" => summary.rows_matched_filter += value,
                            "row_groups_pruned_dynamic_filter" => {
                                summary.row_groups_pruned_other += value;
                            }
                            _ => {}
                        }
                    }
                    MetricValue::PruningMetrics {
                        name,
                        pruning_metrics,
                    } => {
                        let pruned = pruning_metrics.pruned() as u64;
                        let matched = pruning_metrics.matched() as u64;
                        match name.as_ref() {
                            "files_ranges_pruned_statistics" => {
                                summary.files_pruned_statistics += pruned;
                                summary.files_scanned += matched;
                            }
                            // Every opened file reports all its row groups here,
                            // pruned or matched, even without a predicate.
                            "row_groups_pruned_statistics" => {
                                summary.row_groups_pruned_statistics += pruned;
                                summary.row_groups_total += pruned + matched;
                            }
                            "row_groups_pruned_bloom_filter" => {
                                summary.row_groups_pruned_bloom_filter += pruned;
                            }
                            "limit_pruned_row_groups" => pruned_limit += pruned,
                            "page_index_pages_pruned" => summary.pages_pruned += pruned,
                            "page_index_rows_pruned" => summary.rows_pruned_page_index += pruned,
                            _ => {}
                        }
                    }
                    MetricValue::SpillCount(count) => summary.spill_files += count.value() as u64,
                    MetricValue::SpilledBytes(count) => {
                        summary.spilled_bytes += count.value() as u64;
                    }
                    _ => {}
                }
            }
        }
        if summary.stages > 0 {
            summary.stages += 1;
        }
        // What the row group cache planned, which the Parquet scans skipped unseen.
        let cached = pruning.cached();
        summary.files_scanned += cached.files_read;
        summary.row_groups_total += cached.row_groups;
        summary.row_groups_pruned_statistics += cached.row_groups_pruned;
        summary.row_groups_from_cache = cached.row_groups_from_cache;
        summary.bytes_scanned += cached.bytes_loaded;
        summary.row_groups_pruned_other += pruned_limit;
        summary.row_groups_scanned = summary.row_groups_total.saturating_sub(
            summary.row_groups_pruned_statistics
                + summary.row_groups_pruned_bloom_filter
                + summary.row_groups_pruned_other,
        );
        summary
    }

    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &Self) {
        self.files_total += other.files_total;
        self.files_pruned_partition += other.files_pruned_partition;
        self.batches_total += other.batches_total;
        self.batches_pruned += other.batches_pruned;
        self.batch_rows_skipped += other.batch_rows_skipped;
        self.files_pruned_statistics += other.files_pruned_statistics;
        self.files_scanned += other.files_scanned;
        self.row_groups_total += other.row_groups_total;
        self.row_groups_pruned_statistics += other.row_groups_pruned_statistics;
        self.row_groups_pruned_bloom_filter += other.row_groups_pruned_bloom_filter;
        self.row_groups_pruned_other += other.row_groups_pruned_other;
        self.row_groups_scanned += other.row_groups_scanned;
        self.row_groups_from_cache += other.row_groups_from_cache;
        self.pages_pruned += other.pages_pruned;
        self.rows_pruned_page_index += other.rows_pruned_page_index;
        self.rows_pruned_filter += other.rows_pruned_filter;
        self.rows_matched_filter += other.rows_matched_filter;
        self.bytes_scanned += other.bytes_scanned;
        self.bytes_from_store += other.bytes_from_store;
        self.bytes_from_cache += other.bytes_from_cache;
        self.spill_files += other.spill_files;
        self.spilled_bytes += other.spilled_bytes;
        self.stages += other.stages;
    }
}

/// Records a query's scan summary when dropped: after the last batch, on an error, or
/// when the client goes away, so the totals never miss a query.
#[derive(Debug)]
pub struct ScanReport {
    plan: Arc<dyn ExecutionPlan>,
    pruning: Arc<PartitionPruning>,
    totals: Arc<Mutex<ScanSummary>>,
    /// The statement, for the debug log.
    sql: String,
}

/// Longest statement text the scan log line quotes.
const LOGGED_SQL_CHARS: usize = 200;

impl ScanReport {
    pub(super) fn new(
        plan: Arc<dyn ExecutionPlan>,
        pruning: Arc<PartitionPruning>,
        totals: Arc<Mutex<ScanSummary>>,
        sql: &str,
    ) -> Self {
        Self {
            plan,
            pruning,
            totals,
            sql: sql.chars().take(LOGGED_SQL_CHARS).collect(),
        }
    }

    /// The figures so far.
    pub fn summary(&self) -> ScanSummary {
        ScanSummary::collect(self.plan.as_ref(), &self.pruning)
    }
}

impl Drop for ScanReport {
    fn drop(&mut self) {
        let summary = self.summary();
        self.totals.lock().add(&summary);
        tracing::debug!(
            sql = %self.sql,
            summary = %serde_json::to_string(&summary).unwrap_or_default(),
            "scan summary"
        );
    }
}
