//! Scans of batches held in memory: a pinned table's, the row group cache's.
//!
//! DataFusion's `MemorySourceConfig` serves them. Its statistics count rows, bytes and
//! nulls but know no column's minimum or maximum, so DataFusion estimated every filter
//! over a pinned table at its default selectivity, and chose join sides from that: with
//! lineitem and orders pinned, TPC-H Q4 built its hash table from 3.8M lineitem rows
//! instead of 57K orders and ran 2.4x slower than from Parquet, Q18 2.6x
//! (docs/benchmarks.md). [`BoundedMemorySource`] is the same source with each column's
//! minimum and maximum over the table's batches (inexact: a scan may keep only some of
//! them); the row group cache's scans use it too, with the bounds of the row groups read.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::config::ConfigOptions;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column as ColumnRef, Result, Statistics};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Between, BinaryExpr as LogicalBinary, Expr, Operator};
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::filter_pushdown::{FilterPushdownPropagation, PushedDown};
use datafusion::physical_plan::projection::ProjectionExprs;
use datafusion::physical_plan::{DisplayFormatType, ExecutionPlan, Partitioning};
use datafusion::scalar::ScalarValue;
use datafusion_datasource::memory::MemorySourceConfig;
use datafusion_datasource::source::{DataSource, DataSourceExec};

/// A scan of batches held in memory that pass on fewer rows than this runs as one
/// partition: a key range's slice or two is then one stream, with no partitions to merge
/// (a task and a channel each) above it.
const ONE_PARTITION_ROWS: usize = 32 * 1024;

/// A column's minimum and maximum, `None` where unknown.
pub(crate) type ColumnBounds = (Option<ScalarValue>, Option<ScalarValue>);

/// Each column's bounds over a table.
pub(crate) type Bounds = [ColumnBounds];

/// `bounds` widened to take in `other`'s: a bound unknown in either is unknown.
pub(crate) fn widen(bounds: &mut [ColumnBounds], other: &Bounds) {
    fn pick(
        a: Option<ScalarValue>,
        b: &Option<ScalarValue>,
        wider: Ordering,
    ) -> Option<ScalarValue> {
        let (a, b) = (a?, b.as_ref()?);
        Some(if b.partial_cmp(&a)? == wider {
            b.clone()
        } else {
            a
        })
    }
    for ((min, max), (other_min, other_max)) in bounds.iter_mut().zip(other) {
        *min = pick(min.take(), other_min, Ordering::Less);
        *max = pick(max.take(), other_max, Ordering::Greater);
    }
}

/// DataFusion's scan of `partitions` (rows of `schema`), with the columns' `bounds` in
/// its statistics when known.
pub(crate) fn memory_scan(
    partitions: Vec<Vec<RecordBatch>>,
    schema: &SchemaRef,
    projection: Option<&Vec<usize>>,
    bounds: Option<&Bounds>,
) -> Result<Arc<dyn ExecutionPlan>> {
    memory_scan_passing(partitions, schema, projection, bounds, &[])
}

/// [`memory_scan`] of rows that all pass `passing`: comparisons of columns with literals
/// (as `PinnedBatches::applies_exactly` accepts) that the rows were cut to exactly. A
/// `FilterExec` above the scan hands such comparisons down to it (DataFusion's filter
/// pushdown) and drops them: cached rows cut to a key range are passed on, not filtered
/// (and copied) again.
pub(crate) fn memory_scan_passing(
    partitions: Vec<Vec<RecordBatch>>,
    schema: &SchemaRef,
    projection: Option<&Vec<usize>>,
    bounds: Option<&Bounds>,
    passing: &[Expr],
) -> Result<Arc<dyn ExecutionPlan>> {
    let rows: usize = partitions.iter().flatten().map(RecordBatch::num_rows).sum();
    let partitions = if rows < ONE_PARTITION_ROWS {
        vec![partitions.into_iter().flatten().collect()]
    } else {
        partitions
    };
    let source = MemorySourceConfig::try_new(&partitions, Arc::clone(schema), projection.cloned())?;
    let passing: Arc<[Comparison]> = passing.iter().flat_map(comparisons).collect();
    if bounds.is_none() && passing.is_empty() {
        return Ok(DataSourceExec::from_data_source(source));
    }
    let mut statistics = Arc::unwrap_or_clone(source.partition_statistics(None)?);
    if let Some(bounds) = bounds {
        let columns: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..schema.fields().len()).collect(),
        };
        for (column, index) in statistics.column_statistics.iter_mut().zip(columns) {
            let (min, max) = &bounds[index];
            column.min_value = min.clone().map_or(Precision::Absent, Precision::Inexact);
            column.max_value = max.clone().map_or(Precision::Absent, Precision::Inexact);
        }
    }
    Ok(DataSourceExec::from_data_source(BoundedMemorySource {
        inner: source,
        statistics: Arc::new(statistics),
        passing,
    }))
}

