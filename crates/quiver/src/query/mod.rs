//! SQL in, a stream of record batches out.
//!
//! One [`QueryEngine`] per server. It owns the DataFusion configuration, the runtime
//! environment shared by every query (so every query draws on the same caches and,
//! later, the same memory pool), the catalog and the CPU runtime. Each request gets its
//! own `SessionState` cloned from the base one, so nothing a query does leaks into another.

mod guard;
mod runtime;
mod scan;

pub use runtime::CpuRuntime;
pub use scan::{PartitionPruning, ScanReport, ScanSummary};

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::dataframe::DataFrame;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryPool, TrackConsumersPool,
};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::catalog::{Catalog, RefreshSummary, TableDefinition};
use crate::error::{Error, Result};
use crate::io::{Io, IoOptions, MmapStats};

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// Worker threads of the CPU runtime, and DataFusion's target partitions.
    pub cpu_threads: usize,
    /// `key=value` DataFusion settings applied after Quiver's defaults.
    pub datafusion_config: Vec<(String, String)>,
    /// How table files are read.
    pub io: IoOptions,
    /// The memory pool all queries share.
    pub memory: MemoryOptions,
}

/// Which memory pool policy queries share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PoolKind {
    /// Spillable operators (sorts, aggregations, joins) share the pool fairly, so one
    /// query cannot starve the others; they spill when over their share.
    #[default]
    Fair,
    /// First come, first served: a query may take the whole pool.
    Greedy,
}

/// The bounded memory every query draws from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Bytes all running queries may reserve together.
    pub limit: usize,
    /// Pool policy.
    pub pool: PoolKind,
    /// Where spill files go (the OS temporary directory when `None`).
    pub spill_dir: Option<std::path::PathBuf>,
    /// Most bytes of spill files at once; a query that needs more fails.
    pub max_spill_bytes: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            limit: usize::MAX,
            pool: PoolKind::default(),
            spill_dir: None,
            max_spill_bytes: 100 << 30,
        }
    }
}

/// Consumers named in a ResourceExhausted error: enough to see who took the memory.
const TOP_CONSUMERS: usize = 5;

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            cpu_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            datafusion_config: vec![],
            io: IoOptions::default(),
            memory: MemoryOptions::default(),
        }
    }
}

/// Plans and runs read-only SQL over the catalog.
pub struct QueryEngine {
    base: SessionContext,
    catalog: Arc<Catalog>,
    cpu: CpuRuntime,
    running: Arc<AtomicUsize>,
    io: Arc<Io>,
    scan_totals: Arc<Mutex<ScanSummary>>,
}

/// A started query: its result stream and the report of what it scanned.
pub struct Execution {
    /// The result batches; poll on the CPU runtime.
    pub stream: SendableRecordBatchStream,
    /// Records the scan summary when dropped; keep it until the stream is done.
    pub report: ScanReport,
}

/// Counts a query as running until dropped (the stream finished, failed or was cancelled).
#[derive(Debug)]
pub struct RunningQuery(Arc<AtomicUsize>);

impl Drop for RunningQuery {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("session", &self.base.session_id())
            .field("tables", &self.catalog.table_names())
            .finish_non_exhaustive()
    }
}

impl QueryEngine {
    /// Builds the session, starts the CPU runtime and loads every table.
    pub async fn new(tables: Vec<TableDefinition>, options: QueryOptions) -> Result<Self> {
        let io = Arc::new(Io::new(options.io));
        let config = session_config(&options)?.with_extension(Arc::clone(&io));
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(memory_pool(&options.memory))
            .with_disk_manager_builder(disk_manager(&options.memory))
            .build_arc()?;
        runtime.register_object_store(ObjectStoreUrl::local_filesystem().as_ref(), io.store());
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build();
        let cpu = CpuRuntime::new(options.cpu_threads)?;
        // Footers are read on the CPU runtime like all file bytes (see `io::mmap`).
        let catalog = {
            let state = state.clone();
            Arc::new(
                cpu.run(async move { Catalog::load(tables, state).await })
                    .await?,
            )
        };
        let base = SessionContext::new_with_state(state);
        base.catalog("datafusion")
            .ok_or_else(|| Error::Internal("the default catalog is missing".into()))?
            .register_schema("public", Arc::clone(&catalog) as _)?;
        Ok(Self {
            base,
            catalog,
            cpu,
            running: Arc::default(),
            io,
            scan_totals: Arc::default(),
        })
    }

    /// Re-lists every table now, on the CPU runtime (footer reads touch file bytes).
    pub async fn refresh(&self) -> RefreshSummary {
        let catalog = Arc::clone(&self.catalog);
        match self
            .cpu
            .run(async move { Ok(catalog.refresh().await) })
            .await
        {
            Ok(summary) => summary,
            Err(e) => {
                tracing::error!(error = %e, "refresh failed");
                RefreshSummary::default()
            }
        }
    }

