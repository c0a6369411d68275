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
//! decoder. The exception is a query filter that DataFusion's statistics estimate to pass
//! under [`SELECTIVE`] of the table's rows (a point lookup, a narrow key range): few rows
//! can be scattered over many pages only if the table has that many, and on TPC-H and the
//! events dataset such filters ran faster in the decoder (docs/benchmarks.md). Where the
//! decoder can evaluate every conjunct of such a filter (DataFusion's pushdown decides, as
//! under `all`), the `FilterExec` goes and the scan passes on only the columns read above
//! it; otherwise the `FilterExec` stays and re-checks the few rows that pass. A string equality gets no estimate from min/max (DataFusion gives it 20%); for
//! local files the catalog reads how many distinct values each column's dictionary pages
//! hold (`catalog::discover::dictionary_distinct_counts`), and an equality is then
//! estimated at `1 / distinct`: one of 300 user agents goes to the decoder, one of 40
//! countries does not. `all` pushes every filter (Quiver's earlier default), `none` none.
//!
//! A runtime filter in the decoder is [`Measured`] while the query runs: a join's filter
//! that passes many of the rows (TPC-H Q5, Q8, Q9: 5-30% of lineitem) costs a hash
//! lookup per row there and again in the join, so once it is seen to pass over 2% of
//! the rows it is no longer evaluated in the decoder (`query::measured`).
//!
//! The choice is made per scan, after DataFusion's own filter pushdown has placed the
//! runtime filters; turning the decoder's filtering on for a scan is always correct: the
//! operators above still apply every filter it evaluates (the query's filters stay in
//! their `FilterExec`, a join re-checks its keys).

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use datafusion::physical_expr::utils::{conjunction, split_conjunction};
use datafusion::physical_expr::{DynamicFilterTracking, PhysicalExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::replace_children_if_necessary;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::filter_pushdown::PushedDown;
use datafusion::physical_plan::projection::ProjectionExprs;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, StatisticsArgs, StatisticsContext};
use datafusion_datasource::file::FileSource;
use datafusion_datasource::file_scan_config::{FileScanConfig, FileScanConfigBuilder};
use datafusion_datasource::source::{DataSource, DataSourceExec};
use datafusion_datasource_parquet::source::ParquetSource;

use super::measured::Measured;

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

/// A query filter estimated to pass less than this fraction of a scan's rows runs in the
/// decoder under `runtime`. TPC-H Q6's filters, which lose 2x in the decoder, are
/// estimated at about 1.4%; a 10000-key range of 4M sorted keys at 0.25%.
const SELECTIVE: f64 = 0.005;

/// The fraction of its input's rows `filter` is estimated to pass: DataFusion's estimate
/// (interval analysis of the predicate over the table's min/max), or lower where the
/// filter's equalities of a column with a literal say so by the column's distinct values
/// (`1 / distinct` each; DataFusion's analysis gives a string equality its default 20%
/// whatever the column holds). `None` without row counts.
fn estimated_selectivity(filter: &FilterExec) -> Option<f64> {
    let statistics = StatisticsContext::new();
    let args = StatisticsArgs::new();
    let passed = statistics.compute(filter, &args).ok()?.num_rows;
    let input = statistics.compute(filter.input().as_ref(), &args).ok()?;
    let (passed, read) = (*passed.get_value()?, *input.num_rows.get_value()?);
    if read == 0 {
        return None;
    }
    let by_distinct: f64 = split_conjunction(filter.predicate())
        .into_iter()
        .filter_map(|conjunct| {
            let column = equality_column(conjunct)?;
            let distinct = *input
                .column_statistics
                .get(column)?
                .distinct_count
                .get_value()?;
            (distinct > 0).then(|| 1.0 / distinct as f64)
        })
        .product();
    Some((passed as f64 / read as f64).min(by_distinct))
}

