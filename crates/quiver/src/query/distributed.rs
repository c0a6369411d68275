//! Planning a query across nodes, on datafusion-distributed.
//!
//! A node that knows workers (`--workers`) plans with a second session state: the same
//! catalog, runtime and settings, plus datafusion-distributed's planner, which cuts the
//! physical plan into stages joined by network shuffles and merges and runs each stage's
//! tasks on the workers (`cluster` holds the worker side). Which state a query plans with
//! is its [`Distribution`]: `off` plans exactly as a single node does; `auto` lets the
//! planner give a scan one task per `bytes_per_task` of files (so small scans stay on this
//! node); `on` spreads every scan over all workers.

use std::fmt::{self, Display};
use std::str::FromStr;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::ipc::CompressionType;
use datafusion::execution::SessionState;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::{ExecutionPlan, displayable};
use datafusion_datasource::memory::MemorySourceConfig;
use datafusion_distributed::{
    ChannelResolver, DistributedExec, DistributedExt, SessionStateBuilderExt, WorkerResolver,
    display_plan_ascii,
};

use crate::catalog::RowGroupCaching;
use crate::error::{Error, Result};

/// Whether a query is spread over the cluster's workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Distribution {
    /// When workers are known and the scan is big enough to pay for the network.
    #[default]
    Auto,
    /// Every scan is spread over all workers.
    On,
    /// Planned and run on this node alone.
    Off,
}

impl FromStr for Distribution {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown distribution '{other}': use auto, on or off"
            )),
        }
    }
}

impl Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// How this node plans across the cluster (`QueryOptions::cluster`).
#[derive(Clone)]
pub struct ClusterPlanning {
    /// The workers a stage's tasks may run on.
    pub workers: Arc<dyn WorkerResolver>,
    /// Connections to them (authenticated).
    pub channels: Arc<dyn ChannelResolver + Send + Sync>,
    /// The default for queries that do not choose.
    pub distribution: Distribution,
    /// In `auto`, the bytes of files each scan task should read.
    pub bytes_per_task: usize,
    /// Where clients reach the nodes, for slices of split results; `None`: slices stay
    /// on this node.
    pub locations: Option<Arc<dyn NodeLocations>>,
    /// Compression of the Arrow batches sent between nodes.
    pub compression: Option<CompressionType>,
    /// Whether a join whose build side is small sends that side whole to every task of
    /// the probe side (instead of shuffling both sides by key).
    pub broadcast_joins: bool,
}

/// Where clients reach the cluster's nodes' Flight ports: a result split over endpoints
/// (`--endpoints-per-query`) has its slices located at them in turn.
pub trait NodeLocations: Send + Sync {
    /// This node's Flight URL first (`None`: the client's own connection), then those
    /// of the workers that answered the last probe.
    fn flight_urls(&self) -> Vec<Option<String>>;
}

impl fmt::Debug for ClusterPlanning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterPlanning")
            .field("distribution", &self.distribution)
            .field("bytes_per_task", &self.bytes_per_task)
            .field("compression", &self.compression)
            .field("broadcast_joins", &self.broadcast_joins)
            .finish_non_exhaustive()
    }
}

/// The session states a query may plan with.
pub(super) struct Planners {
    /// `auto`: the planner sizes stages from the bytes scanned.
    auto: SessionState,
    /// `on`: every scan over all workers.
    on: SessionState,
    default: Distribution,
    workers: Arc<dyn WorkerResolver>,
    locations: Option<Arc<dyn NodeLocations>>,
}

