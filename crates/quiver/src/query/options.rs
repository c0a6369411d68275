//! How the engine is set up: threads, memory, admission, time limits, statement limits.

use std::sync::Arc;
use std::time::Duration;

use super::admission::AdmissionOptions;
use super::distributed::ClusterPlanning;
use super::limits::{DEFAULT_STACK_SIZE, SqlLimits};
use crate::audit::AuditLog;
use crate::catalog::RowGroupAdmission;
use crate::io::IoOptions;
use crate::io::remote::RemoteStores;
use crate::wire::views::ViewTypes;

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
    /// How many queries run and wait at once.
    pub admission: AdmissionOptions,
    /// Time limits.
    pub limits: QueryLimits,
    /// Largest record batch message the send path writes (`--max-flight-data-size`):
    /// pinned tables are held in batches no larger, each sent as the message laid out
    /// with it.
    pub max_message_size: usize,
    /// How string and binary views are sent (`--view-types`).
    pub view_types: ViewTypes,
    /// Bounds on the statements clients send.
    pub sql: SqlLimits,
    /// Stack of each thread that plans or runs queries (`--query-stack-size`).
    pub stack_size: usize,
    /// Most bytes one call of a function that can amplify its input (`repeat`, `lpad`,
    /// `range`, `||`, ...) may produce (`--max-function-output`).
    pub max_function_output: usize,
    /// Where each query's audit line goes (`--audit-log`); `None`: nowhere.
    pub audit: Option<Arc<AuditLog>>,
    /// The object stores and cache of S3 tables; `None` when no table is on S3.
    pub remote: Option<Arc<RemoteStores>>,
    /// How queries are spread over other nodes; `None`: this node alone.
    pub cluster: Option<ClusterPlanning>,
    /// Most `FlightEndpoint`s one query's result is split over (`--endpoints-per-query`).
    pub endpoints_per_query: usize,
    /// Bytes of query answers the result cache keeps (`--result-cache-size`); 0: no cache.
    pub result_cache_size: usize,
    /// Bytes of decoded row groups of local files kept (`--row-group-cache-size`); 0: none.
    pub row_group_cache_size: u64,
    /// Which scans fill and use the row group cache (`--row-group-cache-admit`).
    pub row_group_cache_admission: RowGroupAdmission,
    /// Which filters Parquet scans evaluate while decoding (`--filter-pushdown`).
    pub filter_pushdown: super::FilterPushdown,
    /// Plans of repeated statements kept (`--plan-cache-entries`); 0: none.
    pub plan_cache_entries: u64,
}

/// Time limits on a query; zero turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// The whole query, from arrival to the last message, unless the client's
    /// `grpc-timeout` is shorter.
    pub query_timeout: Duration,
    /// Parsing and planning.
    pub planning_timeout: Duration,
    /// From arrival to the first record batch sent.
    pub first_batch_timeout: Duration,
    /// Longest a stream may wait for its client to read the next message.
    pub stream_idle_timeout: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            query_timeout: Duration::from_secs(3600),
            planning_timeout: Duration::from_secs(30),
            first_batch_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(300),
        }
    }
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

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            cpu_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            datafusion_config: vec![],
            io: IoOptions::default(),
            memory: MemoryOptions::default(),
            admission: AdmissionOptions::default(),
            limits: QueryLimits::default(),
            max_message_size: 2 * 1024 * 1024,
            view_types: ViewTypes::default(),
            sql: SqlLimits::default(),
            stack_size: DEFAULT_STACK_SIZE,
            max_function_output: DEFAULT_MAX_FUNCTION_OUTPUT,
            audit: None,
            remote: None,
            cluster: None,
            endpoints_per_query: 1,
            result_cache_size: 0,
            row_group_cache_size: 0,
            row_group_cache_admission: RowGroupAdmission::default(),
            filter_pushdown: super::FilterPushdown::default(),
            plan_cache_entries: DEFAULT_PLAN_CACHE_ENTRIES,
        }
    }
}

/// Default of `--plan-cache-entries`.
pub const DEFAULT_PLAN_CACHE_ENTRIES: u64 = 256;

/// Default of `--max-function-output`.
pub const DEFAULT_MAX_FUNCTION_OUTPUT: usize = 256 * 1024 * 1024;