/// The input column `conjunct` compares for equality with a literal.
fn equality_column(conjunct: &Arc<dyn PhysicalExpr>) -> Option<usize> {
    let binary = conjunct.downcast_ref::<BinaryExpr>()?;
    if *binary.op() != Operator::Eq {
        return None;
    }
    let column = |e: &Arc<dyn PhysicalExpr>| e.downcast_ref::<Column>().map(Column::index);
    let literal = |e: &Arc<dyn PhysicalExpr>| e.downcast_ref::<Literal>().is_some();
    match (column(binary.left()), column(binary.right())) {
        (Some(c), None) if literal(binary.right()) => Some(c),
        (None, Some(c)) if literal(binary.left()) => Some(c),
        _ => None,
    }
}

/// `plan` with its decoder's filtering on, if it is a Parquet scan that does not filter
/// while decoding yet, or a repartitioning of one (a scan of fewer files than threads).
fn with_decoder_filters(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    if plan.downcast_ref::<RepartitionExec>().is_some() {
        let [input] = plan.children()[..] else {
            return None;
        };
        let scan = with_decoder_filters(input)?;
        return replace_children_if_necessary(Arc::clone(plan), vec![scan]).ok();
    }
    let exec = plan.downcast_ref::<DataSourceExec>()?;
    let (scan, source) = exec.downcast_to_file_source::<ParquetSource>()?;
    let filter = source.filter()?;
    if source.table_parquet_options().global.pushdown_filters {
        return None;
    }
    let source = source
        .with_predicate(measured_runtime_filters(&filter))
        .with_pushdown_filters(true);
    let scan = FileScanConfigBuilder::from(scan.clone())
        .with_source(Arc::new(source))
        .build();
    Some(DataSourceExec::from_data_source(scan))
}

/// `filter` and its Parquet scan as one scan that evaluates every conjunct of the filter in
/// the decoder and passes on only the filter's columns, when the scan can evaluate all of
/// them there (DataFusion's own pushdown decides, as `--filter-pushdown all` does) and the
/// filter has no limit and its scan no runtime filter; `None` otherwise. Keeping the `FilterExec` above the scan made the
/// scan pass on the filter's columns for it to re-check: a wide string column decoded a
/// second time, or held in arrow-rs's predicate cache for every row read (events Q4, one of
/// 300 user agents: 1.20x `all`, docs/benchmarks.md).
/// A scan spread over the threads by a round-robin repartitioning stays spread.
fn into_decoder(
    filter: &FilterExec,
    config: &ConfigOptions,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    if filter.fetch().is_some() {
        return Ok(None);
    }
    let input = filter.input();
    let plan: Arc<dyn ExecutionPlan> = match input.downcast_ref::<RepartitionExec>() {
        Some(spread) => {
            let round_robin = matches!(spread.partitioning(), Partitioning::RoundRobinBatch(_));
            if !round_robin || spread.preserve_order() {
                return Ok(None);
            }
            let Some(scan) = scan_into_decoder(filter, spread.input(), config)? else {
                return Ok(None);
            };
            Arc::new(RepartitionExec::try_new(
                scan,
                spread.partitioning().clone(),
            )?)
        }
        None => match scan_into_decoder(filter, input, config)? {
            Some(scan) => scan,
            None => return Ok(None),
        },
    };
    // The plan's schema is its own (DataFusion checks it after the rule).
    Ok((plan.schema() == filter.schema()).then_some(plan))
}

