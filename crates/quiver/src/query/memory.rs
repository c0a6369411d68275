//! The memory pool every query reserves from, and its accounting.
//!
//! DataFusion's operators reserve memory for what they buffer (sort runs, hash tables,
//! spill merges) from one pool shared by all queries. [`MeteredPool`] sits on top of
//! the policy pool and counts every grow and shrink, so the exported figures add up:
//! `allocated_total - freed_total == reserved` at every instant, and `reserved` returns
//! to its idle value when queries end, whichever way they end.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use datafusion::common::Result as DfResult;
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
    TrackConsumersPool,
};
use parking_lot::RwLock;

use super::{MemoryOptions, PoolKind};

/// Consumers named in a ResourceExhausted error: enough to see who took the memory.
const TOP_CONSUMERS: usize = 5;

/// Frees up to the given bytes of cached data held in the pool; returns the bytes freed.
pub type Reclaim = Box<dyn Fn(usize) -> usize + Send + Sync>;

/// A pool that counts what passes through it; the policy is the inner pool's.
pub struct MeteredPool {
    inner: Box<dyn MemoryPool>,
    limit: usize,
    allocated: AtomicU64,
    freed: AtomicU64,
    peak: AtomicUsize,
    /// Asked for memory, in turn, when a query's grow is refused: caches giving it back.
    reclaim: RwLock<Vec<(&'static str, Reclaim)>>,
}

impl std::fmt::Debug for MeteredPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredPool")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl MeteredPool {
    /// The pool `options` describe, tracking its largest consumers so that a query
    /// refused memory is told who holds it.
    pub fn new(options: &MemoryOptions) -> Self {
        let top = NonZeroUsize::new(TOP_CONSUMERS).expect("nonzero");
        let inner: Box<dyn MemoryPool> = match options.pool {
            PoolKind::Fair => Box::new(TrackConsumersPool::new(
                FairSpillPool::new(options.limit),
                top,
            )),
            PoolKind::Greedy => Box::new(TrackConsumersPool::new(
                GreedyMemoryPool::new(options.limit),
                top,
            )),
        };
        Self {
            inner,
            limit: options.limit,
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
            reclaim: RwLock::default(),
        }
    }

    /// Lets the cache whose reservations are named `consumer` give memory back when a
    /// grow of anything but a cache is refused: queries come before cached data.
    pub fn add_reclaimer(&self, consumer: &'static str, reclaim: Reclaim) {
        self.reclaim.write().push((consumer, reclaim));
    }

    /// Bytes all queries may reserve together.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Most bytes reserved at once since start-up.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Bytes granted by every grow since start-up.
    pub fn allocated_total(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Bytes returned by every shrink since start-up (a dropped reservation shrinks to 0).
    pub fn freed_total(&self) -> u64 {
        self.freed.load(Ordering::Relaxed)
    }

    fn granted(&self, bytes: usize) {
        self.allocated.fetch_add(bytes as u64, Ordering::Relaxed);
        self.peak
            .fetch_max(self.inner.reserved(), Ordering::Relaxed);
    }
}

impl std::fmt::Display for MeteredPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "metered({})", self.inner)
    }
}

