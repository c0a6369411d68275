//! The result cache (`--result-cache-size`): answers of repeated queries, kept in memory.
//!
//! Dashboards send the same statements again and again over data that changes only when
//! new files land. A table snapshot never changes (a refresh publishes a new one, with a
//! new version), so a query's answer is fixed by its statement, its parameters and the
//! versions of the tables it reads; that is the key. Every setting that changes results is
//! a process flag, the same for every query of a process, so no key spans two of them.
//!
//! What is never cached: a statement with a function whose value is not fixed by its
//! arguments (`now()`, `current_date`, `random()`: any function DataFusion does not mark
//! immutable), EXPLAIN and anything but a query, a statement reading anything other than
//! the catalog's tables (information_schema answers differently per caller), a slice of a
//! result split over endpoints, and a ticket that opts out (`QueryTicket.no_result_cache`).
//!
//! Permissions: the cache is consulted after the statement is planned for its caller, and
//! a table the caller may not read does not exist for them at planning, so an answer is
//! only ever served to callers who may read every table it came from.
//!
//! Memory: each answer is reserved from the query memory pool (`--memory-limit`) while it
//! is collected and while it is kept; an answer the pool or the cache cannot hold is
//! simply not kept. Least recently used answers are evicted first; a refresh that
//! publishes a table drops the answers that read its old version.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::source_as_provider;
use datafusion::error::Result as DfResult;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::Stream;
use parking_lot::Mutex;

use crate::catalog::{Catalog, HiveTable};
use crate::wire::views::compact_batch;

/// What fixes a query's answer: its statement, its parameters and the version of every
/// table it reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    sql: String,
    /// The parameters, typed (`Int64(5)` and `Utf8("5")` differ).
    params: String,
    /// (table, version), sorted by table.
    tables: Vec<(String, u64)>,
}

impl Key {
    /// (table, version) of every table the answer reads, sorted by table.
    pub(crate) fn tables(&self) -> &[(String, u64)] {
        &self.tables
    }

    /// Bytes the key holds: an entry is charged for its key too, so answers of a few
    /// bytes under statements of megabytes cannot hold more than the cache's size.
    fn bytes(&self) -> usize {
        self.sql.len()
            + self.params.len()
            + self.tables.iter().map(|(t, _)| t.len() + 8).sum::<usize>()
    }

    /// The key of `plan` (the statement `sql` planned with `params` bound), or `None`
    /// when its answer may not be cached (see the module documentation).
    pub(crate) fn of(sql: &str, params: &[ScalarValue], plan: &LogicalPlan) -> Option<Self> {
        if !matches!(
            plan,
            LogicalPlan::Projection(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::Aggregate(_)
                | LogicalPlan::Sort(_)
                | LogicalPlan::Limit(_)
                | LogicalPlan::Join(_)
                | LogicalPlan::Union(_)
                | LogicalPlan::Distinct(_)
                | LogicalPlan::Window(_)
                | LogicalPlan::SubqueryAlias(_)
                | LogicalPlan::TableScan(_)
                | LogicalPlan::Values(_)
        ) {
            return None;
        }
        let mut tables = vec![];
        let mut cacheable = true;
        // The closure never fails.
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let version = source_as_provider(&scan.source)
                    .ok()
                    .and_then(|p| p.downcast_ref::<HiveTable>().map(HiveTable::version));
                match version {
                    Some(v) => tables.push((scan.table_name.table().to_string(), v)),
                    None => cacheable = false,
                }
            }
            let _ = node.apply_expressions(|expr| {
                if !is_immutable(expr) {
                    cacheable = false;
                }
                Ok(TreeNodeRecursion::Continue)
            });
            Ok(match cacheable {
                true => TreeNodeRecursion::Continue,
                false => TreeNodeRecursion::Stop,
            })
        });
        if !cacheable {
            return None;
        }
        tables.sort();
        tables.dedup();
        Some(Self {
            sql: sql.to_string(),
            params: format!("{params:?}"),
            tables,
        })
    }
}

