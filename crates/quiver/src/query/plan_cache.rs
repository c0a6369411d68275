//! Plans of repeated statements (`--plan-cache-entries`), reused while the tables they
//! read keep their version.
//!
//! A small query costs more to plan than to run: in the key-range workload (100 clients,
//! ~1 MB each from a pinned table) turning the statement into a plan took 7% of the
//! server's CPU and DataFusion's logical optimizer 9.7%; keeping the plans took a stream
//! from 1.50 to 1.00 ms of CPU (docs/benchmarks.md). Dashboards and drivers send the same statements again and again
//! (a Flight SQL client plans each one twice: `GetFlightInfo`, then `DoGet`).
//!
//! A statement's optimized logical plan is fixed by its text, its parameters, the tables
//! its caller may read and the versions of the tables it reads; every setting is a
//! process flag. So the engine keeps the plans of recent statements under those keys,
//! on the result cache's conditions (`result_cache::Key::of`: a query over the catalog's
//! tables, with no function whose value is not fixed by its arguments, so no `now()`
//! folded into a constant). A plan whose tables have a new version is planned again.
//! What is kept is the logical plan (with parameters bound) and its optimized form. Plans
//! made for the cluster are not kept.
//!
//! The physical plan is made again for each query (its scans read that query's files and
//! report to it), except where every scan reads a pinned table ([`KeptPhysical`]): a
//! small query over a pinned table spent 15% of the server's CPU in DataFusion's physical
//! planner and optimizer rules (docs/benchmarks.md), for a plan that is the same each
//! time. That plan is kept with what its scans recorded, and each query runs its own
//! copy: `reset_plan_states`, DataFusion's way to run a plan again (fresh metrics and
//! execution state in every node), and the scans' records replayed into its report.
//!
//! Bounds: a plan is weighed in units of about 100 bytes: one per schema field and per
//! expression node of the plan and of its optimized form, and one per 64 bytes of
//! statement and parameters. The cache holds `--plan-cache-entries` times [`UNITS_PER_ENTRY`]
//! units (moka's TinyLFU admission and LRU eviction by weight), a plan over
//! [`MAX_UNITS`] or a statement over [`MAX_KEY_BYTES`] is never kept. At the default 256
//! entries that is at most about 65536 units (a few MiB outside the query pool) however
//! clients use it: many small statements, or a few over tables of a thousand columns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::expressions::DynamicFilterPhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;

use super::access::TableAccess;
use super::result_cache;
use crate::catalog::{Catalog, PartitionPruning, PinnedScans, memory_source};

/// The longest statement (text plus parameters) whose plan is kept.
pub(crate) const MAX_KEY_BYTES: usize = 4096;

/// Units of weight the cache holds per `--plan-cache-entries` (a small query's plan,
/// `SELECT *` filtered over a table of 16 columns, weighs about 120).
pub(crate) const UNITS_PER_ENTRY: u64 = 256;

/// The heaviest plan kept.
pub(crate) const MAX_UNITS: usize = 4096;

/// The most arrays (columns of batches of a pinned table, most shared with the table, a
/// few sliced) a kept physical plan holds, at 8 to ~150 bytes each: it is kept for small
/// queries, whose planning weighs against their work, and stays small beside the plan.
pub(crate) const MAX_KEPT_ARRAYS: usize = 1024;

/// The operators of a physical plan kept to run again: those DataFusion makes of a
/// filtered, projected, aggregated, sorted or limited scan, all of which start afresh
/// from `reset_plan_states` (fresh metrics and execution state). Joins, and any node
/// whose state outlives a run (a dynamic filter, see [`KeptPhysical::of`]), are planned
/// for every query.
const RERUNNABLE: [&str; 15] = [
    "DataSourceExec",
    "FilterExec",
    "ProjectionExec",
    "CoalesceBatchesExec",
    "CoalescePartitionsExec",
    "RepartitionExec",
    "AggregateExec",
    "SortExec",
    "SortPreservingMergeExec",
    "GlobalLimitExec",
    "LocalLimitExec",
    "CooperativeExec",
    "EmptyExec",
    "PlaceholderRowExec",
    "UnionExec",
];