/// A column compared with a literal: `(column, op, value)`, the column on the left.
type Comparison = (String, Operator, ScalarValue);

/// The comparisons of a conjunction of `column op literal` (either side) and `BETWEEN`;
/// other conjuncts give none.
fn comparisons(filter: &Expr) -> Vec<Comparison> {
    column_comparisons(filter)
        .into_iter()
        .map(|(column, op, value)| (column.name.clone(), op, value.clone()))
        .collect()
}

/// The comparisons of a column with a literal among the conjuncts of `filter`, the column
/// on the left: `column op literal` or `literal op column` (any operator that swaps) and
/// `column BETWEEN low AND high` (as `>=` and `<=`); other conjuncts give none.
pub(crate) fn column_comparisons(filter: &Expr) -> Vec<(&ColumnRef, Operator, &ScalarValue)> {
    fn one<'a>(
        column: &'a Expr,
        op: Operator,
        value: &'a Expr,
    ) -> Option<(&'a ColumnRef, Operator, &'a ScalarValue)> {
        match (column, value) {
            (Expr::Column(c), Expr::Literal(v, _)) => Some((c, op, v)),
            _ => None,
        }
    }
    let mut found = vec![];
    for conjunct in split_conjunction(filter) {
        match conjunct {
            Expr::BinaryExpr(LogicalBinary { left, op, right }) => {
                let swapped = || one(right, op.swap()?, left);
                found.extend(one(left, *op, right).or_else(swapped));
            }
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) => {
                found.extend(one(expr, Operator::GtEq, low));
                found.extend(one(expr, Operator::LtEq, high));
            }
            _ => {}
        }
    }
    found
}

/// `filter` as a comparison of a column with a literal, the column on the left.
fn physical_comparison(filter: &Arc<dyn PhysicalExpr>) -> Option<Comparison> {
    let binary = filter.downcast_ref::<BinaryExpr>()?;
    let side = |e: &Arc<dyn PhysicalExpr>| e.downcast_ref::<Column>().map(|c| c.name().to_owned());
    let value = |e: &Arc<dyn PhysicalExpr>| e.downcast_ref::<Literal>().map(|l| l.value().clone());
    match (side(binary.left()), value(binary.right())) {
        (Some(column), Some(value)) => Some((column, *binary.op(), value)),
        _ => Some((
            side(binary.right())?,
            binary.op().swap()?,
            value(binary.left())?,
        )),
    }
}

/// The memory source of a scan of batches in memory, with or without
/// [`BoundedMemorySource`]'s statistics; `None` for any other plan.
pub(crate) fn memory_source(plan: &dyn ExecutionPlan) -> Option<&MemorySourceConfig> {
    let source = plan.downcast_ref::<DataSourceExec>()?.data_source();
    source.downcast_ref::<MemorySourceConfig>().or_else(|| {
        source
            .downcast_ref::<BoundedMemorySource>()
            .map(|p| &p.inner)
    })
}

/// `MemorySourceConfig` with the statistics of the whole scan (all partitions) given.
/// Everything but those statistics is the inner source's; a change of the scan itself
/// (a limit, a projection, a sort order, a partitioning) is the inner source's alone.
#[derive(Debug, Clone)]
pub(crate) struct BoundedMemorySource {
    inner: MemorySourceConfig,
    statistics: Arc<Statistics>,
    /// Comparisons every row passes (`memory_scan_passing`).
    passing: Arc<[Comparison]>,
}