impl fmt::Debug for Planners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Planners")
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl Planners {
    /// States cloned from `base` (which already has the catalog), with the distributed
    /// planner.
    pub(super) fn new(base: &SessionState, cluster: &ClusterPlanning) -> Result<Self> {
        let state = |bytes_per_task: usize| -> Result<SessionState> {
            let builder = SessionStateBuilder::new_from_existing(base.clone())
                .with_distributed_planner()
                .with_distributed_worker_resolver(SharedWorkers(Arc::clone(&cluster.workers)))
                .with_distributed_channel_resolver(Arc::clone(&cluster.channels))
                .with_distributed_file_scan_config_bytes_per_partition(bytes_per_task.max(1))
                .and_then(|b| b.with_distributed_compression(cluster.compression))
                .and_then(|b| b.with_distributed_broadcast_joins(cluster.broadcast_joins))
                .map_err(Error::from)?;
            let mut state = builder.build();
            // With one target partition DataFusion plans single-step aggregates (no partial
            // and final halves), and datafusion-distributed 4.0 still splits their input
            // over tasks: each task then answers for its share alone (wrong results, e.g.
            // TPC-H Q11 and Q15 with --cpu-threads 1). Two partitions make DataFusion plan
            // the halves the distributed planner splits at.
            let execution = &mut state.config_mut().options_mut().execution;
            execution.target_partitions = execution.target_partitions.max(2);
            // Plans for workers scan their files: a worker reads its share itself, and
            // rows from this node's row group cache would travel inside the plan.
            state
                .config_mut()
                .set_extension(Arc::new(RowGroupCaching(None)));
            Ok(state)
        };
        Ok(Self {
            auto: state(cluster.bytes_per_task)?,
            on: state(1)?,
            default: cluster.distribution,
            workers: Arc::clone(&cluster.workers),
            locations: cluster.locations.clone(),
        })
    }

    /// Where each slice of a split result is served, in turn; empty: here.
    pub(super) fn slice_locations(&self) -> Vec<Option<String>> {
        self.locations
            .as_ref()
            .map(|l| l.flight_urls())
            .unwrap_or_default()
    }

    /// The state to plan with, for `requested` (or the server's default); `None`: the
    /// single-node state (also while no worker answers).
    pub(super) fn state(&self, requested: Option<Distribution>) -> Option<SessionState> {
        if !self.distributes(requested) {
            return None;
        }
        let state = match requested.unwrap_or(self.default) {
            Distribution::On => self.on.clone(),
            _ => self.auto.clone(),
        };
        Some(state)
    }

    /// Whether a query asking for `requested` is planned across the cluster.
    pub(super) fn distributes(&self, requested: Option<Distribution>) -> bool {
        requested.unwrap_or(self.default) != Distribution::Off
            && self.workers.get_urls().is_ok_and(|urls| !urls.is_empty())
    }
}

/// One worker list shared by both states.
struct SharedWorkers(Arc<dyn WorkerResolver>);

impl WorkerResolver for SharedWorkers {
    fn get_urls(&self) -> datafusion::error::Result<Vec<url::Url>> {
        self.0.get_urls()
    }
}

/// `EXPLAIN` of a query the cluster would run: DataFusion plans an `EXPLAIN`'s input with
/// its own physical planner, not the session's query planner, so it would show the
/// single-node plan. This plans the input as the query would be planned, and answers
/// with the logical plan and the distributed plan drawn with its stages. `None` for
/// anything but a plain `EXPLAIN` (`EXPLAIN ANALYZE` runs the query: datafusion-distributed
/// draws its stages itself).
pub(super) async fn explain(
    state: &SessionState,
    plan: &LogicalPlan,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let LogicalPlan::Explain(explain) = plan else {
        return Ok(None);
    };
    let physical = state.create_physical_plan(&explain.plan).await?;
    let drawn = if physical.is::<DistributedExec>() {
        display_plan_ascii(physical.as_ref(), false)
    } else {
        displayable(physical.as_ref()).indent(true).to_string()
    };
    let schema = Arc::clone(explain.schema.inner());
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(vec!["logical_plan", "physical_plan"])),
            Arc::new(StringArray::from(vec![
                explain.plan.display_indent().to_string(),
                drawn,
            ])),
        ],
    )?;
    Ok(Some(MemorySourceConfig::try_new_exec(
        &[vec![batch]],
        schema,
        None,
    )?))
}