impl MemoryPool for MeteredPool {
    fn name(&self) -> &str {
        "metered"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.inner.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.inner.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.inner.grow(reservation, additional);
        self.granted(additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.inner.shrink(reservation, shrink);
        self.freed.fetch_add(shrink as u64, Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> DfResult<()> {
        if let Err(refused) = self.inner.try_grow(reservation, additional) {
            let caches = self.reclaim.read();
            // A cache does not take memory from another cache (nor from itself).
            let name = reservation.consumer().name();
            if caches.iter().any(|(cache, _)| name == *cache) {
                return Err(refused);
            }
            let mut result = Err(refused);
            for (_, reclaim) in caches.iter() {
                if reclaim(additional) == 0 {
                    continue;
                }
                result = self.inner.try_grow(reservation, additional);
                if result.is_ok() {
                    break;
                }
            }
            result?;
        }
        self.granted(additional);
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.inner.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.inner.memory_limit()
    }
}

/// One query's view of the shared pool: the same policy and limit, plus a count of what
/// this query holds, for `list-queries`.
#[derive(Debug)]
pub(super) struct QueryPool {
    shared: Arc<dyn MemoryPool>,
    reserved: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl QueryPool {
    pub(super) fn new(
        shared: Arc<dyn MemoryPool>,
        reserved: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            shared,
            reserved,
            peak,
        }
    }

    fn grown(&self, additional: usize) {
        let now = self.reserved.fetch_add(additional, Ordering::Relaxed) + additional;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
}

impl std::fmt::Display for QueryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "query({})", self.shared)
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "query"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.shared.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.shared.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.shared.grow(reservation, additional);
        self.grown(additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.shared.shrink(reservation, shrink);
        self.reserved.fetch_sub(shrink, Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> DfResult<()> {
        self.shared.try_grow(reservation, additional)?;
        self.grown(additional);
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.shared.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.shared.memory_limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(kind: PoolKind, limit: usize) -> Arc<dyn MemoryPool> {
        Arc::new(MeteredPool::new(&MemoryOptions {
            limit,
            pool: kind,
            ..MemoryOptions::default()
        }))
    }

    fn metered(pool: &Arc<dyn MemoryPool>) -> &MeteredPool {
        pool.downcast_ref::<MeteredPool>().expect("metered")
    }

    #[test]
    fn a_refused_grow_takes_memory_back_from_the_cache_first() {
        for kind in [PoolKind::Fair, PoolKind::Greedy] {
            let pool = pool(kind, 1000);
            let cache = Arc::new(parking_lot::Mutex::new(
                MemoryConsumer::new("cache").register(&pool),
            ));
            cache.lock().try_grow(800).unwrap();
            let query = MemoryConsumer::new("query").register(&pool);
            // No reclaimer yet: refused.
            assert!(query.try_grow(500).is_err());
            let held = Arc::clone(&cache);
            metered(&pool).add_reclaimer(
                "cache",
                Box::new(move |bytes| {
                    let cache = held.lock();
                    let freed = bytes.min(cache.size());
                    cache.shrink(freed);
                    freed
                }),
            );
            query.try_grow(500).unwrap();
            assert_eq!(cache.lock().size(), 300);
            assert_eq!(pool.reserved(), 800);
            // The cache is never asked to give to itself; a grow that does not fit even
            // with the cache emptied is still refused (the cache gave what it had).
            assert!(cache.lock().try_grow(400).is_err());
            assert_eq!(cache.lock().size(), 300);
            assert!(query.try_grow(1000).is_err());
            assert_eq!(cache.lock().size(), 0);
            assert_eq!(query.size(), 500);
        }
    }

    #[test]
    fn every_grow_and_shrink_is_counted_and_they_balance() {
        for kind in [PoolKind::Fair, PoolKind::Greedy] {
            let pool = pool(kind, 1000);
            let a = MemoryConsumer::new("a").register(&pool);
            let b = MemoryConsumer::new("b")
                .with_can_spill(true)
                .register(&pool);
            a.grow(300);
            b.try_grow(200).unwrap();
            a.shrink(100);
            let m = metered(&pool);
            assert_eq!(m.reserved(), 400);
            assert_eq!(m.allocated_total(), 500);
            assert_eq!(m.freed_total(), 100);
            assert_eq!(m.peak(), 500);
            // A refused grow is neither counted nor reserved.
            assert!(a.try_grow(10_000).is_err());
            assert_eq!((m.reserved(), m.allocated_total()), (400, 500));
            drop(a);
            drop(b);
            assert_eq!(m.reserved(), 0, "{kind:?}");
            assert_eq!(m.allocated_total(), m.freed_total(), "{kind:?}");
            assert_eq!(m.peak(), 500);
        }
    }

    #[test]
    fn a_query_pool_counts_its_own_share_of_the_shared_pool() {
        let shared = pool(PoolKind::Fair, 1000);
        let mine = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let query: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(
            Arc::clone(&shared),
            Arc::clone(&mine),
            Arc::clone(&peak),
        ));
        let other = MemoryConsumer::new("other").register(&shared);
        other.grow(100);
        let r = MemoryConsumer::new("sort").register(&query);
        r.grow(300);
        r.shrink(50);
        assert_eq!(mine.load(Ordering::Relaxed), 250);
        assert_eq!(peak.load(Ordering::Relaxed), 300);
        assert_eq!(shared.reserved(), 350);
        drop(r);
        assert_eq!(mine.load(Ordering::Relaxed), 0);
        assert_eq!(
            metered(&shared).allocated_total() - metered(&shared).freed_total(),
            100
        );
    }

    #[test]
    fn refusals_still_name_the_top_consumers() {
        let pool = pool(PoolKind::Greedy, 100);
        let a = MemoryConsumer::new("big sort").register(&pool);
        a.grow(90);
        let b = MemoryConsumer::new("small").register(&pool);
        let err = b.try_grow(50).unwrap_err().to_string();
        assert!(err.contains("big sort"), "{err}");
    }
}
