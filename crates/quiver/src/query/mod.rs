//! SQL in, a stream of record batches out.
//!
//! One [`QueryEngine`] per server. It owns the DataFusion configuration, the runtime
//! environment shared by every query (so every query draws on the same caches and,
//! later, the same memory pool), the catalog and the CPU runtime. Each request gets its
//! own `SessionState` cloned from the base one, so nothing a query does leaks into another.

mod access;
mod active;
mod admission;
mod caller;
mod caps;
mod collector;
mod conjunction;
mod coop;
mod deadline;
mod distributed;
mod explain;
mod guard;
mod heap_guard;
mod limits;
mod measured;
mod memory;
mod node_rule;
mod options;
mod params;
mod pinned_slices;
mod plan_cache;
mod pushdown;
mod request;
mod result_cache;
mod routed;
mod running;
mod runtime;
mod scan;
mod slice;

pub use access::TableAccess;
pub use active::{
    ActiveQueries, ActiveQuery, MAX_QUERY_ID_BYTES, QuerySnapshot, QueryState, check_query_id,
};
pub use admission::{AdmissionOptions, Slot};
pub use caller::Caller;
pub use deadline::Deadline;
pub use distributed::{ClusterPlanning, Distribution, NodeLocations};
pub use heap_guard::{AllocatedBytes, HeapGuard};
pub use limits::{DEFAULT_STACK_SIZE, SqlLimits};
pub use memory::MeteredPool;
pub use options::{
    DEFAULT_MAX_FUNCTION_OUTPUT, DEFAULT_PLAN_CACHE_ENTRIES, MemoryOptions, PoolKind, QueryLimits,
    QueryOptions,
};
pub(crate) use params::cast_params;
pub use pushdown::FilterPushdown;
pub use request::{Described, Prepared, QueryRequest, TableListing, new_query_id};
use running::QueryAudit;
pub use running::RunningQuery;
pub use runtime::{CpuRuntime, Progress, spawn, spawn_on};
pub use scan::{ScanReport, ScanSummary};
pub use slice::{MAX_SLICES, Pieces, Slice};

use parking_lot::Mutex;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::MemoryPool;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::audit::AuditLog;
use crate::catalog::{Catalog, RefreshSummary, TableDefinition, TableLocation};
use crate::catalog::{PartitionPruning, RowGroupCache, RowGroupCaching, row_group_cache};
use crate::error::{Error, Result};
use crate::io::{ChunkCache, Io, MmapStats, chunk_cache};
use crate::metrics::{Outcome, QueryMetrics};
use crate::wire::pinned::PinnedMessages;
use crate::wire::views::{ViewTwins, ViewTypes};
use admission::Admission;
use collector::{EngineCollector, EngineSources};
use distributed::Planners;
use memory::QueryPool;
use plan_cache::PlanCache;
use result_cache::ResultCache;

/// Plans and runs read-only SQL over the catalog.
pub struct QueryEngine {
    base: SessionContext,
    /// The session a kept plan is planned and run in (cloned per query): the base one
    /// without its functions. A kept plan is past everything that looks functions up by name (parsing, the
    /// logical planner and optimizer); what is left (the physical planner, the scans,
    /// execution) takes them from the plan. The base session's ~350 functions, copied
    /// for each query into its session and again into its task context (a `String` and
    /// a hash table entry each), were 4-5% of a small query's CPU (docs/benchmarks.md).
    lean: SessionState,
    /// With workers: the states that plan across them (`query::distributed`).
    planners: Option<Planners>,
    catalog: Arc<Catalog>,
    cpu: CpuRuntime,
    io: Arc<Io>,
    /// Pinned tables' batches as the messages that send them.
    pinned: Arc<PinnedMessages>,
    view_types: ViewTypes,
    /// The row group cache's view twins, when it is on.
    view_twins: Option<Arc<ViewTwins>>,
    pool: Arc<MeteredPool>,
    scan_totals: Arc<Mutex<ScanSummary>>,
    metrics: QueryMetrics,
    admission: Admission,
    active: Arc<ActiveQueries>,
    limits: QueryLimits,
    sql_limits: SqlLimits,
    endpoints_per_query: usize,
    heap: Arc<HeapGuard>,
    audit: Option<Arc<AuditLog>>,
    /// Answers of repeated queries (`--result-cache-size`); `None` when off.
    result_cache: Option<Arc<ResultCache>>,
    /// Plans of repeated statements (`--plan-cache-entries`); `None` when off.
    plans: Option<Arc<PlanCache>>,
    /// When the last refresh started, and what it found (see [`Self::refresh`]).
    last_refresh: tokio::sync::Mutex<Option<(std::time::Instant, RefreshSummary)>>,
}

