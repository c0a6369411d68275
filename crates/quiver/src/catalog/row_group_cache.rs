//! Decoded row groups of local Parquet files (`--row-group-cache-size`).
//!
//! A key range on a sorted file reads a few thousand rows, but the decoder still
//! decompresses and decodes whole pages and every dictionary page of the row group
//! they fall in: from Parquet, 100 concurrent ~7500-row ranges of TPC-H lineitem cost
//! 6.8 ms of server CPU each, against 1.1 ms from a pinned table (docs/benchmarks.md).
//! The chunk cache (`io::chunk_cache`) removes the decompression; this cache removes the
//! decoding too, for the row groups queries keep coming back to: a row group read a
//! second time is decoded once, whole, into Arrow batches with the statistics a pinned
//! table keeps per batch ([`PinnedBatches`]), in the background on the CPU runtime
//! ([`RowGroupCache::with_loader`]; that read takes it from the file), and from then on
//! scans take its rows from
//! memory: batches skipped by their statistics, sorted columns cut to a filter's key
//! range, the rest of the file read by DataFusion's Parquet scan as before.
//!
//! What is a row group "read": the table's scan prunes each file's row groups by their
//! statistics (DataFusion's own [`RowGroupAccessPlanFilter`]) before it plans, and counts
//! the ones left. A scan that would read a row group the cache holds gets a Parquet
//! access plan that skips it, and a second input with the cached rows.
//!
//! Which scans use the cache ([`RowGroupAdmission`]): by default only *lookups*, scans whose
//! filters leave at most an eighth of a file's row groups (key ranges and point lookups
//! on a column the file is ordered by); every other scan reads its files as without the
//! cache, so queries that read whole tables never pay for filling it nor take a plan of
//! another shape. `--row-group-cache-admit all` lets every scan fill and use it.
//!
//! Keys are the table snapshot's version, the file and the row group: a refresh that
//! publishes a new snapshot starts afresh (old entries age out), so the cache never
//! answers from another version of a table. Every byte kept is reserved from the query
//! memory pool (`--memory-limit`); a row group the pool cannot grant, or over an eighth
//! of the cache, is not kept, and a query the pool refuses memory to first takes it back
//! from the cache ([`RowGroupCache::reclaim`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::Result as DfResult;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::logical_expr::Expr;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::task::AbortOnDropHandle;

use super::memory_scan::Bounds;
use super::pinned::{PinnedBatches, Selected, Selector};
use crate::wire::views::{TwinRegistration, ViewTwins};

/// The cache's name in the memory pool.
pub const CONSUMER: &str = "row group cache";

/// Row groups read once are remembered (not kept) up to this many.
const SEEN_KEYS: u64 = 1 << 16;

/// Row groups one scan decodes into the cache at most: a scan of a large table fills the
/// cache a few row groups per query, not all at once while it plans.
pub(crate) const LOADS_PER_SCAN: usize = 2;

/// Row groups decoded into the cache at once, over all scans: a burst of new key ranges
/// fills it several row groups at a time, beside the queries. A burst of 100 new ranges
/// over lineitem SF1 (~50 row groups) cost 6.5x pyarrow's server CPU over 9 rounds with 2
/// at once (the reads that miss meanwhile read the file), 1.9x with 4, 1.3x with 8, 1.4x
/// with 16 (docs/benchmarks.md). Decoded rows are granted by the pool only when kept: at
/// most this many row groups, each at most [`RowGroupCache::entry_limit`] by its footer,
/// are outside it meanwhile.
const LOADS_AT_ONCE: usize = 8;

/// How long a row group that could not be kept is read from the file before another try.
const REFUSED_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// A scan is a lookup when its filters leave at most one in this many of a file's row
/// groups: the file is ordered (or clustered) by a filtered column, and the scan reads a
/// narrow part of it.
pub(crate) const LOOKUP_SHARE: usize = 8;

/// Which scans fill and use the cache (`--row-group-cache-admit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RowGroupAdmission {
    /// Lookups only: scans that read at most an eighth of a file's row groups.
    #[default]
    Lookups,
    /// Every scan.
    All,
}

impl RowGroupAdmission {
    /// Whether a scan reading `read` of a file's `row_groups` row groups uses the cache.
    pub(crate) fn admits(self, read: usize, row_groups: usize) -> bool {
        match self {
            Self::All => true,
            Self::Lookups => read * LOOKUP_SHARE <= row_groups,
        }
    }
}

