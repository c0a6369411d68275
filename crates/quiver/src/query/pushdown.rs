//! Which filters run inside the Parquet decoder (`--filter-pushdown`).
//!
//! A filter evaluated inside the decoder (a `RowFilter`: late materialisation) decodes
//! the filter's columns first and the others only for the rows that pass. It wins when
//! few rows pass *and* they are clustered, so whole pages of the other columns are
//! skipped; it loses when the filter is cheap after decoding, passes many rows, or passes
//! rows scattered over every page (TPC-H Q6, Q9, Q12, Q15 ran 1.2-1.9x slower than
//! DataFusion's defaults with every filter pushed, docs/benchmarks.md). The filters that
//! win most are the runtime filters joins and TopK build (Q17, Q18, Q21 ran 1.3-1.8x
//! slower without them in the decoder): a join's build-side keys drop most probe rows.
//!
//! So by default (`runtime`) a scan evaluates its query's own filters after decoding
//! (they still prune files, row groups and pages by statistics, bloom filters and the
//! page index), and a scan filtered only by runtime filters evaluates them in the
//! decoder. `all` pushes every filter (Quiver's earlier default), `none` none.
//!
//! The choice is made per scan, after DataFusion's own filter pushdown has placed the
//! runtime filters; turning the decoder's filtering on for a scan is always correct: the
//! operators above still apply every filter it evaluates (the query's filters stay in
//! their `FilterExec`, a join re-checks its keys).

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_expr::utils::split_conjunction;
use datafusion::physical_expr::{DynamicFilterTracking, PhysicalExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_datasource::file::FileSource;
use datafusion_datasource::file_scan_config::FileScanConfigBuilder;
use datafusion_datasource::source::DataSourceExec;
use datafusion_datasource_parquet::source::ParquetSource;

/// Which filters a Parquet scan evaluates while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilterPushdown {
    /// Runtime filters (from joins and TopK) of the scans no other filter of the query
    /// reads; every other filter after decoding.
    #[default]
    Runtime,
    /// Every filter.
    All,
    /// None: every filter after decoding (still used to prune by statistics).
    None,
}

impl FilterPushdown {
    /// DataFusion's `pushdown_filters` for this choice (`Runtime` turns it on per scan).
    pub(crate) fn session_default(self) -> bool {
        self == Self::All
    }
}

/// Whether every conjunct of `filter` is a runtime filter. A scan whose query also
/// filters it keeps that filter in its `FilterExec` above; pushing the scan's filters
/// would evaluate that one twice (an expensive `LIKE` doubled cost TPC-H Q13 1.6x).
fn only_runtime(filter: &Arc<dyn PhysicalExpr>) -> bool {
    split_conjunction(filter)
        .into_iter()
        .all(|conjunct| DynamicFilterTracking::classify(conjunct).contains_dynamic_filter())
}

/// Turns the decoder's filtering on for the Parquet scans that receive a runtime filter;
/// installed for [`FilterPushdown::Runtime`], runs after DataFusion's rules.
#[derive(Debug, Default)]
pub(crate) struct PushRuntimeFilters;

impl PhysicalOptimizerRule for PushRuntimeFilters {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // `--datafusion-config datafusion.execution.parquet.pushdown_filters=true`:
        // every scan already filters while decoding.
        if config.execution.parquet.pushdown_filters {
            return Ok(plan);
        }
        plan.transform_up(|node| {
            let Some(exec) = node.downcast_ref::<DataSourceExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some((scan, source)) = exec.downcast_to_file_source::<ParquetSource>() else {
                return Ok(Transformed::no(node));
            };
            let runtime_filtered = source.filter().is_some_and(|filter| only_runtime(&filter));
            if !runtime_filtered || source.table_parquet_options().global.pushdown_filters {
                return Ok(Transformed::no(node));
            }
            let source = source.clone().with_pushdown_filters(true);
            let scan = FileScanConfigBuilder::from(scan.clone())
                .with_source(Arc::new(source))
                .build();
            let node: Arc<dyn ExecutionPlan> = DataSourceExec::from_data_source(scan);
            Ok(Transformed::yes(node))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "PushRuntimeFilters"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