/// What fixes a plan, besides its tables' versions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    sql: String,
    /// The parameters, typed (`Int64(5)` and `Utf8("5")` differ).
    params: String,
    /// The tables the caller may read.
    access: String,
}

impl Key {
    /// The key of `sql` with `params` for a caller with `access`; `None` when the
    /// statement is too long to keep.
    pub(crate) fn new(sql: &str, params: &[ScalarValue], access: &TableAccess) -> Option<Self> {
        if sql.len() > MAX_KEY_BYTES {
            return None;
        }
        let params = format!("{params:?}");
        if sql.len() + params.len() > MAX_KEY_BYTES {
            return None;
        }
        Some(Self {
            sql: sql.to_string(),
            params,
            access: access.fingerprint(),
        })
    }
}

/// A kept plan.
#[derive(Debug)]
pub(crate) struct Planned {
    /// As planned for the caller, parameters bound (what the result cache and the audit
    /// log read).
    pub(crate) plan: LogicalPlan,
    /// After DataFusion's analyzer and optimizer.
    pub(crate) optimized: LogicalPlan,
    /// (table, version) of every table it reads.
    tables: Vec<(String, u64)>,
    /// Its weight in units (see the module documentation).
    units: usize,
    /// Its physical plan, once planned, if it may run again (`None`: it may not).
    physical: OnceLock<Option<KeptPhysical>>,
}

/// A physical plan kept to run again: every scan in it reads a pinned table (whose rows
/// are fixed by the table's version, as the plan is), it holds at most
/// [`MAX_KEPT_ARRAYS`] arrays, and it is made of [`RERUNNABLE`] operators with no
/// dynamic filter (state a run leaves behind in expressions shared between nodes).
#[derive(Debug)]
pub(crate) struct KeptPhysical {
    plan: Arc<dyn ExecutionPlan>,
    /// What its scans recorded when it was planned.
    scans: PinnedScans,
}

