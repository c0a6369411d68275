//! The process-level memory guard: the last line before the host's OOM killer.
//!
//! The pool (`--memory-limit`) bounds what operators reserve, and the function caps
//! bound what one call makes, but some memory is neither: batches in flight, decoded
//! pages, many capped calls at once. The guard reads the allocator's count of allocated
//! bytes (jemalloc's `stats.allocated`, supplied by the server) every few milliseconds
//! (less often while far below the limit).
//! Over `--memory-hard-limit` it refuses new queries (UNAVAILABLE, retryable) and
//! cancels the largest running query (RESOURCE_EXHAUSTED), then another after a pause
//! if the process is still over; below 90% of the limit it admits work again. A query
//! stops at its next yield; the pause lets memory it frees show before the guard picks
//! another.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::active::ActiveQueries;
use crate::error::{Error, Result};

/// Reads the bytes the process has allocated now.
pub type AllocatedBytes = Arc<dyn Fn() -> Option<usize> + Send + Sync>;

/// The guard's state, shared with admission and metrics.
#[derive(Debug, Default)]
pub struct HeapGuard {
    limit: AtomicU64,
    over: AtomicBool,
    cancelled: AtomicU64,
    last_allocated: AtomicU64,
}

/// Pause after cancelling a query before cancelling another.
const COOLDOWN: Duration = Duration::from_millis(500);

/// The fastest the process is taken to grow (bytes a second): far below the limit the
/// guard reads again just before growth at this rate could cross it, at most ten of its
/// periods later. Reading jemalloc's count refreshes every arena's statistics (~0.1 ms
/// here), 2% of the server's CPU at one reading every 10 ms.
const FAST_GROWTH: f64 = 8.0 * (1u64 << 30) as f64;

/// How long to wait for the next reading, `allocated` bytes now.
fn next_reading(allocated: usize, limit: usize, every: Duration) -> Duration {
    let headroom = limit.saturating_sub(allocated) as f64;
    Duration::from_secs_f64(headroom / FAST_GROWTH).clamp(every, every * 10)
}

impl HeapGuard {
    /// Whether the process is over the limit now (new queries are refused).
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Queries the guard has cancelled since start-up.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The limit; 0 when the guard is off.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes allocated at the last reading.
    pub fn last_allocated(&self) -> u64 {
        self.last_allocated.load(Ordering::Relaxed)
    }

    /// Refuses new work while over the limit.
    pub(super) fn check(&self) -> Result<()> {
        if self.over() {
            return Err(Error::Overloaded {
                reason: format!(
                    "the server has {} bytes allocated, over --memory-hard-limit ({} bytes)",
                    self.last_allocated(),
                    self.limit()
                ),
            });
        }
        Ok(())
    }

    /// Watches `allocated` against `limit` every `every` (up to ten times that apart while
    /// far below it), cancelling queries in `queries` while over it. Runs until dropped.
    pub(super) async fn watch(
        &self,
        allocated: AllocatedBytes,
        limit: usize,
        every: Duration,
        queries: &ActiveQueries,
    ) {
        self.limit.store(limit as u64, Ordering::Relaxed);
        let resume_below = limit / 10 * 9;
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            let Some(now) = allocated() else { continue };
            wait = next_reading(now, limit, every);
            self.last_allocated.store(now as u64, Ordering::Relaxed);
            if now <= limit {
                if now < resume_below && self.over.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        allocated = now,
                        limit,
                        "memory back under --memory-hard-limit"
                    );
                }
                continue;
            }
            if !self.over.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    allocated = now,
                    limit,
                    "memory over --memory-hard-limit: refusing new queries"
                );
            }
            let reason = format!(
                "the process had {now} bytes allocated, over --memory-hard-limit ({limit} \
                 bytes); this query was the largest running"
            );
            if let Some(id) = queries.cancel_largest(&reason) {
                self.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::error!(query = %id, allocated = now, limit, "memory guard cancelled a query");
                tokio::time::sleep(COOLDOWN).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_often_near_the_limit_and_less_often_far_below() {
        let every = Duration::from_millis(10);
        let gib = 1usize << 30;
        // Over the limit, at it, and within what 10 ms of fast growth would cross.
        assert_eq!(next_reading(5 * gib, 4 * gib, every), every);
        assert_eq!(next_reading(4 * gib, 4 * gib, every), every);
        assert_eq!(next_reading(4 * gib - (40 << 20), 4 * gib, every), every);
        // 0.5 GiB below: 8 GiB/s would take 62.5 ms to cross it.
        let half = next_reading(4 * gib - gib / 2, 4 * gib, every);
        assert!(half > every * 6 && half < every * 7, "{half:?}");
        // Far below: never more than ten periods apart.
        assert_eq!(next_reading(0, 20 * gib, every), every * 10);
    }
}
