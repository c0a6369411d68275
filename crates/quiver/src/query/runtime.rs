//! A dedicated Tokio runtime for DataFusion's CPU work.
//!
//! DataFusion decodes Parquet, filters and aggregates inside `poll`: on the runtime that
//! serves the network it would delay every other connection's I/O (HTTP/2 pings, flow
//! control, other streams) behind long compute steps. So plans run here and results
//! cross to the network runtime through a bounded channel, which is also the backpressure.

use std::future::Future;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::task::AbortOnDropHandle;

use crate::error::{Error, Result};

/// Owns the CPU runtime; dropping it shuts the runtime down without blocking.
#[derive(Debug)]
pub struct CpuRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl CpuRuntime {
    /// Starts a runtime with `threads` worker threads named `quiver-cpu`.
    pub fn new(threads: usize) -> Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("quiver-cpu")
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the CPU runtime: {e}")))?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Runs `future` on the CPU runtime. The task is aborted when the returned handle is
    /// dropped, so a request that goes away takes its query with it.
    pub fn spawn<F>(&self, future: F) -> AbortOnDropHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        AbortOnDropHandle::new(self.handle.spawn(future))
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