/// [`into_decoder`] of `filter` over `scan` (its input, or its input's input).
fn scan_into_decoder(
    filter: &FilterExec,
    scan: &Arc<dyn ExecutionPlan>,
    config: &ConfigOptions,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let Some(exec) = scan.downcast_ref::<DataSourceExec>() else {
        return Ok(None);
    };
    let Some((scan, source)) = exec.downcast_to_file_source::<ParquetSource>() else {
        return Ok(None);
    };
    // A scan with a runtime filter (a top-k's, a join's) keeps its `FilterExec`: without
    // it, events Q9's scan evaluated its top-k filter in the decoder (3.1K rows passed
    // instead of 17K) and took 1.2x as long (not looked into further).
    let runtime = |filter: &Arc<dyn PhysicalExpr>| {
        split_conjunction(filter)
            .into_iter()
            .any(|c| DynamicFilterTracking::classify(c).contains_dynamic_filter())
    };
    if source.filter().is_some_and(|filter| runtime(&filter)) {
        return Ok(None);
    }
    let pushing = FileScanConfigBuilder::from(scan.clone())
        .with_source(Arc::new(source.clone().with_pushdown_filters(true)))
        .build();
    let conjuncts = split_conjunction(filter.predicate())
        .into_iter()
        .map(Arc::clone)
        .collect();
    let pushed = pushing.try_pushdown_filters(conjuncts, config)?;
    if !pushed.filters.iter().all(|p| matches!(p, PushedDown::Yes)) {
        return Ok(None);
    }
    let Some(updated) = pushed.updated_node else {
        return Ok(None);
    };
    let Some(updated) = updated.downcast_ref::<FileScanConfig>() else {
        return Ok(None);
    };
    let Some(source) = updated.file_source().downcast_ref::<ParquetSource>() else {
        return Ok(None);
    };
    // DataFusion's pushdown (with decoding filters off) had already put the filter in the
    // scan's predicate, for pruning: each conjunct once.
    let Some(predicate) = source.filter() else {
        return Ok(None);
    };
    let mut once: Vec<Arc<dyn PhysicalExpr>> = vec![];
    for conjunct in split_conjunction(&predicate) {
        if !once.iter().any(|c| c.as_ref() == conjunct.as_ref()) {
            once.push(Arc::clone(conjunct));
        }
    }
    let source = source.with_predicate(conjunction(once));
    let mut scan: Arc<dyn DataSource> = Arc::new(
        FileScanConfigBuilder::from(updated.clone())
            .with_source(Arc::new(source))
            .build(),
    );
    if let Some(columns) = filter.projection() {
        let projection = ProjectionExprs::from_indices(columns, &filter.input().schema());
        match scan.try_swapping_with_projection(&projection)? {
            Some(projected) => scan = projected,
            None => return Ok(None),
        }
    }
    Ok(Some(Arc::new(DataSourceExec::new(scan))))
}

/// `filter` with each runtime filter among its conjuncts [`Measured`]: evaluated in the
/// decoder only while it drops most rows.
fn measured_runtime_filters(filter: &Arc<dyn PhysicalExpr>) -> Arc<dyn PhysicalExpr> {
    conjunction(split_conjunction(filter).into_iter().map(|conjunct| {
        match DynamicFilterTracking::classify(conjunct).contains_dynamic_filter() {
            true => Measured::wrap(Arc::clone(conjunct)),
            false => Arc::clone(conjunct),
        }
    }))
}

/// Whether every conjunct of `filter` is a runtime filter. A scan whose query also
/// filters it keeps that filter in its `FilterExec` above; pushing the scan's filters
/// would evaluate that one twice (an expensive `LIKE` doubled cost TPC-H Q13 1.6x).
fn only_runtime(filter: &Arc<dyn PhysicalExpr>) -> bool {
    split_conjunction(filter)
        .into_iter()
        .all(|conjunct| DynamicFilterTracking::classify(conjunct).contains_dynamic_filter())
}

/// Turns the decoder's filtering on for the Parquet scans that receive a runtime filter
/// and those under a selective query filter; installed for [`FilterPushdown::Runtime`],
/// runs after DataFusion's rules.
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
            // A selective query filter directly above its scan (the scan is checked first:
            // estimating a filter above a join would walk the join's statistics).
            if let Some(filter) = node.downcast_ref::<FilterExec>()
                && let Some(scan) = with_decoder_filters(filter.input())
                && estimated_selectivity(filter).is_some_and(|s| s < SELECTIVE)
            {
                if let Some(scan) = into_decoder(filter, config)? {
                    return Ok(Transformed::yes(scan));
                }
                let node = replace_children_if_necessary(Arc::clone(&node), vec![scan])?;
                return Ok(Transformed::yes(node));
            }
            // A scan filtered only by runtime filters.
            let Some(exec) = node.downcast_ref::<DataSourceExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some((_, source)) = exec.downcast_to_file_source::<ParquetSource>() else {
                return Ok(Transformed::no(node));
            };
            if !source.filter().is_some_and(|filter| only_runtime(&filter)) {
                return Ok(Transformed::no(node));
            }
            Ok(match with_decoder_filters(&node) {
                Some(scan) => Transformed::yes(scan),
                None => Transformed::no(node),
            })
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
