//! A dedicated Tokio runtime for DataFusion's CPU work.
//!
//! DataFusion decodes Parquet, filters and aggregates inside `poll`: on the runtime that
//! serves the network it would delay every other connection's I/O (HTTP/2 pings, flow
//! control, other streams) behind long compute steps. So plans run here and results
//! cross to the network runtime through a bounded channel, which is also the backpressure.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::task::AbortOnDropHandle;

use crate::error::{Error, Result};

/// Owns the CPU runtime; dropping it shuts the runtime down without blocking.
#[derive(Debug)]
pub struct CpuRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
    progress: Arc<Progress>,
}

/// Whether the CPU runtime is making progress, as [`CpuRuntime::watch_progress`] sees it.
#[derive(Debug, Default)]
pub struct Progress {
    stalled: AtomicBool,
    /// How long the last probe waited to run, in microseconds (the one still waiting,
    /// if it has waited longer).
    probe_wait_micros: AtomicU64,
    /// Threads the runtime has.
    threads: usize,
    /// The runtime, for its task count (`None` in tests of the probe alone).
    handle: Option<Handle>,
}

impl Progress {
    /// Whether an empty task has waited longer than the threshold to run: every thread
    /// is busy in work that does not yield.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// How long the last probe waited to be run.
    pub fn probe_wait(&self) -> Duration {
        Duration::from_micros(self.probe_wait_micros.load(Ordering::Relaxed))
    }

    /// Tasks on the runtime not yet finished: queries planning or running, and the
    /// progress probe while it waits. 0 when the server is idle.
    pub fn alive_tasks(&self) -> usize {
        self.handle
            .as_ref()
            .map_or(0, |h| h.metrics().num_alive_tasks())
    }

    fn record_wait(&self, waited: Duration) {
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.probe_wait_micros.store(micros, Ordering::Relaxed);
    }
}

impl CpuRuntime {
    /// Starts a runtime with `threads` worker threads named `quiver-cpu`, each (and each
    /// of its blocking threads) with a stack of `stack_size` bytes: planning and running
    /// a statement recurse as deep as its expressions nest (see `query::limits`).
    pub fn new(threads: usize, stack_size: usize) -> Result<Self> {
        Self::build(threads, stack_size, "quiver-cpu", false)
    }

    /// A runtime like [`Self::new`]'s that also has an I/O driver, named `name`: a
    /// cluster worker serves its port and runs the tasks it is sent there, so that they
    /// never delay this node's client connections nor queue behind its own queries.
    pub fn with_io(threads: usize, stack_size: usize, name: &str) -> Result<Self> {
        Self::build(threads, stack_size, name, true)
    }

    fn build(threads: usize, stack_size: usize, name: &str, io: bool) -> Result<Self> {
        let mut builder = Builder::new_multi_thread();
        builder
            .worker_threads(threads.max(1))
            .thread_stack_size(stack_size)
            .thread_name(name)
            .enable_time();
        if io {
            builder.enable_io();
        }
        let runtime = builder
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the {name} runtime: {e}")))?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle: handle.clone(),
            progress: Arc::new(Progress {
                threads: threads.max(1),
                handle: Some(handle.clone()),
                ..Progress::default()
            }),
        })
    }

    /// The runtime's handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Whether the runtime is making progress.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Probes the runtime every `every`, from the caller's runtime: an empty task that
    /// waits longer than `threshold` to run means every thread is stuck in work that does
    /// not yield. That is logged and shown ([`Progress::stalled`], the
    /// `quiver_cpu_runtime_stalled` metric, health NOT_SERVING in the server), and new
    /// queries are refused with UNAVAILABLE until a probe runs again. Runs until dropped.
    pub async fn watch_progress(&self, every: Duration, threshold: Duration) {
        let progress = &self.progress;
        loop {
            let sent = Instant::now();
            let mut probe = self.spawn(async {});
            loop {
                tokio::select! {
                    _ = &mut probe => break,
                    () = tokio::time::sleep(every) => {
                        let waited = sent.elapsed();
                        progress.record_wait(waited);
                        if waited >= threshold && !progress.stalled.swap(true, Ordering::Relaxed) {
                            tracing::error!(
                                waited = ?waited,
                                threads = progress.threads,
                                "the query runtime is stalled: every CPU thread has been busy \
                                 without yielding; new queries are refused until it recovers"
                            );
                        }
                    }
                }
            }
            progress.record_wait(sent.elapsed());
            if progress.stalled.swap(false, Ordering::Relaxed) {
                tracing::warn!("the query runtime is making progress again");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Runs `future` on the CPU runtime. The task is aborted when the returned handle is
    /// dropped, so a request that goes away takes its query with it.
    pub fn spawn<F>(&self, future: F) -> AbortOnDropHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        spawn_on(&self.handle, future)
    }

    /// Runs `future` on the CPU runtime and waits for its output.
    pub async fn run<F, T>(&self, future: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.spawn(future)
            .await
            .map_err(|e| Error::Internal(format!("query task failed: {e}")))?
    }
}

impl Drop for CpuRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime from async context panics; this does not wait for tasks.
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on the runtime the caller is on, owned by the returned handle: the task
/// is aborted when the handle is dropped, so no task outlives what started it. With
/// [`CpuRuntime::spawn`], the only way tasks are started (`clippy.toml` forbids the
/// others; the object store requests of `io::remote`, below this layer, own theirs the
/// same way).
pub fn spawn<F>(future: F) -> AbortOnDropHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    spawn_on(&tokio::runtime::Handle::current(), future)
}

/// Runs `future` on the runtime of `handle`, owned like [`spawn`]'s.
#[allow(clippy::disallowed_methods)] // the one place a task is spawned
pub fn spawn_on<F>(handle: &tokio::runtime::Handle, future: F) -> AbortOnDropHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    AbortOnDropHandle::new(handle.spawn(future))
}
