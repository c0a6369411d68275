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
//! What is kept is the logical plan (with parameters bound) and its optimized form; the
//! physical plan is made for each query, since its scans report to that query (pruning,
//! metrics) and read that query's filters. Plans made for the cluster are not kept.
//!
//! Bounds: a plan is weighed in units of about 100 bytes: one per schema field and per
//! expression node of the plan and of its optimized form, and one per 64 bytes of
//! statement and parameters. The cache holds `--plan-cache-entries` times [`UNITS_PER_ENTRY`]
//! units (moka's TinyLFU admission and LRU eviction by weight), a plan over
//! [`MAX_UNITS`] or a statement over [`MAX_KEY_BYTES`] is never kept. At the default 256
//! entries that is at most about 65536 units (a few MiB outside the query pool) however
//! clients use it: many small statements, or a few over tables of a thousand columns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::LogicalPlan;

use super::access::TableAccess;
use super::result_cache;
use crate::catalog::Catalog;

/// The longest statement (text plus parameters) whose plan is kept.
pub(crate) const MAX_KEY_BYTES: usize = 4096;

/// Units of weight the cache holds per `--plan-cache-entries` (a small query's plan,
/// `SELECT *` filtered over a table of 16 columns, weighs about 120).
pub(crate) const UNITS_PER_ENTRY: u64 = 256;

/// The heaviest plan kept.
pub(crate) const MAX_UNITS: usize = 4096;

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

    /// Keeps `plan` (the statement `key`, optimized as `optimized`), if it may be kept;
    /// counts a miss when it is (a statement that is never kept is neither).
    pub(crate) fn insert(&self, key: Key, plan: LogicalPlan, optimized: LogicalPlan) {
        let Some(answer) = result_cache::Key::of(&key.sql, &[], &plan) else {
            return;
        };
        let units = 1
            + (key.sql.len() + key.params.len() + key.access.len()) / 64
            + units(&plan)
            + units(&optimized);
        if units > MAX_UNITS {
            return;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let tables = answer.tables().to_vec();
        self.plans.insert(
            key,
            Arc::new(Planned {
                plan,
                optimized,
                tables,
                units,
            }),
        );
    }

    /// (hits, misses) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Plans kept now.
    pub(crate) fn entries(&self) -> u64 {
        self.plans.run_pending_tasks();
        self.plans.entry_count()
    }
}
