//! A pinned table's batches with statistics per batch (rows, and per column min, max and
//! null count), so a filter skips whole batches the way Parquet row-group statistics skip
//! row groups. Without them every query on a pinned table filtered every row, and a
//! selective query was slower from memory than from the files.
//!
//! The skipping is DataFusion's own `PruningPredicate` (the code that prunes row groups),
//! evaluated over one container per batch. Data sorted on a key gets the most from it:
//! each batch then covers a narrow range of the key, and a key-range query keeps only the
//! batches that overlap its range.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::pruning::PruningStatistics;
use datafusion::common::{Column, DFSchema};
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Accumulator, Expr};
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;
use datafusion::scalar::ScalarValue;

/// A string or binary min/max longer than this is not kept (the batch's bound for that
/// column is unknown): a table of long texts would otherwise hold a copy of two texts per
/// batch. Parquet writers truncate their statistics to the same order of size.
const MAX_STATISTIC_BYTES: usize = 64;

/// Batches by partition, with the statistics of each batch.
#[derive(Debug)]
pub(crate) struct PinnedBatches {
    partitions: Vec<Vec<RecordBatch>>,
    statistics: BatchStatistics,
}

/// What one scan of a pinned table keeps.
pub(crate) struct Selected {
    /// Batches by partition (as many partitions as the table has, some maybe empty).
    pub partitions: Vec<Vec<RecordBatch>>,
    /// Batches of the table.
    pub total: usize,
    /// Batches kept.
    pub kept: usize,
}

impl PinnedBatches {
    /// The batches of `partitions`, all of `schema`, and their statistics.
    pub(crate) fn new(schema: SchemaRef, partitions: Vec<Vec<RecordBatch>>) -> Self {
        let statistics = BatchStatistics::new(schema, partitions.iter().flatten());
        Self {
            partitions,
            statistics,
        }
    }

    /// Bytes held by the statistics (the batches are accounted for by their owner).
    pub(crate) fn statistics_bytes(&self) -> usize {
        self.statistics.bytes()
    }

    /// The batches that may hold rows passing every filter in `filters` (filters DataFusion
    /// still applies to each row kept: this only skips batches that cannot match).
    pub(crate) fn select(&self, state: &dyn Session, filters: &[Expr]) -> Selected {
        let total = self.statistics.containers;
        let Some(keep) = self.keep(state, filters) else {
            return Selected {
                partitions: self.partitions.clone(),
                total,
                kept: total,
            };
        };
        let mut keep = keep.into_iter();
        let partitions: Vec<Vec<RecordBatch>> = self
            .partitions
            .iter()
            .map(|batches| {
                batches
                    .iter()
                    .filter(|_| keep.next().unwrap_or(true))
                    .cloned()
                    .collect()
            })
            .collect();
        let kept = partitions.iter().map(Vec::len).sum();
        Selected {
            partitions,
            total,
            kept,
        }
    }

    /// One flag per batch (in partition order): false where the statistics prove no row
    /// passes the filters. `None` when nothing can be proven (no usable filter).
    fn keep(&self, state: &dyn Session, filters: &[Expr]) -> Option<Vec<bool>> {
        // A volatile filter (random()) gives a different answer on every evaluation: it
        // cannot be decided from statistics.
        let usable = filters
            .iter()
            .filter(|f| !f.is_volatile())
            .cloned()
            .collect::<Vec<_>>();
        let predicate = conjunction(usable)?;
        let schema = Arc::clone(&self.statistics.schema);
        let df_schema = DFSchema::try_from(Arc::clone(&schema)).ok()?;
        // A filter DataFusion cannot turn into a physical expression here (a subquery)
        // only loses the skipping: DataFusion still applies it above the scan.
        let physical = state.create_physical_expr(predicate, &df_schema).ok()?;
        let pruning = PruningPredicateBuilder::new()
            .with_file_schema(schema)
            .build(physical)?;
        let keep = pruning.prune(&self.statistics).ok()?;
        (keep.len() == self.statistics.containers).then_some(keep)
    }
}