impl KeptPhysical {
    /// `plan`, kept if it may run again; `pruning` is what its planning recorded.
    fn of(plan: &Arc<dyn ExecutionPlan>, pruning: &PartitionPruning) -> Option<Self> {
        let scans = pruning.pinned_scans()?;
        let mut arrays = 0;
        let mut rerunnable = true;
        // The closures never fail.
        let _ = plan.apply(|node| {
            let memory = memory_source(node.as_ref());
            if let Some(memory) = memory {
                let batches = memory.partitions().iter().flatten();
                arrays += batches.map(RecordBatch::num_columns).sum::<usize>();
            }
            // Its scans read batches in memory (no file scan, whose data source keeps
            // metrics and work between runs).
            rerunnable &= RERUNNABLE.contains(&node.name())
                && (node.name() != "DataSourceExec" || memory.is_some());
            let _ = node.apply_expressions(&mut |expr| {
                expr.apply(|e| {
                    rerunnable &= e.downcast_ref::<DynamicFilterPhysicalExpr>().is_none();
                    Ok(TreeNodeRecursion::Continue)
                })
            });
            Ok(if rerunnable && arrays <= MAX_KEPT_ARRAYS {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        });
        (rerunnable && arrays <= MAX_KEPT_ARRAYS).then(|| Self {
            plan: Arc::clone(plan),
            scans,
        })
    }

    /// A copy to run for a query whose scans report to `pruning`.
    fn rerun(&self, pruning: &PartitionPruning) -> Result<Arc<dyn ExecutionPlan>> {
        pruning.record_pinned(&self.scans);
        reset_plan_states(Arc::clone(&self.plan))
    }
}

/// Schema fields and expression nodes of `plan`, its subqueries included.
fn units(plan: &LogicalPlan) -> usize {
    let mut units = 0;
    // The closures never fail.
    let _ = plan.apply_with_subqueries(|node| {
        units += node.schema().fields().len();
        let _ = node.apply_expressions(|expr| {
            expr.apply(|_| {
                units += 1;
                Ok(TreeNodeRecursion::Continue)
            })
        });
        Ok(TreeNodeRecursion::Continue)
    });
    units
}

impl Planned {
    /// Whether every table it reads still has the version it was planned with.
    fn is_current(&self, catalog: &Catalog) -> bool {
        self.tables
            .iter()
            .all(|(table, version)| catalog.get(table).is_some_and(|t| t.version() == *version))
    }
}

/// The plans kept.
#[derive(Debug)]
pub(crate) struct PlanCache {
    plans: moka::sync::Cache<Key, Arc<Planned>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Hits run from a kept physical plan.
    physical_hits: AtomicU64,
}

impl PlanCache {
    /// A cache with room for `entries` small plans ([`UNITS_PER_ENTRY`] units each).
    pub(crate) fn new(entries: u64) -> Self {
        Self {
            plans: moka::sync::Cache::builder()
                .max_capacity(entries.saturating_mul(UNITS_PER_ENTRY))
                .weigher(|_, planned: &Arc<Planned>| {
                    u32::try_from(planned.units).unwrap_or(u32::MAX)
                })
                .build(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            physical_hits: AtomicU64::new(0),
        }
    }

    /// The plan kept for `key`, if its tables are unchanged in `catalog`; counts a hit.
    pub(crate) fn get(&self, key: &Key, catalog: &Catalog) -> Option<Arc<Planned>> {
        let planned = self.plans.get(key)?;
        if !planned.is_current(catalog) {
            self.plans.invalidate(key);
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(planned)
    }

    /// A physical plan for a query of `planned` whose scans report to `pruning`, when one
    /// was kept (see [`KeptPhysical`]); counts a physical hit.
    pub(crate) fn physical(
        &self,
        planned: &Planned,
        pruning: &PartitionPruning,
    ) -> Option<Result<Arc<dyn ExecutionPlan>>> {
        let kept = planned.physical.get()?.as_ref()?;
        self.physical_hits.fetch_add(1, Ordering::Relaxed);
        Some(kept.rerun(pruning))
    }

    /// Keeps `plan`, the physical plan of `planned` whose planning recorded `pruning`, if
    /// it may run again (the first plan made wins).
    pub(crate) fn keep_physical(
        &self,
        planned: &Planned,
        plan: &Arc<dyn ExecutionPlan>,
        pruning: &PartitionPruning,
    ) {
        planned
            .physical
            .get_or_init(|| KeptPhysical::of(plan, pruning));
    }

    /// Keeps `plan` (the statement `key`, optimized as `optimized`), if it may be kept;
    /// counts a miss when it is (a statement that is never kept is neither). Returns the
    /// plan kept.
    pub(crate) fn insert(
        &self,
        key: Key,
        plan: LogicalPlan,
        optimized: LogicalPlan,
    ) -> Option<Arc<Planned>> {
        let answer = result_cache::Key::of(&key.sql, &[], &plan)?;
        let units = 1
            + (key.sql.len() + key.params.len() + key.access.len()) / 64
            + units(&plan)
            + units(&optimized);
        if units > MAX_UNITS {
            return None;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let tables = answer.tables().to_vec();
        let planned = Arc::new(Planned {
            plan,
            optimized,
            tables,
            units,
            physical: OnceLock::new(),
        });
        self.plans.insert(key, Arc::clone(&planned));
        Some(planned)
    }

    /// (hits, misses, physical hits) so far.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.physical_hits.load(Ordering::Relaxed),
        )
    }

    /// Plans kept now.
    pub(crate) fn entries(&self) -> u64 {
        self.plans.run_pending_tasks();
        self.plans.entry_count()
    }
}
