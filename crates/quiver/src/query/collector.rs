//! The engine's Prometheus collector: figures the engine already keeps, read at scrape time: the memory pool, spill files,
//! scan totals, memory maps and the catalog. Reading them when Prometheus asks costs
//! queries nothing and can never disagree with the engine's own numbers.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use datafusion::execution::disk_manager::DiskManager;
use datafusion::execution::memory_pool::MemoryPool;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounter, IntGauge};

use super::plan_cache::PlanCache;
use super::result_cache::ResultCache;
use super::{HeapGuard, MeteredPool, Progress, ScanSummary};
use crate::catalog::Catalog;
use crate::catalog::RowGroupCacheStats;
use crate::error::Result;
use crate::io::remote::CacheStats;
use crate::io::{ChunkCacheStats, MmapStats};

/// What the collector reads.
#[derive(Debug)]
pub(crate) struct EngineSources {
    pub pool: Arc<MeteredPool>,
    pub disk: Arc<DiskManager>,
    pub scan_totals: Arc<Mutex<ScanSummary>>,
    pub mmap: Option<Arc<MmapStats>>,
    /// The chunk cache, when on (`--chunk-cache-size`).
    pub pages: Option<Arc<ChunkCacheStats>>,
    /// The row group cache, when on (`--row-group-cache-size`).
    pub row_groups: Option<Arc<RowGroupCacheStats>>,
    /// The object cache of S3 tables, when on.
    pub cache: Option<Arc<CacheStats>>,
    pub catalog: Arc<Catalog>,
    pub cpu: Arc<Progress>,
    pub heap: Arc<HeapGuard>,
    /// The result cache, when on (`--result-cache-size`).
    pub results: Option<Arc<ResultCache>>,
    /// The plan cache, when on (`--plan-cache-entries`).
    pub plans: Option<Arc<PlanCache>>,
}

/// Reads a gauge's current value from the sources.
type ReadGauge = fn(&EngineSources) -> i64;
/// Reads a counter's running total from the sources.
type ReadCounter = fn(&EngineSources) -> u64;

/// A [`Collector`] that copies the engine's figures into its metrics on every scrape.
#[derive(Debug)]
pub(crate) struct EngineCollector {
    sources: EngineSources,
    /// Serialises scrapes, so two at once cannot both add the same counter delta.
    scrape: Mutex<()>,
    gauges: Vec<(IntGauge, ReadGauge)>,
    counters: Vec<(IntCounter, ReadCounter)>,
    last_refresh: Gauge,
    probe_wait: Gauge,
}