/// Statistics of every batch of a pinned table, one container per batch, as arrays (built
/// once, when the table is pinned, so a query's pruning only evaluates its predicate).
#[derive(Debug)]
struct BatchStatistics {
    schema: SchemaRef,
    containers: usize,
    /// Per column: the batches' minimums (NULL where unknown); `None` when no batch has one.
    min: Vec<Option<ArrayRef>>,
    max: Vec<Option<ArrayRef>>,
    null_counts: Vec<ArrayRef>,
    rows: ArrayRef,
}

impl BatchStatistics {
    fn new<'a>(schema: SchemaRef, batches: impl Iterator<Item = &'a RecordBatch> + Clone) -> Self {
        let containers = batches.clone().count();
        let rows: ArrayRef = Arc::new(
            batches
                .clone()
                .map(|b| b.num_rows() as u64)
                .collect::<UInt64Array>(),
        );
        let mut min = Vec::with_capacity(schema.fields().len());
        let mut max = Vec::with_capacity(schema.fields().len());
        let mut null_counts = Vec::with_capacity(schema.fields().len());
        for (i, field) in schema.fields().iter().enumerate() {
            let columns = batches.clone().map(|b| b.column(i));
            null_counts.push(Arc::new(
                columns
                    .clone()
                    .map(|c| c.logical_null_count() as u64)
                    .collect::<UInt64Array>(),
            ) as ArrayRef);
            min.push(bounds(field.data_type(), columns.clone(), Bound::Min));
            max.push(bounds(field.data_type(), columns, Bound::Max));
        }
        Self {
            schema,
            containers,
            min,
            max,
            null_counts,
            rows,
        }
    }

    fn bytes(&self) -> usize {
        let arrays = self
            .min
            .iter()
            .chain(&self.max)
            .flatten()
            .chain(&self.null_counts)
            .chain(std::iter::once(&self.rows));
        arrays.map(|a| a.get_array_memory_size()).sum()
    }

    fn column(&self, column: &Column) -> Option<usize> {
        self.schema.index_of(column.name()).ok()
    }
}

#[derive(Clone, Copy)]
enum Bound {
    Min,
    Max,
}

/// Each column's minimum or maximum as one array over the batches, NULL where a batch has
/// none (all NULL, or too long to keep); `None` for types DataFusion's min/max does not
/// order (nested types) or when no batch has a bound.
fn bounds<'a>(
    data_type: &DataType,
    columns: impl Iterator<Item = &'a ArrayRef>,
    bound: Bound,
) -> Option<ArrayRef> {
    if data_type.is_nested() {
        return None;
    }
    let unknown = ScalarValue::try_from(data_type).ok()?;
    let mut any = false;
    let values = columns
        .map(|column| {
            let value = extreme(data_type, column, bound)
                .filter(|v| !v.is_null() && short_enough(v))
                .unwrap_or_else(|| unknown.clone());
            any |= !value.is_null();
            value
        })
        .collect::<Vec<_>>();
    if !any {
        return None;
    }
    ScalarValue::iter_to_array(values).ok()
}

/// The minimum or maximum of one batch's column, `None` if DataFusion cannot compute it.
fn extreme(data_type: &DataType, column: &ArrayRef, bound: Bound) -> Option<ScalarValue> {
    let mut accumulator: Box<dyn Accumulator> = match bound {
        Bound::Min => Box::new(MinAccumulator::try_new(data_type).ok()?),
        Bound::Max => Box::new(MaxAccumulator::try_new(data_type).ok()?),
    };
    accumulator
        .update_batch(std::slice::from_ref(column))
        .ok()?;
    accumulator.evaluate().ok()
}

fn short_enough(value: &ScalarValue) -> bool {
    match value {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => s.len() <= MAX_STATISTIC_BYTES,
        ScalarValue::Binary(Some(b))
        | ScalarValue::LargeBinary(Some(b))
        | ScalarValue::BinaryView(Some(b))
        | ScalarValue::FixedSizeBinary(_, Some(b)) => b.len() <= MAX_STATISTIC_BYTES,
        _ => true,
    }
}

impl PruningStatistics for BatchStatistics {
    fn min_values(&self, column: &Column) -> Option<ArrayRef> {
        self.min[self.column(column)?].clone()
    }

    fn max_values(&self, column: &Column) -> Option<ArrayRef> {
        self.max[self.column(column)?].clone()
    }

    fn num_containers(&self) -> usize {
        self.containers
    }