/// Starts a task on the runtime row groups are decoded on, owned by the handle returned
/// (the query layer gives the CPU runtime's, `quiver::query::spawn_on`).
pub type Spawner = Arc<dyn Fn(BoxFuture<'static, ()>) -> AbortOnDropHandle<()> + Send + Sync>;

/// One row group of one file of one table snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RowGroupKey {
    /// The snapshot's version (unique in the process).
    pub version: u64,
    /// The file's place in the snapshot.
    pub file: usize,
    pub row_group: usize,
}

/// A row group's rows, decoded, with per-batch statistics.
#[derive(Debug)]
pub(crate) struct CachedRowGroup {
    batches: PinnedBatches,
    /// Bytes reserved for it.
    bytes: usize,
    /// Its string and binary columns as sent (`wire::views::ViewTwins`), forgotten with it.
    _twins: TwinRegistration,
}

impl CachedRowGroup {
    /// The batches that may hold rows passing the selector's filters, narrowed by
    /// sorted columns.
    pub(crate) fn select(&self, selector: &Selector) -> Selected {
        self.batches.select_with(selector)
    }

    /// Whether its rows that [`Self::select`] passes on all pass `filter`
    /// (`PinnedBatches::applies_exactly`).
    pub(crate) fn applies_exactly(&self, filter: &Expr) -> bool {
        self.batches.applies_exactly(filter)
    }

    /// Its columns' minimum and maximum (`PinnedBatches::bounds`).
    pub(crate) fn bounds(&self) -> &Bounds {
        self.batches.bounds()
    }
}

/// Counters of the cache, read by the metrics collector.
#[derive(Debug, Default)]
pub struct RowGroupCacheStats {
    /// Row groups a scan took from the cache.
    pub hits: AtomicU64,
    /// Row groups a scan the cache admits read from the file.
    pub misses: AtomicU64,
    /// Row groups decoded into the cache.
    pub inserts: AtomicU64,
    /// Row groups dropped to make room (or of old snapshots, as they age out).
    pub evictions: AtomicU64,
    /// Bytes kept.
    pub bytes: AtomicU64,
    /// Bytes read from files to decode row groups into the cache.
    pub read_bytes: AtomicU64,
}

/// The cache; see the module documentation.
pub struct RowGroupCache {
    capacity: u64,
    admission: RowGroupAdmission,
    entries: moka::sync::Cache<RowGroupKey, Arc<CachedRowGroup>>,
    /// Row groups read once and not (yet) kept.
    seen: moka::sync::Cache<RowGroupKey, ()>,
    /// Row groups being decoded by a scan: others read them from the file meanwhile.
    loading: Mutex<HashSet<RowGroupKey>>,
    /// Row groups that could not be kept (too large, the pool said no, a decoding
    /// error): read from the file for a while instead of being decoded again and again.
    refused: moka::sync::Cache<RowGroupKey, ()>,
    reservation: Arc<Mutex<MemoryReservation>>,
    stats: Arc<RowGroupCacheStats>,
    /// Offset twins of the cached view columns, for the send path.
    twins: Arc<ViewTwins>,
    /// Where row groups are decoded ([`Self::with_loader`]); `None`: by the scan that
    /// asks, while it plans.
    loader: Option<Spawner>,
    /// Decodes under way on the loader (aborted if the cache is dropped).
    loads: Mutex<Vec<AbortOnDropHandle<()>>>,
}

impl std::fmt::Debug for RowGroupCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowGroupCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// How a session's scans find the cache: a session config extension. `None` where
/// scans must read their files (plans made for cluster workers: a worker reads its share
/// of the files itself, and cached rows would travel inside the plan).
#[derive(Debug, Clone, Default)]
pub struct RowGroupCaching(pub Option<Arc<RowGroupCache>>);

/// What a scan does with a row group it reads.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Take its rows from the cache.
    Hit(Arc<CachedRowGroup>),
    /// Decode it for the cache (its second read) with [`RowGroupCache::load`], or end
    /// with [`RowGroupCache::abandon`] or [`RowGroupCache::refuse`].
    Load,
    /// Read it from the file.
    Miss,
}