/// Whether every function in `expr` gives the same value for the same arguments.
fn is_immutable(expr: &Expr) -> bool {
    let mut immutable = true;
    let _ = expr.apply(|e| {
        let volatility = match e {
            Expr::ScalarFunction(f) => Some(f.func.signature().volatility),
            Expr::AggregateFunction(f) => Some(f.func.signature().volatility),
            Expr::WindowFunction(f) => Some(f.fun.signature().volatility),
            _ => None,
        };
        if volatility.is_some_and(|v| v != Volatility::Immutable) {
            immutable = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    immutable
}

/// One kept answer.
#[derive(Debug)]
pub(crate) struct Entry {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    bytes: usize,
    _reservation: MemoryReservation,
}

impl Entry {
    /// The answer's schema.
    pub(crate) fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The answer as a stream (the batches are shared, not copied).
    pub(crate) fn stream(&self) -> SendableRecordBatchStream {
        let batches = self.batches.clone();
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }
}

/// Answers kept, least recently used first out.
#[derive(Debug)]
pub(crate) struct ResultCache {
    capacity: usize,
    pool: Arc<dyn MemoryPool>,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Key, (Arc<Entry>, u64)>,
    /// Use tick -> key, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

impl State {
    fn remove(&mut self, key: &Key) -> Option<Arc<Entry>> {
        let (entry, tick) = self.entries.remove(key)?;
        self.order.remove(&tick);
        self.bytes -= entry.bytes;
        Some(entry)
    }
}

impl ResultCache {
    /// A cache of at most `capacity` bytes of answers, reserved from `pool`.
    pub(crate) fn new(capacity: usize, pool: Arc<dyn MemoryPool>) -> Self {
        Self {
            capacity,
            pool,
            state: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The answer kept for `key`, marked as just used; counts a hit or a miss.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let mut state = self.state.lock();
        state.tick += 1;
        let tick = state.tick;
        let found = match state.entries.get_mut(key) {
            Some((entry, used)) => {
                let old = std::mem::replace(used, tick);
                Some((Arc::clone(entry), old))
            }
            None => None,
        };
        match found {
            Some((entry, old)) => {
                state.order.remove(&old);
                state.order.insert(tick, key.clone());
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// `stream`, passed through unchanged, keeping its batches to store under `key` when
    /// it ends without an error (an answer cut short by an error, a cancellation or a
    /// client gone is never stored).
    pub(crate) fn collect(
        self: &Arc<Self>,
        key: Key,
        stream: SendableRecordBatchStream,
    ) -> SendableRecordBatchStream {
        let reservation = MemoryConsumer::new("result cache").register(&self.pool);
        Box::pin(Collecting {
            inner: stream,
            cache: Arc::clone(self),
            key: Some(key),
            batches: vec![],
            reservation,
        })
    }

    /// Stores an answer, evicting the least recently used ones to make room; an answer
    /// larger than the whole cache is not kept.
    fn insert(
        &self,
        key: Key,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        reservation: MemoryReservation,
    ) {
        let bytes = reservation.size();
        if bytes > self.capacity {
            return;
        }
        let mut state = self.state.lock();
        state.remove(&key);
        while state.bytes + bytes > self.capacity {
            let Some((_, oldest)) = state.order.pop_first() else {
                break;
            };
            if let Some((entry, _)) = state.entries.remove(&oldest) {
                state.bytes -= entry.bytes;
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        state.tick += 1;
        let tick = state.tick;
        state.order.insert(tick, key.clone());
        state.bytes += bytes;
        let entry = Entry {
            schema,
            batches,
            bytes,
            _reservation: reservation,
        };
        state.entries.insert(key, (Arc::new(entry), tick));
    }

    /// Drops the answers that read a table version `catalog` no longer serves (after a
    /// refresh published new versions).
    pub(crate) fn retain_current(&self, catalog: &Catalog) {
        let mut state = self.state.lock();
        let stale: Vec<Key> = state
            .entries
            .keys()
            .filter(|key| {
                key.tables.iter().any(|(table, version)| {
                    catalog.get(table).is_none_or(|t| t.version() != *version)
                })
            })
            .cloned()
            .collect();
        for key in stale {
            state.remove(&key);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (hits, misses, evictions) so far.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.evictions.load(Ordering::Relaxed),
        )
    }

    /// Bytes of the answers kept, and how many there are.
    pub(crate) fn size(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.bytes, state.entries.len())
    }
}

/// A query's stream on its way to the client, keeping a reference to each batch.
struct Collecting {
    inner: SendableRecordBatchStream,
    cache: Arc<ResultCache>,
    /// `None` once collecting stopped (too large, the pool said no, or stored).
    key: Option<Key>,
    batches: Vec<RecordBatch>,
    reservation: MemoryReservation,
}

impl Collecting {
    fn stop(&mut self) {
        self.key = None;
        self.batches = vec![];
        self.reservation.free();
    }
}

impl Stream for Collecting {
    type Item = DfResult<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(batch))) if self.key.is_some() => {
                // String views that reference a small part of their (decoded page)
                // buffers are compacted: the answer, not the pages, is what is kept.
                let batch = compact_batch(batch.clone());
                let bytes = batch.get_array_memory_size();
                if self.reservation.size() + bytes > self.cache.capacity
                    || self.reservation.try_grow(bytes).is_err()
                {
                    self.stop();
                } else {
                    self.batches.push(batch);
                }
            }
            Poll::Ready(Some(Err(_))) => self.stop(),
            Poll::Ready(None) => {
                let key_bytes = self.key.as_ref().map_or(0, Key::bytes);
                if self.key.is_some() && self.reservation.try_grow(key_bytes).is_err() {
                    self.stop();
                }
                if let Some(key) = self.key.take() {
                    let batches = std::mem::take(&mut self.batches);
                    let reservation = self.reservation.take();
                    let schema = self.inner.schema();
                    self.cache.insert(key, schema, batches, reservation);
                }
            }
            _ => {}
        }
        polled
    }
}

impl RecordBatchStream for Collecting {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use futures::StreamExt;

    fn key(sql: &str) -> Key {
        Key {
            sql: sql.into(),
            params: String::new(),
            tables: vec![("t".into(), 1)],
        }
    }

    fn answer(rows: usize) -> SendableRecordBatchStream {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(0..rows as i64))],
        )
        .unwrap();
        Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(vec![Ok(batch)]),
        ))
    }

    async fn run(cache: &Arc<ResultCache>, sql: &str, rows: usize) {
        let mut stream = cache.collect(key(sql), answer(rows));
        while stream.next().await.is_some() {}
    }

    #[tokio::test]
    async fn least_recently_used_answers_go_first() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        // Room for two answers of 1000 rows (8000 bytes and some).
        let cache = Arc::new(ResultCache::new(20_000, Arc::clone(&pool)));
        run(&cache, "a", 1000).await;
        run(&cache, "b", 1000).await;
        assert!(cache.get(&key("a")).is_some());
        run(&cache, "c", 1000).await;
        // b was used least recently.
        assert!(cache.get(&key("b")).is_none());
        assert!(cache.get(&key("a")).is_some());
        assert!(cache.get(&key("c")).is_some());
        assert_eq!(cache.counts(), (3, 1, 1));
        let (bytes, entries) = cache.size();
        assert_eq!(entries, 2);
        assert_eq!(pool.reserved(), bytes);
        // Larger than the whole cache: passed through, not kept, nothing evicted.
        run(&cache, "big", 10_000).await;
        assert!(cache.get(&key("big")).is_none());
        assert_eq!(cache.size(), (bytes, 2));
    }

    #[tokio::test]
    async fn a_stream_not_read_to_its_end_is_not_kept() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        let cache = Arc::new(ResultCache::new(1 << 20, Arc::clone(&pool)));
        let mut stream = cache.collect(key("a"), answer(10));
        assert!(stream.next().await.is_some());
        drop(stream);
        assert!(cache.get(&key("a")).is_none());
        assert_eq!(pool.reserved(), 0);
        // The pool's limit holds: an answer it cannot grant is not kept.
        let small: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(100));
        let cache = Arc::new(ResultCache::new(1 << 20, Arc::clone(&small)));
        run(&cache, "a", 1000).await;
        assert!(cache.get(&key("a")).is_none());
        assert_eq!(small.reserved(), 0);
    }

    #[tokio::test]
    async fn keys_count_against_the_size() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 30));
        let cache = Arc::new(ResultCache::new(100_000, Arc::clone(&pool)));
        // 50 one-row answers under 10 kB statements: at most 10 fit.
        for i in 0..50 {
            run(&cache, &format!("{i:010000}"), 1).await;
            let (bytes, entries) = cache.size();
            assert!(bytes <= 100_000 && entries <= 10, "{bytes} {entries}");
            assert_eq!(pool.reserved(), bytes);
        }
        // A statement longer than the whole cache is never kept.
        run(&cache, &"x".repeat(200_000), 1).await;
        assert!(cache.get(&key(&"x".repeat(200_000))).is_none());
    }

    #[test]
    fn functions_that_are_not_immutable_are_never_cached() {
        use datafusion::functions::datetime::expr_fn::now;
        use datafusion::functions::math::expr_fn::{abs, random};
        use datafusion::logical_expr::{col, lit};
        assert!(is_immutable(&abs(col("x")).gt(lit(1))));
        assert!(!is_immutable(&col("x").lt(random())));
        assert!(!is_immutable(&col("t").lt(now())));
    }
}