    fn null_counts(&self, column: &Column) -> Option<ArrayRef> {
        Some(Arc::clone(&self.null_counts[self.column(column)?]))
    }

    fn row_counts(&self) -> Option<ArrayRef> {
        Some(Arc::clone(&self.rows))
    }

    fn contained(&self, _column: &Column, _values: &HashSet<ScalarValue>) -> Option<BooleanArray> {
        // Batches keep no set of their distinct values; min/max decide instead.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    /// Three batches over `key` 0..30 sorted, 10 per batch, with a `name` column; the last
    /// batch's names are all NULL.
    fn sorted() -> PinnedBatches {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let batch = |from: i64, names: bool| {
            let keys = Int64Array::from_iter_values(from..from + 10);
            let names = StringArray::from_iter(
                (from..from + 10).map(|k| names.then(|| format!("n{k:03}"))),
            );
            RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(keys), Arc::new(names)])
                .unwrap()
        };
        PinnedBatches::new(
            Arc::clone(&schema),
            vec![
                vec![batch(0, true), batch(10, true)],
                vec![batch(20, false)],
            ],
        )
    }

    fn keys(selected: &Selected) -> Vec<Vec<i64>> {
        selected
            .partitions
            .iter()
            .map(|p| {
                p.iter()
                    .map(|b| {
                        b.column(0)
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .unwrap()
                            .value(0)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_key_range_keeps_only_the_batches_it_overlaps() {
        let pinned = sorted();
        let state = SessionContext::new().state();
        let selected = pinned.select(
            &state,
            &[col("key").gt_eq(lit(12i64)), col("key").lt(lit(15i64))],
        );
        assert_eq!(keys(&selected), vec![vec![10], Vec::<i64>::new()]);
        assert_eq!((selected.total, selected.kept), (3, 1));

        // Across a batch boundary.
        let selected = pinned.select(&state, &[col("key").between(lit(9i64), lit(20i64))]);
        assert_eq!(keys(&selected), vec![vec![0, 10], vec![20]]);

        // Outside the table.
        let selected = pinned.select(&state, &[col("key").gt(lit(100i64))]);
        assert_eq!(keys(&selected), vec![Vec::<i64>::new(), vec![]]);
        assert_eq!(selected.kept, 0);
    }

    #[test]
    fn strings_and_null_counts_prune_too() {
        let pinned = sorted();
        let state = SessionContext::new().state();
        let selected = pinned.select(&state, &[col("name").eq(lit("n015"))]);
        assert_eq!(keys(&selected), vec![vec![10], Vec::<i64>::new()]);
        // Only the last batch has NULL names.
        let selected = pinned.select(&state, &[col("name").is_null()]);
        assert_eq!(keys(&selected), vec![Vec::<i64>::new(), vec![20]]);
    }

    #[test]
    fn filters_that_prove_nothing_keep_every_batch() {
        let pinned = sorted();
        let state = SessionContext::new().state();
        for filters in [
            vec![],
            // Volatile: never decided from statistics.
            vec![col("key").lt(datafusion::functions::math::expr_fn::random())],
            // A bound on a column the statistics cannot refute.
            vec![col("key").gt_eq(lit(0i64))],
            // Unknown column: DataFusion reports the error when it plans the filter.
            vec![col("nope").eq(lit(1i64))],
        ] {
            let selected = pinned.select(&state, &filters);
            assert_eq!(keys(&selected), vec![vec![0, 10], vec![20]], "{filters:?}");
            assert_eq!(selected.kept, 3);
        }
    }

    #[test]
    fn long_strings_keep_no_bound() {
        let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]));
        let long = "x".repeat(MAX_STATISTIC_BYTES + 1);
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(StringArray::from(vec![long.as_str(), "a"]))],
        )
        .unwrap();
        let pinned = PinnedBatches::new(schema, vec![vec![batch]]);
        let column = Column::from_name("text");
        // The minimum ("a") is kept, the maximum (too long) is not.
        assert!(pinned.statistics.min_values(&column).is_some());
        assert!(pinned.statistics.max_values(&column).is_none());
        let state = SessionContext::new().state();
        let selected = pinned.select(&state, &[col("text").gt(lit("b"))]);
        assert_eq!(selected.kept, 1);
    }
}