/// A started query: its result stream, the report of what it scanned, its entry in the
/// active queries and metrics, and its deadline. Keep them until the stream is done.
pub struct Execution {
    /// The result batches; poll on the CPU runtime.
    pub stream: SendableRecordBatchStream,
    /// Records the scan summary when dropped.
    pub report: ScanReport,
    /// Lists the query and holds its slot; record what is sent and how it ended here.
    pub query: RunningQuery,
    /// When the whole query must be done.
    pub deadline: Deadline,
}

/// How the task that planned a query hands its caller what starts the response
/// ([`QueryEngine::execute_then`]).
#[derive(Debug)]
pub struct Planned<W>(tokio::sync::oneshot::Sender<Result<W>>);

impl<W> Planned<W> {
    /// The query is planned and running: the caller gets `what`.
    pub fn ready(self, what: W) {
        let _ = self.0.send(Ok(what));
    }

    /// The query cannot start after all: the caller gets `error`.
    pub fn fail(self, error: Error) {
        let _ = self.0.send(Err(error));
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
        let pool = Arc::new(MeteredPool::new(&options.memory));
        let cpu = CpuRuntime::new(options.cpu_threads, options.stack_size)?;
        let mut io = Io::new(options.io, options.remote.clone());
        if options.io.chunk_cache_size > 0 {
            let shared = Arc::clone(&pool) as Arc<dyn MemoryPool>;
            let cache = Arc::new(ChunkCache::new(options.io.chunk_cache_size, &shared));
            // Weak: the cache's reservation holds the pool.
            let weak = Arc::downgrade(&cache);
            pool.add_reclaimer(
                chunk_cache::CONSUMER,
                Box::new(move |bytes| weak.upgrade().map_or(0, |c| c.reclaim(bytes))),
            );
            io = io.with_chunk_cache(cache);
        }
        let io = Arc::new(io);
        let pinned = Arc::new(PinnedMessages::new(options.max_message_size));
        let config = session_config(&options)?
            .with_extension(Arc::clone(&io))
            .with_extension(Arc::clone(&pinned))
            .with_extension(Arc::new(options.view_types));
        // Tables find the row group cache in their session (`HiveTable::scan`).
        let row_groups = (options.row_group_cache_size > 0).then(|| {
            let shared = Arc::clone(&pool) as Arc<dyn MemoryPool>;
            let cache = RowGroupCache::new(
                options.row_group_cache_size,
                options.row_group_cache_admission,
                &shared,
            );
            // Row groups are decoded on the CPU runtime, while the scan that asked reads
            // them from the file.
            let handle = cpu.handle().clone();
            let spawn: row_group_cache::Spawner = Arc::new(move |task| spawn_on(&handle, task));
            let cache = Arc::new(cache.with_loader(spawn));
            let weak = Arc::downgrade(&cache);
            pool.add_reclaimer(
                row_group_cache::CONSUMER,
                Box::new(move |bytes| weak.upgrade().map_or(0, |c| c.reclaim(bytes))),
            );
            cache
        });
        let view_twins = row_groups.as_ref().map(|c| Arc::clone(c.view_twins()));
        let config = config.with_extension(Arc::new(RowGroupCaching(row_groups)));
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::clone(&pool) as Arc<dyn MemoryPool>)
            .with_disk_manager_builder(disk_manager(&options.memory))
            .build_arc()?;
        runtime.register_object_store(ObjectStoreUrl::local_filesystem().as_ref(), io.store());
        // Each bucket of an S3 table, for DataFusion's scans to find (reads go through
        // the table's own reader, see `io::remote`).
        if let Some(remote) = io.remote() {
            for def in &tables {
                if let TableLocation::S3 { bucket, .. } = &def.location {
                    let bucket = remote.bucket(bucket)?;
                    runtime.register_object_store(
                        ObjectStoreUrl::parse(bucket.url())?.as_ref(),
                        bucket.store(),
                    );
                }
            }
        }
        let mut builder = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(pinned_slices::KEEP_PINNED_SLICES))
            .with_physical_optimizer_rule(Arc::new(coop::YIELD_ABOVE_AMPLIFIERS));
        if options.filter_pushdown == FilterPushdown::Runtime {
            builder = builder.with_physical_optimizer_rule(Arc::new(pushdown::PushRuntimeFilters));
        }
        // Last: the rules before it read filters' predicates as DataFusion wrote them.
        builder =
            builder.with_physical_optimizer_rule(Arc::new(conjunction::WHOLE_CHEAP_CONJUNCTS));
        let mut state = builder.build();
        caps::install(&mut state, options.max_function_output)?;
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
        let metrics = QueryMetrics::new(catalog.table_names().iter().map(String::as_str))?;
        let lean = SessionStateBuilder::new_from_existing(base.state())
            .with_scalar_functions(Vec::new())
            .with_higher_order_functions(Vec::new())
            .with_aggregate_functions(Vec::new())
            .with_window_functions(Vec::new())
            .build();
        let planners = options
            .cluster
            .as_ref()
            .map(|cluster| Planners::new(&base.state(), cluster))
            .transpose()?;
        Ok(Self {
            base,
            lean,
            planners,
            catalog,
            cpu,
            io,
            pinned,
            view_types: options.view_types,
            view_twins,
            pool: Arc::clone(&pool),
            scan_totals: Arc::default(),
            metrics,
            admission: Admission::new(options.admission),
            active: Arc::default(),
            limits: options.limits,
            sql_limits: options.sql,
            endpoints_per_query: options.endpoints_per_query.clamp(1, MAX_SLICES as usize),
            heap: Arc::default(),
            audit: options.audit,
            result_cache: (options.result_cache_size > 0).then(|| {
                Arc::new(ResultCache::new(
                    options.result_cache_size,
                    Arc::clone(&pool) as Arc<dyn MemoryPool>,
                ))
            }),
            plans: (options.plan_cache_entries > 0)
                .then(|| Arc::new(PlanCache::new(options.plan_cache_entries))),
            last_refresh: tokio::sync::Mutex::default(),
        })
    }

    /// Adds the engine's metrics to `registry`: the query families, and a collector
    /// that reads the memory pool, spill, scan, memory map and catalog figures at
    /// scrape time.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> Result<()> {
        self.metrics.register(registry)?;
        let collector = EngineCollector::new(EngineSources {
            pool: Arc::clone(&self.pool),
            disk: Arc::clone(&self.base.runtime_env().disk_manager),
            scan_totals: Arc::clone(&self.scan_totals),
            mmap: self.io.mmap_stats(),
            pages: self.io.chunk_cache_stats(),
            row_groups: self
                .base
                .state()
                .config()
                .get_extension::<RowGroupCaching>()
                .and_then(|c| c.0.as_ref().map(|c| Arc::clone(c.stats()))),
            cache: self
                .io
                .remote()
                .and_then(|r| r.cache())
                .map(|c| Arc::clone(c.stats())),
            catalog: Arc::clone(&self.catalog),
            cpu: Arc::clone(self.cpu.progress()),
            heap: Arc::clone(&self.heap),
            results: self.result_cache.clone(),
            plans: self.plans.clone(),
        })?;
        registry.register(Box::new(collector))?;
        if let Some(remote) = self.io.remote() {
            remote.metrics().register(registry)?;
        }
        Ok(())
    }

    /// Re-lists every table now, on the CPU runtime (footer reads touch file bytes).
    /// Single flight: refreshes run one at a time, and calls that arrive while one runs
    /// share the next one (which starts after they arrived, so it sees every file
    /// published before them): however many call at once, at most two run in a row.
    pub async fn refresh(&self) -> RefreshSummary {
        let arrived = std::time::Instant::now();
        let mut last = self.last_refresh.lock().await;
        if let Some((started, summary)) = &*last
            && *started >= arrived
        {
            return summary.clone();
        }
        let started = std::time::Instant::now();
        let summary = self.refresh_now().await;
        // Answers that read a replaced table version can never be served again.
        if let Some(cache) = &self.result_cache {
            cache.retain_current(&self.catalog);
        }
        *last = Some((started, summary.clone()));
        summary
    }

    async fn refresh_now(&self) -> RefreshSummary {
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

    /// The pool, with its allocation counters.
    pub fn metered_pool(&self) -> &Arc<MeteredPool> {
        &self.pool
    }

    /// Scan figures summed over every query so far.
    pub fn scan_totals(&self) -> ScanSummary {
        *self.scan_totals.lock()
    }

    /// Counters of the mapping cache, when reading through memory maps.
    pub fn mmap_stats(&self) -> Option<Arc<MmapStats>> {
        self.io.mmap_stats()
    }

    /// Queries planning or streaming now.
    pub fn running_queries(&self) -> usize {
        self.metrics.active.get().max(0) as usize
    }

    /// Queries waiting or running, for listing and cancelling.
    pub fn active_queries(&self) -> &Arc<ActiveQueries> {
        &self.active
    }

    /// How string and binary views are sent.
    pub fn view_types(&self) -> ViewTypes {
        self.view_types
    }

    /// Offset twins of cached rows' view columns, for the send path (`wire::views`).
    pub fn view_twins(&self) -> Option<&Arc<ViewTwins>> {
        self.view_twins.as_ref()
    }

    /// Pinned tables' batches as their messages, for the send path (`wire::pinned`).
    pub fn pinned_messages(&self) -> &Arc<PinnedMessages> {
        &self.pinned
    }

    /// The time limits.
    pub fn limits(&self) -> &QueryLimits {
        &self.limits
    }

    /// The tables.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The single-node session every query's state starts from: its settings, config
    /// extensions and runtime (memory pool, object stores). A cluster worker runs its
    /// tasks with them too.
    pub fn base_state(&self) -> SessionState {
        self.base.state()
    }

    /// How table files are read.
    pub fn io(&self) -> &Arc<Io> {
        &self.io
    }

    /// Every table and view a caller with `access` can name, in catalog, schema, name
    /// order.
    pub async fn list_tables(&self, access: &TableAccess) -> Result<Vec<TableListing>> {
        let mut tables = vec![];
        for catalog_name in self.base.catalog_names() {
            let Some(catalog) = self.base.catalog(&catalog_name) else {
                continue;
            };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else {
                    continue;
                };
                for name in access.visible(schema.table_names()) {
                    let Some(table) = schema.table(&name).await? else {
                        continue;
                    };
                    tables.push(TableListing {
                        catalog: catalog_name.clone(),
                        schema: schema_name.clone(),
                        name,
                        table_type: match table.table_type() {
                            datafusion::datasource::TableType::View => "VIEW",
                            _ => "TABLE",
                        },
                        arrow_schema: table.schema(),
                    });
                }
            }
        }
        tables.sort_by(|a, b| {
            (&a.catalog, &a.schema, &a.name).cmp(&(&b.catalog, &b.schema, &b.name))
        });
        Ok(tables)
    }

    /// The runtime that runs plans.
    pub fn cpu(&self) -> &CpuRuntime {
        &self.cpu
    }

    /// Parses, checks and plans `sql` without running it.
    pub async fn plan(&self, sql: &str) -> Result<DataFrame> {
        let statement = self
            .plan_statement(sql, vec![], &TableAccess::All, Arc::default(), None, false)
            .await?;
        Ok(statement.df)
    }

    /// [`Self::plan`] with `params` bound (cast to the placeholders' types), over the
    /// tables `access` lets the caller see, table scans reporting partition pruning to
    /// `pruning`, spread over the cluster as `distribution` asks (`None`: the default);
    /// from the plan cache when it holds the statement's plan. `sliced`: the plan is (or
    /// may be) split over endpoints, so its scans read their files, not the row group
    /// cache: each slice is planned again at its `DoGet` and must find the same pieces.
    async fn plan_statement(
        &self,
        sql: &str,
        params: Vec<ScalarValue>,
        access: &TableAccess,
        pruning: Arc<PartitionPruning>,
        distribution: Option<Distribution>,
        sliced: bool,
    ) -> Result<PlannedStatement> {
        self.sql_limits.check_text(sql)?;
        let cluster_state = self.planners.as_ref().and_then(|p| p.state(distribution));
        let distributed = cluster_state.is_some();
        // Checked, planned and optimized before for a caller with the same access, over
        // the same table versions: the same plan again.
        let key = self
            .plans
            .as_ref()
            .filter(|_| !distributed)
            .and_then(|_| plan_cache::Key::new(sql, &params, access));
        if let (Some(cache), Some(key)) = (&self.plans, &key)
            && let Some(kept) = cache.get(key, &self.catalog)
        {
            let state = query_state(self.lean.clone(), access, pruning, sliced)?;
            return Ok(PlannedStatement {
                df: DataFrame::new(state, kept.plan.clone()),
                kept: Some(kept),
                keep: None,
            });
        }
        let state = cluster_state.unwrap_or_else(|| self.base.state());
        let state = query_state(state, access, pruning, sliced)?;
        let dialect = state.config().options().sql_parser.dialect;
        let mut statement = state.sql_to_statement(sql, &dialect)?;
        // First: everything after it walks the statement recursively.
        self.sql_limits.check_statement(&statement)?;
        guard::check_statement(&statement)?;
        guard::check_tables(&state, &self.catalog, access, &statement)?;
        params::number_placeholders(&mut statement)?;
        let plan = state.statement_to_plan(statement).await?;
        guard::check_plan(&plan)?;
        access.check_plan(&plan, &self.catalog)?;
        let plan = if params.is_empty() {
            plan
        } else {
            let types = params::parameter_types(plan.get_parameter_types()?)?;
            plan.with_param_values(params::cast_params(params, &types)?)?
        };
        Ok(PlannedStatement {
            df: DataFrame::new(state, plan),
            kept: None,
            keep: key,
        })
    }

    /// The physical plan of `statement`, whose scans report to `pruning`: its optimized
    /// plan (kept in the plan cache when it may be) planned by the session's query planner,
    /// as DataFusion's `create_physical_plan` does; or a copy of the physical plan kept
    /// with it, where every scan reads a pinned table (`plan_cache::KeptPhysical`).
    async fn physical_plan(
        &self,
        statement: PlannedStatement,
        pruning: &PartitionPruning,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (state, plan) = statement.df.into_parts();
        let kept = match statement.kept {
            Some(kept) => kept,
            None => {
                let optimized = state.optimize(&plan)?;
                let kept = match (&self.plans, statement.keep) {
                    (Some(cache), Some(key)) => cache.insert(key, plan, optimized.clone()),
                    _ => None,
                };
                match kept {
                    Some(kept) => kept,
                    None => {
                        return Ok(state
                            .query_planner()
                            .create_physical_plan(&optimized, &state)
                            .await?);
                    }
                }
            }
        };
        let cache = self.plans.as_deref();
        if let Some(physical) = cache.and_then(|c| c.physical(&kept, pruning)) {
            return Ok(physical?);
        }
        let physical = state
            .query_planner()
            .create_physical_plan(&kept.optimized, &state)
            .await?;
        if let Some(cache) = cache {
            cache.keep_physical(&kept, &physical, pruning);
        }
        Ok(physical)
    }

    /// The schema `sql` produces with `params` bound, from its plan. Planned like a
    /// query: within a slot and `--planning-timeout` (or the client's deadline).
    pub async fn schema(
        self: &Arc<Self>,
        sql: String,
        params: Vec<ScalarValue>,
        caller: &Caller,
    ) -> Result<SchemaRef> {
        let access = Arc::clone(&caller.tables);
        self.plan_admitted(caller.client_timeout, move |engine| async move {
            let df = engine
                .plan_statement(&sql, params, &access, Arc::default(), None, false)
                .await?
                .df;
            Ok(Arc::clone(df.schema().inner()))
        })
        .await
    }

    /// Where the slices of a split result are served, in turn: this node (`None`, or
    /// its `--advertise-url`), then each worker that answers; empty without a cluster.
    pub fn slice_locations(&self) -> Vec<Option<String>> {
        self.planners
            .as_ref()
            .map(|p| p.slice_locations())
            .unwrap_or_default()
    }

    /// What a `FlightInfo` says of `sql`'s result: its schema, whether it is ordered, and
    /// how its scans split into slices, one per endpoint (`--endpoints-per-query`).
    /// Planned like [`Self::schema`]; the physical plan is made only when results may
    /// split.
    pub async fn describe(
        self: &Arc<Self>,
        sql: String,
        params: Vec<ScalarValue>,
        caller: &Caller,
    ) -> Result<Described> {
        let access = Arc::clone(&caller.tables);
        let max_slices = self.endpoints_per_query;
        self.plan_admitted(caller.client_timeout, move |engine| async move {
            let df = engine
                .plan_statement(
                    &sql,
                    params,
                    &access,
                    Arc::default(),
                    Some(Distribution::Off),
                    max_slices > 1,
                )
                .await?
                .df;
            let schema = Arc::clone(df.schema().inner());
            let ordered = is_ordered(df.logical_plan());
            let pieces = match max_slices > 1 {
                true => slice::pieces(&df.create_physical_plan().await?),
                false => None,
            };
            Ok(Described {
                schema,
                ordered,
                slices: pieces.filter(|p| p.count > 1).map(|p| Pieces {
                    count: p.count.min(max_slices),
                    ..p
                }),
            })
        })
        .await
    }

    /// Plans `sql` once to learn its result schema and parameter types, as a prepared
    /// statement needs them before any value is bound. Admitted like [`Self::schema`].
    pub async fn prepare(self: &Arc<Self>, sql: String, caller: &Caller) -> Result<Prepared> {
        let access = Arc::clone(&caller.tables);
        self.plan_admitted(caller.client_timeout, move |engine| async move {
            let df = engine
                .plan_statement(&sql, vec![], &access, Arc::default(), None, false)
                .await?
                .df;
            let params = params::parameter_types(df.logical_plan().get_parameter_types()?)?;
            Ok(Prepared {
                schema: Arc::clone(df.schema().inner()),
                params,
            })
        })
        .await
    }

    /// Runs `plan` on the CPU runtime once admitted, within the planning deadline. The
    /// deadline is kept here, on the caller's runtime, so it fires even when planning
    /// never yields; the slot goes with the planning task and is freed only once that
    /// task has really stopped.
    async fn plan_admitted<T, F, Fut>(
        self: &Arc<Self>,
        client_timeout: Option<Duration>,
        plan: F,
    ) -> Result<T>
    where
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let arrived = tokio::time::Instant::now();
        let mut deadline =
            Deadline::after(arrived, self.limits.planning_timeout, "--planning-timeout");
        if let Some(client) = client_timeout {
            deadline = deadline.earliest(Deadline::after(
                arrived,
                client,
                "the client's grpc-timeout",
            ));
        }
        self.check_capacity()?;
        let never = tokio_util::sync::CancellationToken::new();
        let admit = self.admission.admit(&never, &self.metrics.queued, || {});
        let slot = deadline.run("waiting for a query slot", admit).await?;
        let engine = Arc::clone(self);
        let task = self.cpu.spawn(async move {
            let _slot = slot;
            plan(engine).await
        });
        deadline
            .run("planning", async move {
                task.await
                    .map_err(|e| Error::Internal(format!("planning task failed: {e}")))?
            })
            .await
    }

    /// Admits, plans and starts a query on the CPU runtime. The stream must be polled on
    /// the CPU runtime too (see `flight::do_get`): DataFusion does its work inside `poll`.
    /// For callers that only collect the result (tests); `flight::do_get` uses
    /// [`Self::execute_then`], which keeps the work on the task that planned it.
    pub async fn execute(self: &Arc<Self>, request: impl Into<QueryRequest>) -> Result<Execution> {
        let (execution, _done) = self
            .execute_then(request, |execution, planned| async move {
                planned.ready(execution);
            })
            .await?;
        Ok(execution)
    }

    /// Admits a query, then plans it and runs `then` on one task of the CPU runtime: a
    /// query costs one hop to the CPU runtime and one back (when planned), not a round trip
    /// to plan and another to run. `then` gets the execution and hands the caller what
    /// it needs to start the response with [`Planned::ready`] (or fails it); this returns
    /// that, with the task's handle (dropping it aborts the query), once it is handed over.
    ///
    /// The query is listed (and cancellable) from the start; it waits for a slot within
    /// `--queue-timeout`, plans within `--planning-timeout`, and all of it within its
    /// deadline. Every way this fails is counted in `quiver_queries_total`.
    pub async fn execute_then<W, T, F, Fut>(
        self: &Arc<Self>,
        request: impl Into<QueryRequest>,
        then: F,
    ) -> Result<(W, AbortOnDropHandle<Option<T>>)>
    where
        W: Send + 'static,
        T: Send + 'static,
        F: FnOnce(Execution, Planned<W>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let request = request.into();
        let arrived = tokio::time::Instant::now();
        let mut deadline = Deadline::after(arrived, self.limits.query_timeout, "--query-timeout");
        if let Some(client) = request.caller.client_timeout {
            deadline = deadline.earliest(Deadline::after(
                arrived,
                client,
                "the client's grpc-timeout",
            ));
        }
        if let Some(limit) = request.ticket_timeout {
            deadline =
                deadline.earliest(Deadline::after(arrived, limit, "the ticket's timeout_ms"));
        }
        let id = request.id.unwrap_or_else(new_query_id);
        let audit = self.audit.as_ref().map(|log| {
            QueryAudit::new(Arc::clone(log), request.caller.origin.clone(), &request.sql)
        });
        let user = request.caller.user().map(str::to_string);
        let active = Arc::new(ActiveQuery::new(id, user, &request.sql));
        let mut query = RunningQuery::start(
            self.metrics.clone(),
            Arc::clone(&active),
            Arc::clone(&self.active),
            audit,
        )?;
        // Listed first, so that a refusal is counted and audited like any other end.
        if let Err(e) = self.check_capacity() {
            query.finish(self.outcome_of(&active, &e));
            return Err(e);
        }
        let cancel = active.cancelled().clone();

        // Admission, on this runtime: waiting needs no CPU.
        let admit = self.admission.admit(&cancel, &self.metrics.queued, || {
            active.set_state(QueryState::Queued)
        });
        let admitted = tokio::select! {
            slot = deadline.run("waiting for a query slot", admit) => slot,
            () = cancel.cancelled() => Err(active.cancel_error()),
        };
        match admitted {
            Ok(slot) => query.admitted(slot),
            Err(e) => {
                query.finish(self.outcome_of(&active, &e));
                return Err(e);
            }
        }
        active.set_state(QueryState::Planning);

        // Planning, then `then`, on the CPU runtime. The task owns the query (its listing
        // and slot) throughout, so neither is released while planning still runs; the
        // planning deadline and cancellation are watched from here, so they fire even if
        // planning never yields, and the abort takes effect at its next yield.
        let planning = deadline.clone().earliest(Deadline::after(
            tokio::time::Instant::now(),
            self.limits.planning_timeout,
            "--planning-timeout",
        ));
        let engine = Arc::clone(self);
        let (sql, params, access) = (request.sql, request.params, request.caller.tables);
        let (distribution, slice) = (request.distribution, request.slice);
        let use_cache = !request.no_result_cache;
        let (handed, handed_over) = tokio::sync::oneshot::channel();
        let mut task = self.cpu.spawn(async move {
            let started = engine
                .start(
                    sql,
                    params,
                    &access,
                    (distribution, slice, use_cache),
                    &query,
                )
                .await;
            match started {
                Ok((stream, report)) => {
                    query.planned();
                    query.active().set_state(QueryState::Running);
                    let execution = Execution {
                        stream,
                        report,
                        query,
                        deadline,
                    };
                    Some(then(execution, Planned(handed)).await)
                }
                Err(e) => {
                    query.finish(engine.outcome_of(query.active(), &e));
                    let _ = handed.send(Err(e));
                    None
                }
            }
        });
        let planned = tokio::select! {
            planned = planning.run("planning", async {
                match handed_over.await {
                    Ok(handed) => handed,
                    // Nothing handed over: the task panicked (or `then` dropped `Planned`).
                    Err(_) => Err(Error::Internal(match (&mut task).await {
                        Err(join) => format!("the query task failed while planning: {join}"),
                        Ok(_) => "the query task ended before the query was planned".into(),
                    })),
                }
            }) => planned,
            () = cancel.cancelled() => Err(active.cancel_error()),
        };
        match planned {
            Ok(handed) => Ok((handed, task)),
            Err(e) => {
                // The task may still be unwinding: it records this outcome when it drops.
                active.set_outcome(self.outcome_of(&active, &e));
                Err(e)
            }
        }
    }

    /// Runs the process memory guard (`query::heap_guard`) until dropped: `allocated`
    /// reads the allocator's allocated bytes, checked every `every` against `limit`.
    pub async fn guard_memory(&self, allocated: AllocatedBytes, limit: usize, every: Duration) {
        self.heap.watch(allocated, limit, every, &self.active).await;
    }

    /// The memory guard's state.
    pub fn heap_guard(&self) -> &Arc<HeapGuard> {
        &self.heap
    }

    /// Refuses new work while the CPU runtime makes no progress (it would only queue
    /// behind work that does not yield) or the process is over its memory hard limit.
    fn check_capacity(&self) -> Result<()> {
        self.heap.check()?;
        let progress = self.cpu.progress();
        if progress.stalled() {
            return Err(Error::Overloaded {
                reason: format!(
                    "every query thread has been busy without yielding for {} \
                     (quiver_cpu_runtime_stalled)",
                    humantime::format_duration(Duration::from_secs(
                        progress.probe_wait().as_secs()
                    ))
                ),
            });
        }
        Ok(())
    }

    /// How a query that failed with `e` ended (also recorded as its error code).
    fn outcome_of(&self, active: &ActiveQuery, e: &Error) -> Outcome {
        if active.cancelled().is_cancelled() {
            active.set_code(active.cancel_error().code());
            Outcome::Cancelled
        } else {
            active.set_code(e.code());
            e.outcome()
        }
    }

    /// The audit log, if one is kept.
    pub fn audit(&self) -> Option<&Arc<AuditLog>> {
        self.audit.as_ref()
    }

    /// Plans and starts `sql`; runs on the CPU runtime.
    async fn start(
        self: &Arc<Self>,
        sql: String,
        params: Vec<ScalarValue>,
        access: &TableAccess,
        (distribution, slice, use_cache): (Option<Distribution>, Option<Slice>, bool),
        query: &RunningQuery,
    ) -> Result<(SendableRecordBatchStream, ScanReport)> {
        // A slice is one node's part of a result split over endpoints: run it here.
        let distribution = match slice {
            Some(_) => Some(Distribution::Off),
            None => distribution,
        };
        let (reserved, peak) = query.active().memory();
        let (reserved, peak) = (Arc::clone(reserved), Arc::clone(peak));
        let pruning = Arc::new(PartitionPruning::default());
        // A slice is part of an answer: the cache keeps whole ones.
        let cache = self
            .result_cache
            .as_ref()
            .filter(|_| use_cache && slice.is_none());
        let cache_params = cache.map(|_| params.clone());
        let statement = self
            .plan_statement(
                &sql,
                params,
                access,
                Arc::clone(&pruning),
                distribution,
                slice.is_some(),
            )
            .await?;
        let df = &statement.df;
        if self.audit.is_some() {
            query
                .active()
                .set_tables(access::tables_read(df.logical_plan()));
        }
        // Planned for this caller first: a table they may not read has failed planning.
        let cache_key =
            cache_params.and_then(|params| result_cache::Key::of(&sql, &params, df.logical_plan()));
        if let (Some(cache), Some(key)) = (cache, &cache_key)
            && let Some(answer) = cache.get(key)
        {
            let scanned_nothing = Arc::new(EmptyExec::new(answer.schema()));
            let report = ScanReport::new(
                scanned_nothing,
                pruning,
                Arc::clone(&self.scan_totals),
                &sql,
            );
            return Ok((answer.stream(), report));
        }
        let task = df.task_ctx();
        // The query's own view of the shared pool counts what it holds.
        let runtime = task.runtime_env();
        let runtime = Arc::new(RuntimeEnv {
            memory_pool: Arc::new(QueryPool::new(
                Arc::clone(&runtime.memory_pool),
                reserved,
                peak,
            )),
            disk_manager: Arc::clone(&runtime.disk_manager),
            cache_manager: Arc::clone(&runtime.cache_manager),
            object_store_registry: Arc::clone(&runtime.object_store_registry),
        });
        let task = Arc::new(task.with_runtime(runtime));
        let explains = matches!(
            df.logical_plan(),
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_)
        );
        let distributed = self
            .planners
            .as_ref()
            .is_some_and(|p| p.distributes(distribution));
        let explained = match distributed {
            true => distributed::explain(&df.clone().into_parts().0, df.logical_plan()).await?,
            false => None,
        };
        let mut plan: Arc<dyn ExecutionPlan> = match explained {
            Some(plan) => plan,
            None => self.physical_plan(statement, &pruning).await?,
        };
        if let Some(slice) = slice {
            plan = slice::restrict(plan, slice)?;
        }
        for table in pruning.tables() {
            self.metrics.table_scans.with_label_values(&[&table]).inc();
        }
        let mut stream = execute_stream(Arc::clone(&plan), task)?;
        if explains {
            stream = explain::RelativePaths::new(self.catalog.roots()).wrap(stream);
        }
        if let (Some(cache), Some(key)) = (cache, cache_key) {
            stream = cache.collect(key, stream);
        }
        let report = ScanReport::new(plan, pruning, Arc::clone(&self.scan_totals), &sql);
        Ok((stream, report))
    }
}