    /// The pool every query reserves from.
    pub fn memory_pool(&self) -> Arc<dyn MemoryPool> {
        Arc::clone(&self.base.runtime_env().memory_pool)
    }

    /// Scan figures summed over every query so far.
    pub fn scan_totals(&self) -> ScanSummary {
        *self.scan_totals.lock().expect("poisoned")
    }

    /// Counters of the mapping cache, when reading through memory maps.
    pub fn mmap_stats(&self) -> Option<Arc<MmapStats>> {
        self.io.mmap_stats()
    }

    /// Queries whose results are still streaming.
    pub fn running_queries(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Marks a query as running for as long as the guard lives.
    pub fn track(&self) -> RunningQuery {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningQuery(Arc::clone(&self.running))
    }

    /// The tables.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The runtime that runs plans.
    pub fn cpu(&self) -> &CpuRuntime {
        &self.cpu
    }

    /// Parses, checks and plans `sql` without running it.
    pub async fn plan(&self, sql: &str) -> Result<DataFrame> {
        self.plan_with(sql, Arc::default()).await
    }

    /// [`Self::plan`], with table scans reporting partition pruning to `pruning`.
    async fn plan_with(&self, sql: &str, pruning: Arc<PartitionPruning>) -> Result<DataFrame> {
        let mut state = self.base.state();
        state.config_mut().set_extension(pruning);
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(sql, &dialect)?;
        guard::check_statement(&statement)?;
        guard::check_tables(&state, &self.catalog, &statement)?;
        let plan = state.statement_to_plan(statement).await?;
        guard::check_plan(&plan)?;
        Ok(DataFrame::new(state, plan))
    }

    /// The schema `sql` produces, from its plan.
    pub async fn schema(self: &Arc<Self>, sql: String) -> Result<SchemaRef> {
        let engine = Arc::clone(self);
        self.cpu
            .run(async move {
                let df = engine.plan(&sql).await?;
                Ok(Arc::clone(df.schema().inner()))
            })
            .await
    }

    /// Plans and starts `sql` on the CPU runtime. The stream must be polled on the CPU
    /// runtime too (see `flight::do_get`): DataFusion does its work inside `poll`.
    pub async fn execute(self: &Arc<Self>, sql: String) -> Result<Execution> {
        let engine = Arc::clone(self);
        self.cpu
            .run(async move {
                let pruning = Arc::new(PartitionPruning::default());
                let df = engine.plan_with(&sql, Arc::clone(&pruning)).await?;
                let task = Arc::new(df.task_ctx());
                let plan: Arc<dyn ExecutionPlan> = df.create_physical_plan().await?;
                let stream = execute_stream(Arc::clone(&plan), task)?;
                let report = ScanReport::new(plan, pruning, Arc::clone(&engine.scan_totals), &sql);
                Ok(Execution { stream, report })
            })
            .await
    }
}

/// The shared pool, tracking its largest consumers so that a query refused memory is
/// told who holds it.
fn memory_pool(options: &MemoryOptions) -> Arc<dyn MemoryPool> {
    let top = NonZeroUsize::new(TOP_CONSUMERS).expect("nonzero");
    match options.pool {
        PoolKind::Fair => Arc::new(TrackConsumersPool::new(
            FairSpillPool::new(options.limit),
            top,
        )),
        PoolKind::Greedy => Arc::new(TrackConsumersPool::new(
            GreedyMemoryPool::new(options.limit),
            top,
        )),
    }
}

fn disk_manager(options: &MemoryOptions) -> DiskManagerBuilder {
    let builder =
        DiskManagerBuilder::default().with_max_temp_directory_size(options.max_spill_bytes);
    match &options.spill_dir {
        Some(dir) => builder.with_mode(DiskManagerMode::Directories(vec![dir.clone()])),
        None => builder,
    }
}

/// Quiver's DataFusion defaults: every pushdown on, then the user's overrides.
fn session_config(options: &QueryOptions) -> Result<SessionConfig> {
    let mut config = SessionConfig::new()
        .with_target_partitions(options.cpu_threads.max(1))
        .with_information_schema(true)
        .with_collect_statistics(true);
    let defaults = [
        // Evaluate filters while decoding, so rows that fail are never materialised,
        // cheapest and most selective filters first.
        ("datafusion.execution.parquet.pushdown_filters", "true"),
        ("datafusion.execution.parquet.reorder_filters", "true"),
        ("datafusion.execution.parquet.enable_page_index", "true"),
        ("datafusion.execution.parquet.bloom_filter_on_read", "true"),
        ("datafusion.execution.parquet.pruning", "true"),
    ];
    let options_mut = config.options_mut();
    for (key, value) in defaults {
        options_mut.set(key, value)?;
    }
    for (key, value) in &options.datafusion_config {
        options_mut.set(key, value).map_err(|e| Error::Config {
            message: format!("--datafusion-config {key}={value}: {}", e.strip_backtrace()),
        })?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests;
