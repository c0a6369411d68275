//! Throttling password logins, which are expensive on purpose.
//!
//! One argon2id verification takes ~19 MiB and tens of milliseconds of a core. Without
//! bounds, a flood of bad Handshakes turns into unbounded threads and memory. So:
//!
//! ```text
//!  Handshake ─▶ user in backoff? ──yes──▶ UNAUTHENTICATED at once ("retry in Ns")
//!                │no
//!                ▼
//!  lane: "clean" (a known user without recent failures) or "suspect" (anything else)
//!  wait for a verification permit (--auth-concurrency, one kept for clean logins),
//!  at most --auth-queue waiting per lane, else UNAVAILABLE at once
//!                ▼
//!  argon2id on a blocking thread ─▶ ok: session token
//!                                 └▶ wrong: failure counted for the user and the peer;
//!                                    the answer is delayed by the peer's backoff
//! ```
//!
//! A user's failures past a few put that user in exponential backoff (attempts are
//! refused without verifying), which caps guessing at a handful per backoff period. A
//! peer's failures only delay the answers it gets, never someone else's login from the
//! same address (a NAT, or loopback in tests). A flood of bad logins therefore costs at
//! most `--auth-concurrency` verifications at a time, and a valid user's login still
//! finds the permit kept for clean logins. Under such a flood, logins for unknown names
//! wait longer than logins for known ones: a timing difference only an attacker who is
//! already flooding can see.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};