impl EngineCollector {
    pub(crate) fn new(sources: EngineSources) -> Result<Self> {
        let gauge = |name: &str, help: &str, read: ReadGauge| {
            Ok::<_, prometheus::Error>((IntGauge::new(name, help)?, read))
        };
        let counter = |name: &str, help: &str, read: ReadCounter| {
            Ok::<_, prometheus::Error>((IntCounter::new(name, help)?, read))
        };
        let gauges = vec![
            gauge(
                "quiver_result_cache_bytes",
                "Bytes of query answers kept in the result cache (reserved from the query pool).",
                |s| results(s, |c| c.size().0 as u64) as i64,
            )?,
            gauge(
                "quiver_result_cache_entries",
                "Query answers kept in the result cache.",
                |s| results(s, |c| c.size().1 as u64) as i64,
            )?,
            gauge(
                "quiver_chunk_cache_bytes",
                "Bytes of decompressed column chunks kept in the chunk cache (reserved from the query pool).",
                |s| pages(s, |p| &p.bytes) as i64,
            )?,
            gauge(
                "quiver_row_group_cache_bytes",
                "Bytes of decoded row groups kept in the row group cache (reserved from the query pool).",
                |s| row_groups(s, |r| &r.bytes) as i64,
            )?,
            gauge(
                "quiver_plan_cache_entries",
                "Plans of statements kept in the plan cache (--plan-cache-entries).",
                |s| s.plans.as_deref().map_or(0, PlanCache::entries) as i64,
            )?,
            gauge(
                "quiver_cache_bytes",
                "Bytes of S3 object blocks in the local cache (--cache-dir).",
                |s| cache(s, |c| &c.bytes) as i64,
            )?,
            gauge(
                "quiver_cache_limit_bytes",
                "Most bytes the local object cache may hold (--cache-max-size).",
                |s| cache(s, |c| &c.limit) as i64,
            )?,
            gauge(
                "quiver_memory_pool_reserved_bytes",
                "Bytes reserved from the query memory pool now.",
                |s| s.pool.reserved() as i64,
            )?,
            gauge(
                "quiver_memory_pool_peak_bytes",
                "Most bytes reserved from the query memory pool at once since start-up.",
                |s| s.pool.peak() as i64,
            )?,
            gauge(
                "quiver_memory_pool_limit_bytes",
                "Bytes all queries may reserve together (--memory-limit).",
                |s| i64::try_from(s.pool.limit()).unwrap_or(i64::MAX),
            )?,
            gauge(
                "quiver_spill_disk_bytes",
                "Bytes of spill files on disk now.",
                |s| s.disk.spilling_progress().current_bytes as i64,
            )?,
            gauge(
                "quiver_mmap_mapped_bytes",
                "Bytes of Parquet files memory-mapped now (cached, or held by running queries).",
                |s| mmap(s, |m| &m.live_bytes) as i64,
            )?,
            gauge(
                "quiver_mmap_mapped_files",
                "Parquet files memory-mapped now.",
                |s| mmap(s, |m| &m.live_files) as i64,
            )?,
            gauge(
                "quiver_mmap_cached_bytes",
                "Bytes of memory-mapped files kept in the mapping cache.",
                |s| mmap(s, |m| &m.cached_bytes) as i64,
            )?,
            gauge(
                "quiver_cpu_runtime_alive_tasks",
                "Tasks on the query runtime not yet finished (queries planning or running, \
                 the progress probe); 0 when idle, so a task that outlives its query shows.",
                |s| s.cpu.alive_tasks() as i64,
            )?,
            gauge(
                "quiver_cpu_runtime_stalled",
                "1 while every query thread is busy without yielding (an empty probe task \
                 waited past the threshold); new queries are refused meanwhile.",
                |s| i64::from(s.cpu.stalled()),
            )?,
            gauge(
                "quiver_memory_hard_limit_bytes",
                "Allocated bytes above which new queries are refused and the largest is \
                 cancelled (--memory-hard-limit); 0 when off.",
                |s| i64::try_from(s.heap.limit()).unwrap_or(i64::MAX),
            )?,
            gauge(
                "quiver_memory_hard_limit_exceeded",
                "1 while allocated bytes are over --memory-hard-limit.",
                |s| i64::from(s.heap.over()),
            )?,
            gauge("quiver_catalog_tables", "Tables served.", |s| {
                s.catalog.table_names().len() as i64
            })?,
            gauge(
                "quiver_catalog_files",
                "Parquet files in all tables.",
                |s| tables_sum(s, |t| t.num_files() as u64),
            )?,
            gauge(
                "quiver_catalog_bytes",
                "Bytes on disk of the Parquet files in all tables.",
                |s| tables_sum(s, |t| t.file_bytes()),
            )?,
            gauge(
                "quiver_catalog_rows",
                "Rows in all tables, from Parquet footers.",
                |s| tables_sum(s, |t| t.num_rows()),
            )?,
            gauge(
                "quiver_catalog_pinned_bytes",
                "Bytes of pinned tables held in memory (reserved from the query memory pool).",
                |s| tables_sum(s, |t| t.pinned_bytes() as u64),
            )?,
            gauge(
                "quiver_catalog_partitions",
                "Distinct Hive partitions holding files, over all tables.",
                |s| tables_sum(s, |t| t.num_partitions() as u64),
            )?,
        ];
        let counters = vec![
            counter(
                "quiver_memory_guard_cancelled_total",
                "Queries the memory guard cancelled because the process was over \
                 --memory-hard-limit.",
                |s| s.heap.cancelled(),
            )?,
            counter(
                "quiver_memory_pool_allocated_bytes_total",
                "Bytes granted by every grow of a memory pool reservation.",
                |s| s.pool.allocated_total(),
            )?,
            counter(
                "quiver_memory_pool_freed_bytes_total",
                "Bytes returned by every shrink of a memory pool reservation.",
                |s| s.pool.freed_total(),
            )?,
            counter(
                "quiver_spill_bytes_total",
                "Bytes written to spill files by finished queries.",
                |s| totals(s).spilled_bytes,
            )?,
            counter(
                "quiver_spill_files_total",
                "Spill files written by finished queries.",
                |s| totals(s).spill_files,
            )?,
            counter(
                "quiver_scan_files_scanned_total",
                "Parquet files (or file ranges) opened by finished queries.",
                |s| totals(s).files_scanned,
            )?,
            counter(
                "quiver_scan_files_pruned_total",
                "Parquet files skipped by partition values or file statistics.",
                |s| {
                    let t = totals(s);
                    t.files_pruned_partition + t.files_pruned_statistics
                },
            )?,
            counter(
                "quiver_scan_pinned_batches_scanned_total",
                "Batches of pinned tables read by finished queries.",
                |s| {
                    let t = totals(s);
                    t.batches_total - t.batches_pruned
                },
            )?,
            counter(
                "quiver_scan_pinned_batches_pruned_total",
                "Batches of pinned tables skipped by their min/max and null-count statistics.",
                |s| totals(s).batches_pruned,
            )?,
            counter(
                "quiver_scan_pinned_rows_skipped_total",
                "Rows of pinned batches read that a sorted column put outside a filter's range.",
                |s| totals(s).batch_rows_skipped,
            )?,
            counter(
                "quiver_scan_row_groups_scanned_total",
                "Row groups read by finished queries, from their files or the row group cache.",
                |s| totals(s).row_groups_scanned,
            )?,
            counter(
                "quiver_scan_row_groups_pruned_total",
                "Row groups skipped by statistics, bloom filters, limits or dynamic filters.",
                |s| {
                    let t = totals(s);
                    t.row_groups_pruned_statistics
                        + t.row_groups_pruned_bloom_filter
                        + t.row_groups_pruned_other
                },
            )?,
            counter(
                "quiver_scan_pages_pruned_total",
                "Data pages skipped by the page index.",
                |s| totals(s).pages_pruned,
            )?,
            counter(
                "quiver_scan_bytes_total",
                "Bytes read from Parquet files by finished queries.",
                |s| totals(s).bytes_scanned,
            )?,
            counter(
                "quiver_mmap_cache_hits_total",
                "File reads served from a cached memory map.",
                |s| mmap(s, |m| &m.hits),
            )?,
            counter(
                "quiver_mmap_maps_total",
                "Files memory-mapped (mapping cache misses).",
                |s| mmap(s, |m| &m.maps),
            )?,
            counter(
                "quiver_mmap_evictions_total",
                "Mappings dropped from the cache to stay within --mmap-max-files/--mmap-max-bytes.",
                |s| mmap(s, |m| &m.evictions),
            )?,
            counter(
                "quiver_result_cache_hits_total",
                "Queries answered from the result cache.",
                |s| results(s, |c| c.counts().0),
            )?,
            counter(
                "quiver_result_cache_misses_total",
                "Cacheable queries the result cache did not hold (run, and kept if they fit).",
                |s| results(s, |c| c.counts().1),
            )?,
            counter(
                "quiver_result_cache_evictions_total",
                "Answers dropped from the result cache: least recently used, or read a table version a refresh replaced.",
                |s| results(s, |c| c.counts().2),
            )?,
            counter(
                "quiver_plan_cache_hits_total",
                "Statements planned from the plan cache (no parsing or logical optimization).",
                |s| s.plans.as_deref().map_or(0, |c| c.counts().0),
            )?,
            counter(
                "quiver_plan_cache_misses_total",
                "Statements planned in full and then kept in the plan cache (those never kept are not counted).",
                |s| s.plans.as_deref().map_or(0, |c| c.counts().1),
            )?,
            counter(
                "quiver_plan_cache_physical_hits_total",
                "Of the statements planned from the plan cache, those run from a kept physical plan (every scan reads a pinned table).",
                |s| s.plans.as_deref().map_or(0, |c| c.counts().2),
            )?,
            counter(
                "quiver_chunk_cache_hits_total",
                "Column chunks scans read decompressed from the chunk cache.",
                |s| pages(s, |p| &p.hits),
            )?,
            counter(
                "quiver_chunk_cache_misses_total",
                "Compressed column chunks scans read from their files (with the chunk cache on).",
                |s| pages(s, |p| &p.misses),
            )?,
            counter(
                "quiver_chunk_cache_inserts_total",
                "Column chunks decompressed into the chunk cache (on their second read).",
                |s| pages(s, |p| &p.inserts),
            )?,
            counter(
                "quiver_chunk_cache_evictions_total",
                "Column chunks dropped from the chunk cache to stay under --chunk-cache-size.",
                |s| pages(s, |p| &p.evictions),
            )?,
            counter(
                "quiver_row_group_cache_hits_total",
                "Row groups scans took decoded from the row group cache.",
                |s| row_groups(s, |r| &r.hits),
            )?,
            counter(
                "quiver_row_group_cache_misses_total",
                "Row groups read from their files by scans the row group cache admits.",
                |s| row_groups(s, |r| &r.misses),
            )?,
            counter(
                "quiver_row_group_cache_inserts_total",
                "Row groups decoded into the row group cache (on their second read).",
                |s| row_groups(s, |r| &r.inserts),
            )?,
            counter(
                "quiver_row_group_cache_evictions_total",
                "Row groups dropped from the row group cache to stay under --row-group-cache-size.",
                |s| row_groups(s, |r| &r.evictions),
            )?,
            counter(
                "quiver_row_group_cache_read_bytes_total",
                "Bytes read from files to decode row groups into the row group cache (in the background).",
                |s| row_groups(s, |r| &r.read_bytes),
            )?,
            counter(
                "quiver_cache_hits_total",
                "Blocks of S3 objects read from the local cache.",
                |s| cache(s, |c| &c.hits),
            )?,
            counter(
                "quiver_cache_misses_total",
                "Blocks of S3 objects fetched from the store (or awaited from a fetch in flight).",
                |s| cache(s, |c| &c.misses),
            )?,
            counter(
                "quiver_cache_evictions_total",
                "Blocks evicted from the local object cache to stay under --cache-max-size.",
                |s| cache(s, |c| &c.evictions),
            )?,
            counter(
                "quiver_cache_corrupt_blocks_total",
                "Cached blocks that failed their checksum or length check and were fetched again.",
                |s| cache(s, |c| &c.corrupt),
            )?,
            counter(
                "quiver_catalog_skipped_files_total",
                "Files left out of their table because they were corrupt or did not fit its schema.",
                |s| s.catalog.skipped_files(),
            )?,
        ];
        let last_refresh = Gauge::new(
            "quiver_catalog_last_refresh_timestamp_seconds",
            "When the tables were last listed (Unix time).",
        )?;
        let probe_wait = Gauge::new(
            "quiver_cpu_runtime_probe_wait_seconds",
            "How long the last probe task waited to run on the query runtime.",
        )?;
        let collector = Self {
            sources,
            scrape: Mutex::new(()),
            gauges,
            counters,
            last_refresh,
            probe_wait,
        };
        collector.update();
        Ok(collector)
    }