/// `state` made a query's own: restricted to the tables of `access`, with the query's
/// partition pruning report, and without the row group cache for a slice.
fn query_state(
    mut state: SessionState,
    access: &TableAccess,
    pruning: Arc<PartitionPruning>,
    sliced: bool,
) -> Result<SessionState> {
    access.restrict(&mut state)?;
    state.config_mut().set_extension(pruning);
    if sliced {
        state
            .config_mut()
            .set_extension(Arc::new(RowGroupCaching(None)));
    }
    Ok(state)
}

/// A statement planned for one caller.
struct PlannedStatement {
    df: DataFrame,
    /// Its kept plan, when the plan cache held it.
    kept: Option<Arc<plan_cache::Planned>>,
    /// Its key in the plan cache, to keep its plan under once optimized (`None`: not to
    /// be kept, or already kept).
    keep: Option<plan_cache::Key>,
}

/// Whether `plan` returns its rows in an order the statement asks for.
fn is_ordered(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Sort(_) => true,
        LogicalPlan::Projection(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Filter(_) => plan.inputs().first().is_some_and(|p| is_ordered(p)),
        _ => false,
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
        // Filters evaluated while decoding (`--filter-pushdown`, see `pushdown`): rows
        // that fail are never materialised, cheapest and most selective filters first.
        (
            "datafusion.execution.parquet.pushdown_filters",
            if options.filter_pushdown.session_default() {
                "true"
            } else {
                "false"
            },
        ),
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