/// Limits on password logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// argon2id verifications at once (`--auth-concurrency`).
    pub concurrency: usize,
    /// Logins waiting for a verification, per lane (`--auth-queue`).
    pub queue: usize,
    /// Failed logins for one user before it backs off (`--auth-failures-before-backoff`).
    pub failures_before_backoff: u32,
    /// Longest backoff (`--auth-backoff-max`).
    pub backoff_max: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue: 64,
            failures_before_backoff: 5,
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Why an authentication failed: the label of `quiver_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Wrong user name or password.
    BadCredentials,
    /// A missing or malformed `authorization` header.
    Malformed,
    /// The user is in backoff after failed logins.
    Backoff,
    /// Too many logins waiting.
    Overloaded,
    /// A bearer token nobody issued.
    UnknownToken,
    /// A session token past its lifetime.
    ExpiredToken,
}

impl FailureReason {
    /// Every reason, for initialising the label values.
    pub const ALL: [FailureReason; 6] = [
        FailureReason::BadCredentials,
        FailureReason::Malformed,
        FailureReason::Backoff,
        FailureReason::Overloaded,
        FailureReason::UnknownToken,
        FailureReason::ExpiredToken,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::BadCredentials => "bad_credentials",
            FailureReason::Malformed => "malformed",
            FailureReason::Backoff => "backoff",
            FailureReason::Overloaded => "overloaded",
            FailureReason::UnknownToken => "unknown_token",
            FailureReason::ExpiredToken => "expired_token",
        }
    }
}

/// Most users and peers whose failures are remembered; the oldest are forgotten first.
const MAX_TRACKED: usize = 10_000;
/// Failures are forgotten this long after the last one.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// The first backoff; each further failure doubles it, up to `backoff_max`.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The delay added to a failed login's answer doubles per failure from the same peer
/// from here, up to this cap.
const PEER_DELAY_BASE: Duration = Duration::from_millis(50);
const PEER_DELAY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(String),
    Peer(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// The permits, queues and failure records.
#[derive(Debug)]
pub(crate) struct LoginThrottle {
    limits: LoginLimits,
    /// Verifications any login may use.
    shared: Semaphore,
    /// One verification kept for clean logins.
    reserved: Semaphore,
    waiting_clean: AtomicUsize,
    waiting_suspect: AtomicUsize,
    failures: Mutex<HashMap<Key, Failures>>,
    counter: IntCounterVec,
}

/// A verification permit; the login runs argon2 while holding it.
pub(crate) struct Permit<'a> {
    _permit: SemaphorePermit<'a>,
}

impl LoginThrottle {
    pub(crate) fn new(limits: LoginLimits) -> Self {
        let counter = IntCounterVec::new(
            prometheus::Opts::new(
                "quiver_auth_failures_total",
                "Failed authentications, by reason: bad_credentials, malformed, backoff \
                 (refused while the user backs off), overloaded (too many logins waiting), \
                 unknown_token, expired_token.",
            ),
            &["reason"],
        )
        .expect("a valid metric definition");
        for reason in FailureReason::ALL {
            counter.with_label_values(&[reason.as_str()]);
        }
        let concurrency = limits.concurrency.max(1);
        Self {
            limits,
            // With one permit in all, it is shared; the reserve adds one more.
            shared: Semaphore::new(concurrency.saturating_sub(1).max(1)),
            reserved: Semaphore::new(1),
            waiting_clean: AtomicUsize::new(0),
            waiting_suspect: AtomicUsize::new(0),
            failures: Mutex::default(),
            counter,
        }
    }

    /// The failure counter, for the registry.
    pub(crate) fn counter(&self) -> &IntCounterVec {
        &self.counter
    }

    /// Counts a failure with `reason`.
    pub(crate) fn count(&self, reason: FailureReason) {
        self.counter.with_label_values(&[reason.as_str()]).inc();
    }

    /// Refuses a login for `user` while it backs off.
    pub(crate) fn check_backoff(&self, user: &str) -> Result<()> {
        let now = Instant::now();
        let failures = self.failures.lock();
        let Some(f) = failures.get(&Key::User(user.to_string())) else {
            return Ok(());
        };
        let until = f.last + self.backoff(f.count);
        if f.count >= self.limits.failures_before_backoff && now < until {
            drop(failures);
            self.count(FailureReason::Backoff);
            let wait = until - now;
            return Err(Error::Unauthenticated {
                reason: format!(
                    "too many failed logins for this user; retry in {:.1}s",
                    wait.as_secs_f64()
                ),
            });
        }
        Ok(())
    }

    /// Whether `user` has failed logins on record.
    fn has_failures(&self, user: &str) -> bool {
        self.failures
            .lock()
            .contains_key(&Key::User(user.to_string()))
    }

    /// Waits for a verification permit. `known` is whether the user name exists.
    pub(crate) async fn permit(&self, user: &str, known: bool) -> Result<Permit<'_>> {
        let clean = known && !self.has_failures(user);
        let waiting = if clean {
            &self.waiting_clean
        } else {
            &self.waiting_suspect
        };
        let max = self.limits.queue;
        if waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            self.count(FailureReason::Overloaded);
            return Err(Error::Overloaded {
                reason: format!("{max} logins are waiting for a password check (--auth-queue)"),
            });
        }
        let _leave = Leave(waiting);
        let permit = if clean {
            tokio::select! {
                p = self.shared.acquire() => p,
                p = self.reserved.acquire() => p,
            }
        } else {
            self.shared.acquire().await
        };
        let permit = permit.map_err(|_| Error::ShuttingDown)?;
        Ok(Permit { _permit: permit })
    }

    /// Records a failed login for `user` from `peer`; returns how long to delay the
    /// answer.
    pub(crate) fn failed(&self, user: &str, peer: Option<IpAddr>) -> Duration {
        self.count(FailureReason::BadCredentials);
        let now = Instant::now();
        let mut failures = self.failures.lock();
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if failures.len() >= MAX_TRACKED {
                // Still full of recent failures: forget the oldest tenth.
                let mut lasts: Vec<Instant> = failures.values().map(|f| f.last).collect();
                lasts.sort_unstable();
                let cut = lasts[lasts.len() / 10];
                failures.retain(|_, f| f.last > cut);
            }
        }
        let mut bump = |key: Key| {
            let f = failures.entry(key).or_insert(Failures {
                count: 0,
                last: now,
            });
            if now.duration_since(f.last) >= FORGET_AFTER {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
            f.count
        };
        // Names longer than any real one are counted under one key.
        let name: String = user.chars().take(128).collect();
        bump(Key::User(name));
        let Some(peer) = peer else {
            return PEER_DELAY_BASE;
        };
        let count = bump(Key::Peer(peer));
        doubling(PEER_DELAY_BASE, count.saturating_sub(1), PEER_DELAY_MAX)
    }

    /// Clears `user`'s failures after a successful login.
    pub(crate) fn succeeded(&self, user: &str) {
        self.failures.lock().remove(&Key::User(user.to_string()));
    }

    fn backoff(&self, count: u32) -> Duration {
        let past = count.saturating_sub(self.limits.failures_before_backoff);
        doubling(BACKOFF_BASE, past, self.limits.backoff_max)
    }
}

/// `base` doubled `times` times, at most `max`.
fn doubling(base: Duration, times: u32, max: Duration) -> Duration {
    base.saturating_mul(1u32.checked_shl(times.min(31)).unwrap_or(u32::MAX))
        .min(max)
}

struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> LoginThrottle {
        LoginThrottle::new(LoginLimits {
            concurrency: 2,
            queue: 2,
            failures_before_backoff: 3,
            backoff_max: Duration::from_secs(60),
        })
    }

    #[test]
    fn a_user_backs_off_after_failures_and_success_clears_it() {
        let t = throttle();
        for _ in 0..3 {
            t.check_backoff("alice").unwrap();
            t.failed("alice", None);
        }
        let err = t.check_backoff("alice").unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.to_string().contains("retry in"), "{err}");
        // Others are unaffected.
        t.check_backoff("bob").unwrap();
        t.succeeded("alice");
        t.check_backoff("alice").unwrap();
        assert_eq!(t.counter.with_label_values(&["backoff"]).get(), 1);
    }

    #[test]
    fn peer_delay_doubles_and_is_capped() {
        let t = throttle();
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        let delays: Vec<Duration> = (0..10).map(|i| t.failed(&format!("u{i}"), peer)).collect();
        assert_eq!(delays[0], PEER_DELAY_BASE);
        assert_eq!(delays[1], PEER_DELAY_BASE * 2);
        assert_eq!(delays[9], PEER_DELAY_MAX);
        assert_eq!(
            doubling(BACKOFF_BASE, 1000, Duration::from_secs(60)),
            Duration::from_secs(60)
        );
    }

    #[tokio::test]
    async fn clean_logins_keep_a_permit_and_queues_are_bounded() {
        let t = throttle();
        // Two suspects waiting fill their lane; a third is refused at once.
        let held = t.permit("nobody", false).await.unwrap();
        let w1 = t.permit("nobody", false);
        let w2 = t.permit("nobody", false);
        futures::pin_mut!(w1, w2);
        assert!(futures::poll!(&mut w1).is_pending());
        assert!(futures::poll!(&mut w2).is_pending());
        let err = t.permit("nobody", false).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        // A known user with no failures gets the reserved permit meanwhile.
        let clean = t.permit("alice", true).await.unwrap();
        drop((held, clean));
    }
}