    fn update(&self) {
        let _one_at_a_time = self.scrape.lock();
        let s = &self.sources;
        for (gauge, read) in &self.gauges {
            gauge.set(read(s));
        }
        for (counter, read) in &self.counters {
            // The sources only grow: add what they gained since the last scrape.
            counter.inc_by(read(s).saturating_sub(counter.get()));
        }
        let refreshed = s
            .catalog
            .refreshed_at()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_refresh.set(refreshed.as_secs_f64());
        self.probe_wait.set(s.cpu.probe_wait().as_secs_f64());
    }
}

fn totals(s: &EngineSources) -> ScanSummary {
    *s.scan_totals.lock()
}

/// A figure of the mapping layer; 0 when files are read with `pread`.
fn mmap(s: &EngineSources, field: fn(&MmapStats) -> &AtomicU64) -> u64 {
    s.mmap
        .as_ref()
        .map_or(0, |m| field(m).load(Ordering::Relaxed))
}

/// A figure of the result cache; 0 when it is off.
fn results(s: &EngineSources, read: fn(&ResultCache) -> u64) -> u64 {
    s.results.as_deref().map_or(0, read)
}

/// A figure of the object cache; 0 when it is off.
fn cache(s: &EngineSources, field: fn(&CacheStats) -> &AtomicU64) -> u64 {
    s.cache
        .as_ref()
        .map_or(0, |c| field(c).load(Ordering::Relaxed))
}