impl DataSource for BoundedMemorySource {
    fn open(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.inner.open(partition, context)
    }

    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.fmt_as(t, f)
    }

    fn repartitioned(
        &self,
        target_partitions: usize,
        repartition_file_min_size: usize,
        output_ordering: Option<datafusion::physical_expr::LexOrdering>,
    ) -> Result<Option<Arc<dyn DataSource>>> {
        self.inner.repartitioned(
            target_partitions,
            repartition_file_min_size,
            output_ordering,
        )
    }

    fn output_partitioning(&self) -> Partitioning {
        self.inner.output_partitioning()
    }

    fn eq_properties(&self) -> EquivalenceProperties {
        self.inner.eq_properties()
    }

    fn scheduling_type(&self) -> datafusion::physical_plan::execution_plan::SchedulingType {
        self.inner.scheduling_type()
    }

    fn partition_statistics(&self, partition: Option<usize>) -> Result<Arc<Statistics>> {
        match partition {
            None => Ok(Arc::clone(&self.statistics)),
            Some(_) => self.inner.partition_statistics(partition),
        }
    }

    fn with_fetch(&self, limit: Option<usize>) -> Option<Arc<dyn DataSource>> {
        self.inner.with_fetch(limit)
    }

    fn fetch(&self) -> Option<usize> {
        self.inner.fetch()
    }

    fn try_swapping_with_projection(
        &self,
        projection: &ProjectionExprs,
    ) -> Result<Option<Arc<dyn DataSource>>> {
        self.inner.try_swapping_with_projection(projection)
    }

    fn try_pushdown_filters(
        &self,
        filters: Vec<Arc<dyn PhysicalExpr>>,
        config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn DataSource>>> {
        if self.passing.is_empty() {
            return self.inner.try_pushdown_filters(filters, config);
        }
        // A filter every row passes is as good as applied; the others stay above.
        let pushed = filters
            .iter()
            .map(|f| match physical_comparison(f) {
                Some(c) if self.passing.contains(&c) => PushedDown::Yes,
                _ => PushedDown::No,
            })
            .collect();
        Ok(FilterPushdownPropagation::with_parent_pushdown_result(
            pushed,
        ))
    }

    fn try_pushdown_sort(
        &self,
        order: &[datafusion::physical_expr::PhysicalSortExpr],
    ) -> Result<datafusion::physical_plan::SortOrderPushdownResult<Arc<dyn DataSource>>> {
        self.inner.try_pushdown_sort(order)
    }

    fn with_preserve_order(&self, preserve_order: bool) -> Option<Arc<dyn DataSource>> {
        self.inner.with_preserve_order(preserve_order)
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.inner.apply_expressions(f)
    }

    fn try_to_proto(
        &self,
        ctx: &datafusion::physical_plan::proto::ExecutionPlanEncodeCtx<'_>,
    ) -> Result<Option<datafusion_proto_models::protobuf::PhysicalPlanNode>> {
        self.inner.try_to_proto(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::{StatisticsArgs, StatisticsContext};

    #[test]
    fn small_memory_scans_are_one_partition() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let batch = |rows: i64| {
            let column = Arc::new(Int64Array::from_iter_values(0..rows));
            RecordBatch::try_new(Arc::clone(&schema), vec![column]).unwrap()
        };
        let partitions = |plan: Arc<dyn ExecutionPlan>| {
            plan.properties().output_partitioning().partition_count()
        };
        // A key range's two slices, from two partitions: one stream.
        let small = vec![vec![batch(3_000)], vec![batch(4_500)], vec![]];
        assert_eq!(
            partitions(memory_scan(small, &schema, None, None).unwrap()),
            1
        );
        assert_eq!(
            partitions(memory_scan(vec![vec![]], &schema, None, None).unwrap()),
            1
        );
        // Enough rows to be worth the parallelism: partitions kept.
        let large = vec![vec![batch(20_000)], vec![batch(20_000)]];
        assert_eq!(
            partitions(memory_scan(large, &schema, None, None).unwrap()),
            2
        );
    }

    /// Columns `a` and `k`, both Int64.
    fn two_columns() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("k", DataType::Int64, false),
        ]))
    }

    #[test]
    fn the_bounds_given_are_the_scans_statistics_and_its_source_is_found() {
        let schema = two_columns();
        let column = Arc::new(Int64Array::from_iter_values(5..105));
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), vec![column.clone(), column]).unwrap();
        let bounds = [
            (None, None),
            (
                Some(ScalarValue::Int64(Some(5))),
                Some(ScalarValue::Int64(Some(104))),
            ),
        ];
        // Projected to `k`: its bounds, inexact; the row count exact, as without them.
        let plan = memory_scan(
            vec![vec![batch.clone()]],
            &schema,
            Some(&vec![1]),
            Some(&bounds),
        )
        .unwrap();
        let statistics = StatisticsContext::new()
            .compute(plan.as_ref(), &StatisticsArgs::new())
            .unwrap();
        assert_eq!(statistics.num_rows, Precision::Exact(100));
        let k = &statistics.column_statistics[0];
        assert_eq!(k.min_value, Precision::Inexact(ScalarValue::Int64(Some(5))));
        assert_eq!(
            k.max_value,
            Precision::Inexact(ScalarValue::Int64(Some(104)))
        );
        assert!(memory_source(plan.as_ref()).is_some());
        // Without bounds: DataFusion's own source and statistics (no minimum).
        let plain = memory_scan(vec![vec![batch]], &schema, None, None).unwrap();
        let statistics = StatisticsContext::new()
            .compute(plain.as_ref(), &StatisticsArgs::new())
            .unwrap();
        assert_eq!(statistics.column_statistics[1].min_value, Precision::Absent);
        assert!(memory_source(plain.as_ref()).is_some());
    }

    #[test]
    fn widened_bounds_take_the_extremes_and_lose_what_either_lacks() {
        let int = |v| Some(ScalarValue::Int64(Some(v)));
        let text = |v: &str| Some(ScalarValue::from(v));
        let mut bounds = vec![(int(5), int(10)), (text("b"), None), (int(1), int(2))];
        widen(
            &mut bounds,
            &[(int(3), int(8)), (text("a"), text("z")), (None, int(9))],
        );
        assert_eq!(
            bounds,
            vec![(int(3), int(10)), (text("a"), None), (None, int(9))]
        );
    }

    #[test]
    fn a_filter_above_drops_the_comparisons_every_row_passes() {
        use datafusion::physical_expr::expressions::{binary, col, lit};
        use datafusion::physical_optimizer::PhysicalOptimizerRule;
        use datafusion::physical_optimizer::filter_pushdown::FilterPushdown;
        use datafusion::physical_plan::filter::FilterExec;
        use datafusion::prelude::{col as column, lit as value};

        let schema = two_columns();
        let keys = Arc::new(Int64Array::from_iter_values(10..20));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![keys.clone(), keys]).unwrap();
        // `k >= 10 AND k < 20 AND a > 12`, as DataFusion plans it above the scan.
        let compare = |name, op, v: i64| binary(col(name, &schema).unwrap(), op, lit(v), &schema);
        let predicate = [
            compare("k", Operator::GtEq, 10).unwrap(),
            compare("k", Operator::Lt, 20).unwrap(),
            compare("a", Operator::Gt, 12).unwrap(),
        ]
        .into_iter()
        .reduce(|l, r| binary(l, Operator::And, r, &schema).unwrap())
        .unwrap();
        let optimized = |passing: &[Expr]| {
            let scan = memory_scan_passing(vec![vec![batch.clone()]], &schema, None, None, passing)
                .unwrap();
            let filter = Arc::new(FilterExec::try_new(Arc::clone(&predicate), scan).unwrap());
            let plan = FilterPushdown::new()
                .optimize(filter, &ConfigOptions::default())
                .unwrap();
            plan.downcast_ref::<FilterExec>()
                .map(|f| f.predicate().to_string())
        };
        // The rows were cut to the key range (written either way round): only `a > 12`
        // is left to filter.
        let range = value(10i64)
            .lt_eq(column("k"))
            .and(column("k").lt(value(20i64)));
        assert_eq!(optimized(&[range]).as_deref(), Some("a@0 > 12"));
        // A bound of another value, or none: everything stays.
        let other = column("k").gt_eq(value(11i64));
        let all = "k@1 >= 10 AND k@1 < 20 AND a@0 > 12";
        assert_eq!(optimized(&[other]).as_deref(), Some(all));
        assert_eq!(optimized(&[]).as_deref(), Some(all));
        // Every comparison passed: no filter at all.
        let every = column("k")
            .between(value(10i64), value(19i64))
            .and(column("a").gt(value(12i64)));
        let partial = optimized(&[every, column("k").lt(value(20i64))]);
        assert_eq!(partial, None);
    }
}