impl RowGroupCache {
    /// A cache of at most `capacity` bytes of decoded rows, reserved from `pool`, used
    /// by the scans `admission` lets in.
    pub fn new(capacity: u64, admission: RowGroupAdmission, pool: &Arc<dyn MemoryPool>) -> Self {
        let reservation = Arc::new(Mutex::new(MemoryConsumer::new(CONSUMER).register(pool)));
        let stats = Arc::new(RowGroupCacheStats::default());
        let entries = {
            let reservation = Arc::clone(&reservation);
            let stats = Arc::clone(&stats);
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|_: &RowGroupKey, group: &Arc<CachedRowGroup>| {
                    u32::try_from(group.bytes).unwrap_or(u32::MAX)
                })
                .eviction_listener(move |_, group: Arc<CachedRowGroup>, _| {
                    reservation.lock().shrink(group.bytes);
                    stats.bytes.fetch_sub(group.bytes as u64, Ordering::Relaxed);
                    stats.evictions.fetch_add(1, Ordering::Relaxed);
                })
                .build()
        };
        Self {
            capacity,
            admission,
            entries,
            seen: moka::sync::Cache::new(SEEN_KEYS),
            loading: Mutex::default(),
            refused: moka::sync::Cache::builder()
                .max_capacity(SEEN_KEYS)
                .time_to_live(REFUSED_FOR)
                .build(),
            reservation,
            stats,
            twins: Arc::default(),
            loader: None,
            loads: Mutex::default(),
        }
    }

    /// Row groups are decoded in tasks `spawn` starts, and the scan that asks for one
    /// reads it from its file meanwhile: no query waits for a decode.
    pub fn with_loader(mut self, spawn: Spawner) -> Self {
        self.loader = Some(spawn);
        self
    }

    /// Offset twins of the view columns of cached rows: the send path takes a slice of
    /// one where it would cast (`wire::views`).
    pub fn view_twins(&self) -> &Arc<ViewTwins> {
        &self.twins
    }

    /// Which scans use the cache.
    pub(crate) fn admission(&self) -> RowGroupAdmission {
        self.admission
    }

    /// The cache's counters.
    pub fn stats(&self) -> &Arc<RowGroupCacheStats> {
        &self.stats
    }

    /// The largest row group kept, in bytes: an eighth of the cache.
    pub(crate) fn entry_limit(&self) -> u64 {
        self.capacity / 8
    }

    /// What a scan about to read row group `key` does with it (counted as a hit or a miss).
    pub(crate) fn lookup(&self, key: RowGroupKey) -> Lookup {
        if let Some(group) = self.entries.get(&key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Hit(group);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        if self.refused.contains_key(&key) {
            return Lookup::Miss;
        }
        if self.seen.get(&key).is_none() {
            // First read: remembered, not kept (one-off scans do not fill the cache).
            self.seen.insert(key, ());
            return Lookup::Miss;
        }
        let mut loading = self.loading.lock();
        if loading.len() < LOADS_AT_ONCE && loading.insert(key) {
            Lookup::Load
        } else {
            Lookup::Miss
        }
    }

    /// Decodes row group `key` (a [`Lookup::Load`]) with `decode`, which gives its rows
    /// (all of `schema`'s columns) and the bytes read for them, and keeps it. With a
    /// loader the decode runs there and this returns `None` at once; without one it
    /// returns what is kept, and the bytes read.
    pub(crate) async fn load(
        self: &Arc<Self>,
        key: RowGroupKey,
        schema: SchemaRef,
        decode: impl Future<Output = DfResult<(Vec<RecordBatch>, usize)>> + Send + 'static,
    ) -> Option<(Arc<CachedRowGroup>, usize)> {
        let cache = Arc::clone(self);
        let load = async move {
            match decode.await {
                Ok((batches, bytes)) => {
                    cache
                        .stats
                        .read_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    Some((cache.insert(key, schema, batches)?, bytes))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "row group not cached");
                    cache.refuse(key);
                    None
                }
            }
        };
        let Some(loader) = &self.loader else {
            return load.await;
        };
        let task = loader(Box::pin(async move {
            load.await;
        }));
        let mut loads = self.loads.lock();
        loads.retain(|l| !l.is_finished());
        loads.push(task);
        None
    }

    /// Keeps `batches`, the decoded rows of row group `key` (all of `schema`'s columns),
    /// when they fit and the pool grants their bytes; returns what is kept. Rows not kept
    /// are dropped at once (the scan reads the row group from the file): a scan never
    /// holds decoded rows the pool has not granted.
    pub(crate) fn insert(
        &self,
        key: RowGroupKey,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Option<Arc<CachedRowGroup>> {
        let kept = self.keep(key, schema, batches);
        // Loading until kept or refused: a scan meanwhile reads the file, it does not
        // decode the row group a second time.
        self.loading.lock().remove(&key);
        kept
    }

    fn keep(
        &self,
        key: RowGroupKey,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Option<Arc<CachedRowGroup>> {
        let batches = batches
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .collect::<Vec<_>>();
        // String values are copied once, into the offset arrays the send path sends.
        let (batches, twins) = match self.twins.twin(batches) {
            Ok(twinned) => twinned,
            Err(e) => {
                tracing::debug!(?key, error = %e, "row group not cached");
                self.refused.insert(key, ());
                return None;
            }
        };
        let rows_bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        let batches = PinnedBatches::new(schema, vec![batches]);
        let bytes = rows_bytes + twins.bytes + batches.statistics_bytes();
        let group = Arc::new(CachedRowGroup {
            batches,
            bytes,
            _twins: twins,
        });
        if bytes as u64 > self.entry_limit() {
            tracing::debug!(
                ?key,
                bytes,
                "row group over the cache's entry limit, not kept"
            );
            self.refused.insert(key, ());
            return None;
        }
        if let Err(e) = self.reservation.lock().try_grow(bytes) {
            tracing::debug!(?key, error = %e, "row group not cached");
            self.refused.insert(key, ());
            return None;
        }
        self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.stats.inserts.fetch_add(1, Ordering::Relaxed);
        self.entries.insert(key, Arc::clone(&group));
        // Evict now, not at moka's next housekeeping, so that the bytes kept (and
        // reserved) come back under the capacity at once.
        self.entries.run_pending_tasks();
        Some(group)
    }

    /// A load this scan leaves to a later one (it loaded its share): nothing is noted.
    pub(crate) fn abandon(&self, key: RowGroupKey) {
        self.loading.lock().remove(&key);
    }

    /// A load that did not happen (too large by its footer, or the decode failed): the
    /// row group is read from the file, for a while without another try.
    pub(crate) fn refuse(&self, key: RowGroupKey) {
        self.loading.lock().remove(&key);
        self.refused.insert(key, ());
    }

    /// Drops row groups until at least `bytes` are returned to the pool (or the cache is
    /// empty); returns the bytes returned. Queries come first: the pool calls this when
    /// it cannot grant a query's reservation (see `MeteredPool::add_reclaimer`).
    pub fn reclaim(&self, bytes: usize) -> usize {
        crate::io::remove_until(&self.entries, bytes, |group| group.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    fn batch(rows: i64) -> (datafusion::arrow::datatypes::SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let column = Arc::new(Int64Array::from_iter_values(0..rows));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![column]).expect("batch");
        (schema, batch)
    }

    fn key(row_group: usize) -> RowGroupKey {
        RowGroupKey {
            version: 1,
            file: 0,
            row_group,
        }
    }

    #[test]
    fn a_row_group_is_loaded_on_its_second_read_and_then_hit() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        let cache = RowGroupCache::new(1 << 24, RowGroupAdmission::All, &pool);
        assert!(matches!(cache.lookup(key(0)), Lookup::Miss));
        assert!(matches!(cache.lookup(key(0)), Lookup::Load));
        // Another scan meanwhile reads it from the file.
        assert!(matches!(cache.lookup(key(0)), Lookup::Miss));
        let (schema, rows) = batch(1000);
        cache.insert(key(0), schema, vec![rows]);
        assert!(matches!(cache.lookup(key(0)), Lookup::Hit(_)));
        let held = cache.stats().bytes.load(Ordering::Relaxed);
        assert!(held > 8000, "{held}");
        assert_eq!(pool.reserved() as u64, held);
        assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_few_row_groups_load_at_once() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        let cache = RowGroupCache::new(1 << 24, RowGroupAdmission::All, &pool);
        let groups = LOADS_AT_ONCE + 1;
        for group in 0..groups {
            assert!(matches!(cache.lookup(key(group)), Lookup::Miss));
        }
        for group in 0..LOADS_AT_ONCE {
            assert!(matches!(cache.lookup(key(group)), Lookup::Load));
        }
        // Read from the file while the others decode; loaded once one is kept.
        assert!(matches!(cache.lookup(key(LOADS_AT_ONCE)), Lookup::Miss));
        let (schema, rows) = batch(1000);
        cache.insert(key(0), schema, vec![rows]);
        assert!(matches!(cache.lookup(key(LOADS_AT_ONCE)), Lookup::Load));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_a_loader_a_row_group_is_decoded_in_the_background() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        #[allow(clippy::disallowed_methods)] // the test's runtime owns nothing else
        let spawn: Spawner = Arc::new(|task| AbortOnDropHandle::new(tokio::spawn(task)));
        let cache =
            Arc::new(RowGroupCache::new(1 << 24, RowGroupAdmission::All, &pool).with_loader(spawn));
        assert!(matches!(cache.lookup(key(0)), Lookup::Miss));
        assert!(matches!(cache.lookup(key(0)), Lookup::Load));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (schema, rows) = batch(1000);
        let decode = async move {
            released.await.ok();
            Ok((vec![rows], 4096))
        };
        // The scan does not wait: it reads the row group from the file.
        assert!(cache.load(key(0), schema, decode).await.is_none());
        // Decoding meanwhile: read from the file, not decoded again.
        assert!(matches!(cache.lookup(key(0)), Lookup::Miss));
        release.send(()).unwrap();
        for _ in 0..500 {
            if matches!(cache.lookup(key(0)), Lookup::Hit(_)) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(matches!(cache.lookup(key(0)), Lookup::Hit(_)));
        assert_eq!(cache.stats().inserts.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats().read_bytes.load(Ordering::Relaxed), 4096);
    }

    #[test]
    fn the_bytes_kept_stay_under_the_capacity_and_reclaim_returns_them() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        // Each group is about 80 KB: the capacity holds about 8 of them (entry limit 100 KB).
        let cache = RowGroupCache::new(800_000, RowGroupAdmission::All, &pool);
        for group in 0..40 {
            let (schema, rows) = batch(10_000);
            cache.insert(key(group), schema, vec![rows]);
            let held = cache.stats().bytes.load(Ordering::Relaxed);
            assert!(held <= 800_000, "{held} after {group}");
            assert_eq!(pool.reserved() as u64, held);
        }
        assert!(cache.stats().evictions.load(Ordering::Relaxed) > 0);
        let held = pool.reserved();
        assert!(cache.reclaim(1) > 0);
        assert!(pool.reserved() < held);
        assert!(cache.reclaim(usize::MAX) > 0);
        assert_eq!(pool.reserved(), 0);
    }

    #[test]
    fn a_group_over_the_entry_limit_or_refused_by_the_pool_is_not_kept() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        let cache = RowGroupCache::new(80_000, RowGroupAdmission::All, &pool);
        let (schema, rows) = batch(10_000);
        assert!(cache.insert(key(0), schema, vec![rows]).is_none());
        assert_eq!(pool.reserved(), 0);
        assert_eq!(cache.stats().inserts.load(Ordering::Relaxed), 0);

        let small: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1000));
        let cache = RowGroupCache::new(1 << 30, RowGroupAdmission::All, &small);
        let (schema, rows) = batch(10_000);
        cache.lookup(key(0));
        assert!(matches!(cache.lookup(key(0)), Lookup::Load));
        assert!(cache.insert(key(0), schema, vec![rows]).is_none());
        assert_eq!(small.reserved(), 0);
        // Not decoded again at once.
        assert!(matches!(cache.lookup(key(0)), Lookup::Miss));
        assert!(matches!(cache.lookup(key(0)), Lookup::Miss));
    }

    #[test]
    fn lookups_read_at_most_an_eighth_of_a_file() {
        let lookups = RowGroupAdmission::Lookups;
        assert!(lookups.admits(1, 8));
        assert!(lookups.admits(2, 16));
        assert!(!lookups.admits(2, 15));
        // A file of one row group is never looked up: its one row group is the file.
        assert!(!lookups.admits(1, 1));
        assert!(RowGroupAdmission::All.admits(1, 1));
        assert!(RowGroupAdmission::All.admits(40, 40));
    }
}