/// A figure of the chunk cache; 0 when it is off.
fn pages(s: &EngineSources, field: fn(&ChunkCacheStats) -> &AtomicU64) -> u64 {
    s.pages
        .as_ref()
        .map_or(0, |p| field(p).load(Ordering::Relaxed))
}

/// A figure of the row group cache; 0 when it is off.
fn row_groups(s: &EngineSources, field: fn(&RowGroupCacheStats) -> &AtomicU64) -> u64 {
    s.row_groups
        .as_ref()
        .map_or(0, |r| field(r).load(Ordering::Relaxed))
}

fn tables_sum(s: &EngineSources, f: fn(&crate::catalog::HiveTable) -> u64) -> i64 {
    let catalog = &s.catalog;
    catalog
        .table_names()
        .iter()
        .filter_map(|name| catalog.get(name))
        .map(|t| f(&t))
        .sum::<u64>() as i64
}

impl Collector for EngineCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = Vec::new();
        for (gauge, _) in &self.gauges {
            descs.extend(gauge.desc());
        }
        for (counter, _) in &self.counters {
            descs.extend(counter.desc());
        }
        descs.extend(self.last_refresh.desc());
        descs.extend(self.probe_wait.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.update();
        let mut families = Vec::new();
        for (gauge, _) in &self.gauges {
            families.extend(gauge.collect());
        }
        for (counter, _) in &self.counters {
            families.extend(counter.collect());
        }
        families.extend(self.last_refresh.collect());
        families.extend(self.probe_wait.collect());
        families
    }
}
