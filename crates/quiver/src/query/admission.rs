//! Admission control: at most N queries run, at most M wait, nobody waits forever.
//!
//! Under overload a server must degrade predictably. A query that finds every slot taken
//! waits in a bounded queue (its gRPC stream stays open meanwhile); a query that finds
//! the queue full, or waits longer than the queue timeout, is turned away at once with
//! UNAVAILABLE, which clients treat as retryable. A slot is held until the query's
//! stream ends, however it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Limits on running and waiting queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionOptions {
    /// Queries planning or streaming at once.
    pub max_concurrent: usize,
    /// Queries waiting for a slot; more are rejected at once.
    pub max_queued: usize,
    /// Longest wait for a slot.
    pub queue_timeout: Duration,
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            max_queued: 256,
            queue_timeout: Duration::from_secs(30),
        }
    }
}

/// The slots and the queue.
#[derive(Debug)]
pub(super) struct Admission {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    options: AdmissionOptions,
}

/// A running query's slot; dropping it lets the next query in.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    pub(super) fn new(options: AdmissionOptions) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(options.max_concurrent.max(1))),
            queued: AtomicUsize::new(0),
            options,
        }
    }

    /// A slot, now or after waiting in the queue. Fails with `Overloaded` when the queue
    /// is full or the wait times out, and with `Cancelled` if `cancel` fires first.
    pub(super) async fn admit(
        &self,
        cancel: &CancellationToken,
        queued_gauge: &IntGauge,
        mut on_queued: impl FnMut(),
    ) -> Result<Slot> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(Slot { _permit: permit });
        }
        // Take a place in the queue, if there is one.
        let max_queued = self.options.max_queued;
        let joined = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_queued).then_some(n + 1)
            })
            .is_ok();
        if !joined {
            return Err(Error::Overloaded {
                reason: format!(
                    "{} queries are running (--max-concurrent-queries) and {} are waiting \
                     (--max-queued-queries)",
                    self.options.max_concurrent, max_queued
                ),
            });
        }
        on_queued();
        queued_gauge.inc();
        let _leave_queue = LeaveQueue(&self.queued, queued_gauge);
        let wait = Arc::clone(&self.slots).acquire_owned();
        tokio::select! {
            permit = tokio::time::timeout(self.options.queue_timeout, wait) => match permit {
                Ok(Ok(permit)) => Ok(Slot { _permit: permit }),
                Ok(Err(_closed)) => Err(Error::ShuttingDown),
                Err(_elapsed) => Err(Error::Overloaded {
                    reason: format!(
                        "waited {} for one of {} query slots (--queue-timeout, \
                         --max-concurrent-queries)",
                        humantime::format_duration(self.options.queue_timeout),
                        self.options.max_concurrent
                    ),
                }),
            },
            () = cancel.cancelled() => Err(Error::Cancelled {
                reason: "cancelled while waiting for a query slot".into(),
            }),
        }
    }
}

/// Leaves the queue when the wait ends, however it ends (admitted, timed out, cancelled,
/// or the client went away and the future was dropped).
struct LeaveQueue<'a>(&'a AtomicUsize, &'a IntGauge);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(running: usize, queued: usize, timeout_ms: u64) -> Admission {
        Admission::new(AdmissionOptions {
            max_concurrent: running,
            max_queued: queued,
            queue_timeout: Duration::from_millis(timeout_ms),
        })
    }

    #[tokio::test]
    async fn slots_then_queue_then_rejection() {
        let a = Arc::new(admission(1, 1, 10_000));
        let gauge = IntGauge::new("q", "q").unwrap();
        let cancel = CancellationToken::new();
        let first = a.admit(&cancel, &gauge, || {}).await.unwrap();
        // The second waits in the queue...
        let waiter = {
            let (a, gauge, cancel) = (Arc::clone(&a), gauge.clone(), cancel.clone());
            crate::query::spawn(async move { a.admit(&cancel, &gauge, || {}).await.map(|_| ()) })
        };
        while gauge.get() != 1 {
            tokio::task::yield_now().await;
        }
        // ...so the third finds the queue full.
        let err = a.admit(&cancel, &gauge, || {}).await.unwrap_err();
        assert!(matches!(err, Error::Overloaded { .. }), "{err}");
        assert!(err.to_string().contains("--max-queued-queries"), "{err}");
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_wait_times_out_or_is_cancelled_and_leaves_the_queue() {
        let a = admission(1, 4, 50);
        let gauge = IntGauge::new("q", "q").unwrap();
        let cancel = CancellationToken::new();
        let _held = a.admit(&cancel, &gauge, || {}).await.unwrap();
        let err = a.admit(&cancel, &gauge, || {}).await.unwrap_err();
        assert!(err.to_string().contains("--queue-timeout"), "{err}");
        assert_eq!((gauge.get(), a.queued.load(Ordering::Relaxed)), (0, 0));
        cancel.cancel();
        let err = a.admit(&cancel, &gauge, || {}).await.unwrap_err();
        assert!(matches!(err, Error::Cancelled { .. }), "{err}");
        assert_eq!((gauge.get(), a.queued.load(Ordering::Relaxed)), (0, 0));
    }
}
