//! A pinned table's batches with statistics per batch (rows, and per column min, max and
//! null count), so a filter skips whole batches the way Parquet row-group statistics skip
//! row groups. Without them every query on a pinned table filtered every row, and a
//! selective query was slower from memory than from the files.
//!
//! The skipping is DataFusion's own `PruningPredicate` (the code that prunes row groups),
//! evaluated over one container per batch. Data sorted on a key gets the most from it:
//! each batch then covers a narrow range of the key, and a key-range query keeps only the
//! batches that overlap its range.
//!
//! Within a batch kept, a column found sorted when the table was pinned (no nulls, never
//! decreasing) narrows the batch further: a comparison of that column with a literal
//! keeps only the rows of its range, as a slice of the batch (found by binary search),
//! where filtering the whole batch copied each kept row (a quarter of a key-range query's
//! CPU time on a sorted pinned table, measured with perf). When the column is sorted in
//! every batch the cut is exact, and the table tells DataFusion so
//! ([`PinnedBatches::applies_exactly`]): no filter runs above the scan at all, and the
//! slices reach the send path as they are. Other filters DataFusion still applies; a row
//! in the cut range passes them or not, and a slice that passes whole is handed on
//! without a copy.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Datum, RecordBatch, Scalar, UInt64Array,
    make_comparator,
};
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::compute::kernels::cmp::{self, lt_eq};
use datafusion::arrow::datatypes::{DataType, SchemaRef, UInt64Type};
use datafusion::arrow::error::ArrowError;
use datafusion::catalog::Session;
use datafusion::common::pruning::PruningStatistics;
use datafusion::common::{Column, DFSchema};
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{Accumulator, Expr, Operator};
use datafusion::physical_optimizer::pruning::{PruningPredicate, PruningPredicateBuilder};
use datafusion::scalar::ScalarValue;

use super::memory_scan::{Bounds, ColumnBounds, column_comparisons};

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
    /// Rows of the batches not skipped by their statistics that a sorted column put
    /// outside a filter's range (not passed on).
    pub rows_skipped: usize,
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

    /// Each column's minimum and maximum over the whole table, where every batch has
    /// one: what DataFusion estimates a filter's selectivity from (and so a join's sides),
    /// as it does from a Parquet file's footer.
    pub(crate) fn bounds(&self) -> &Bounds {
        &self.statistics.table_bounds
    }

    /// Whether [`Self::select`] applies `filter` exactly, so that DataFusion need not
    /// filter the rows it passes on: each conjunct a comparison (`=`, `<`, `<=`, `>`,
    /// `>=`, `BETWEEN`) of a column with literals of the column's own type, not floating
    /// point, the column sorted in every batch (so each batch is cut to exactly the rows
    /// that pass, and the batches skipped hold none).
    pub(crate) fn applies_exactly(&self, filter: &Expr) -> bool {
        split_conjunction(filter).into_iter().all(|conjunct| {
            KeyRange::only(conjunct, &self.statistics.schema).is_some_and(|ranges| {
                ranges
                    .iter()
                    .all(|range| self.statistics.sorted[range.column].iter().all(|s| *s))
            })
        })
    }

    /// The batches that may hold rows passing every filter in `filters` (filters DataFusion
    /// still applies to each row kept: this only skips rows that cannot match), each
    /// narrowed to the rows its sorted columns allow.
    pub(crate) fn select(&self, state: &dyn Session, filters: &[Expr]) -> Selected {
        self.select_with(&Selector::new(state, filters, &self.statistics.schema))
    }

    /// [`Self::select`] with the filters prepared once (a scan over many sets of batches
    /// of one schema, such as the row group cache's).
    pub(crate) fn select_with(&self, selector: &Selector) -> Selected {
        let total = self.statistics.containers;
        let keep = selector.keep(&self.statistics);
        let mut index = 0;
        let mut rows_skipped = 0;
        let partitions: Vec<Vec<RecordBatch>> = self
            .partitions
            .iter()
            .map(|batches| {
                batches
                    .iter()
                    .filter_map(|batch| {
                        let at = index;
                        index += 1;
                        if !keep
                            .as_ref()
                            .is_none_or(|k| k.get(at).copied().unwrap_or(true))
                        {
                            return None;
                        }
                        let (start, end) =
                            self.statistics.rows_in_range(at, batch, &selector.ranges);
                        rows_skipped += batch.num_rows() - (end - start);
                        if start == 0 && end == batch.num_rows() {
                            Some(batch.clone())
                        } else {
                            (start < end).then(|| batch.slice(start, end - start))
                        }
                    })
                    .collect()
            })
            .collect();
        let kept = partitions.iter().map(Vec::len).sum();
        Selected {
            partitions,
            total,
            kept,
            rows_skipped,
        }
    }
}

/// A query's filters, prepared for selecting batches of one schema: the predicate over
/// their statistics, and the key ranges sorted columns can be cut to.
pub(crate) struct Selector {
    keep: Keep,
    ranges: Vec<KeyRange>,
}

/// How a [`Selector`] tells which batches may hold a passing row.
enum Keep {
    /// Every filter is a key range of the selector's `ranges` on a column that is not
    /// floating point: by comparing each range with the batches' minimums and maximums,
    /// without building a pruning predicate (a tenth of a point query's CPU time on a
    /// pinned table, measured with perf).
    ByRanges,
    /// DataFusion's pruning predicate over the batches' statistics; `None` when nothing
    /// can be proven from the filters.
    Pruning(Option<Arc<PruningPredicate>>),
}

impl Selector {
    pub(crate) fn new(state: &dyn Session, filters: &[Expr], schema: &SchemaRef) -> Self {
        // Each conjunct's ranges, when every conjunct is nothing but key ranges.
        let only_ranges: Option<Vec<Vec<KeyRange>>> = filters
            .iter()
            .flat_map(split_conjunction)
            .map(|conjunct| KeyRange::only(conjunct, schema))
            .collect();
        match only_ranges {
            Some(ranges) if !filters.is_empty() => Self {
                keep: Keep::ByRanges,
                ranges: ranges.into_iter().flatten().collect(),
            },
            _ => Self {
                keep: Keep::Pruning(Self::pruning(state, filters, schema)),
                ranges: KeyRange::from_filters(filters, schema),
            },
        }
    }

    /// The predicate over batch statistics; `None` when nothing can be proven (no usable
    /// filter).
    fn pruning(
        state: &dyn Session,
        filters: &[Expr],
        schema: &SchemaRef,
    ) -> Option<Arc<PruningPredicate>> {
        // A volatile filter (random()) gives a different answer on every evaluation: it
        // cannot be decided from statistics.
        let usable = filters
            .iter()
            .filter(|f| !f.is_volatile())
            .cloned()
            .collect::<Vec<_>>();
        let predicate = conjunction(usable)?;
        let df_schema = DFSchema::try_from(Arc::clone(schema)).ok()?;
        // A filter DataFusion cannot turn into a physical expression here (a subquery)
        // only loses the skipping: DataFusion still applies it above the scan.
        let physical = state.create_physical_expr(predicate, &df_schema).ok()?;
        PruningPredicateBuilder::new()
            .with_file_schema(Arc::clone(schema))
            .build(physical)
    }

    /// One flag per batch of `statistics` (in partition order): false where they prove no
    /// row passes the filters. `None` when nothing can be proven.
    fn keep(&self, statistics: &BatchStatistics) -> Option<Vec<bool>> {
        match &self.keep {
            Keep::ByRanges => statistics.overlapping(&self.ranges),
            Keep::Pruning(pruning) => {
                let keep = pruning.as_ref()?.prune(statistics).ok()?;
                (keep.len() == statistics.containers).then_some(keep)
            }
        }
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
    /// Per column, one flag per batch: the column has no nulls and never decreases in it.
    sorted: Vec<Vec<bool>>,
    /// Per column, the least minimum and greatest maximum of the batches, `None` where a
    /// batch has no bound.
    table_bounds: Vec<ColumnBounds>,
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
        let mut sorted = Vec::with_capacity(schema.fields().len());
        for (i, field) in schema.fields().iter().enumerate() {
            let columns = batches.clone().map(|b| b.column(i));
            sorted.push(columns.clone().map(ascending).collect());
            null_counts.push(Arc::new(
                columns
                    .clone()
                    .map(|c| c.logical_null_count() as u64)
                    .collect::<UInt64Array>(),
            ) as ArrayRef);
            min.push(bounds(field.data_type(), columns.clone(), Bound::Min));
            max.push(bounds(field.data_type(), columns, Bound::Max));
        }
        let table_bounds = schema
            .fields()
            .iter()
            .zip(min.iter().zip(&max))
            .map(|(field, (min, max))| {
                let whole = |bounds: &Option<ArrayRef>, bound| {
                    let bounds = bounds.as_ref().filter(|b| b.null_count() == 0)?;
                    extreme(field.data_type(), bounds, bound).filter(|v| !v.is_null())
                };
                (whole(min, Bound::Min), whole(max, Bound::Max))
            })
            .collect();
        Self {
            schema,
            containers,
            min,
            max,
            null_counts,
            rows,
            sorted,
            table_bounds,
        }
    }

    /// One flag per batch: false where a batch's minimum or maximum puts every row
    /// outside one of `ranges`, or the range's column is NULL in every row (a batch
    /// without a bound is otherwise kept). `None` when no range can be compared.
    fn overlapping(&self, ranges: &[KeyRange]) -> Option<Vec<bool>> {
        let mut keep: Option<Vec<bool>> = None;
        let rows = self.rows.as_primitive::<UInt64Type>();
        for range in ranges {
            // A comparison with NULL is never true: a batch of only NULLs has no row in it.
            let nulls = self.null_counts[range.column].as_primitive::<UInt64Type>();
            if nulls.len() == self.containers && rows.len() == self.containers {
                let keep = keep.get_or_insert_with(|| vec![true; self.containers]);
                for (i, k) in keep.iter_mut().enumerate() {
                    *k &= nulls.value(i) != rows.value(i);
                }
            }
            // The range's rows can be in a batch only if its bounds allow them.
            let (min, max) = (&self.min[range.column], &self.max[range.column]);
            let checks: &[(&Option<ArrayRef>, Compare)] = match range.op {
                Operator::Lt => &[(min, cmp::lt)],
                Operator::LtEq => &[(min, cmp::lt_eq)],
                Operator::Gt => &[(max, cmp::gt)],
                Operator::GtEq => &[(max, cmp::gt_eq)],
                Operator::Eq => &[(min, cmp::lt_eq), (max, cmp::gt_eq)],
                _ => &[],
            };
            for (bound, compare) in checks {
                narrow(&mut keep, bound, *compare, range, self.containers);
            }
        }
        keep
    }

    /// The rows `[start, end)` of batch `at` (`batch`) that `ranges` allow, from the
    /// columns sorted in that batch; `start >= end` when none can match.
    fn rows_in_range(&self, at: usize, batch: &RecordBatch, ranges: &[KeyRange]) -> (usize, usize) {
        let (mut start, mut end) = (0, batch.num_rows());
        for range in ranges {
            if start >= end {
                break;
            }
            if !self.sorted[range.column].get(at).copied().unwrap_or(false) {
                continue;
            }
            let Some((from, to)) = range.rows(batch.column(range.column)) else {
                continue;
            };
            start = start.max(from);
            end = end.min(to);
        }
        (start, end.max(start))
    }

    fn bytes(&self) -> usize {
        let arrays = self
            .min
            .iter()
            .chain(&self.max)
            .flatten()
            .chain(&self.null_counts)
            .chain(std::iter::once(&self.rows));
        let flags: usize = self.sorted.iter().map(Vec::capacity).sum();
        let bounds: usize = self
            .table_bounds
            .iter()
            .flat_map(|(min, max)| [min, max])
            .flatten()
            .map(ScalarValue::size)
            .sum();
        arrays.map(|a| a.get_array_memory_size()).sum::<usize>() + flags + bounds
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

/// Whether `column` has no nulls and never decreases, for the types whose order the
/// comparison kernels and SQL agree on (not floats: NaN; not intervals).
fn ascending(column: &ArrayRef) -> bool {
    let data_type = column.data_type();
    let orderable = matches!(
        data_type,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    ) || (data_type.is_primitive()
        && !data_type.is_floating()
        && !matches!(data_type, DataType::Interval(_)));
    if !orderable || column.logical_null_count() != 0 {
        return false;
    }
    let n = column.len();
    if n < 2 {
        return true;
    }
    lt_eq(&column.slice(0, n - 1), &column.slice(1, n - 1))
        .is_ok_and(|ordered| ordered.true_count() == n - 1)
}

/// One comparison of a column with a literal of the column's own type, from a query's
/// filters: on a batch where the column is sorted it bounds the rows that can pass.
#[derive(Debug)]
struct KeyRange {
    column: usize,
    /// `Eq`, `Lt`, `LtEq`, `Gt` or `GtEq`, with the column on the left.
    op: Operator,
    value: Scalar<ArrayRef>,
}

impl KeyRange {
    /// The comparisons among the conjuncts of `filters` (`key >= 10`, `10 < key`,
    /// `key BETWEEN 1 AND 5`, `key = 3`); anything else bounds nothing.
    fn from_filters(filters: &[Expr], schema: &SchemaRef) -> Vec<Self> {
        let range = [
            Operator::Eq,
            Operator::Lt,
            Operator::LtEq,
            Operator::Gt,
            Operator::GtEq,
        ];
        let key_range = |(column, op, value): (&Column, Operator, &ScalarValue)| {
            if !range.contains(&op) {
                return None;
            }
            let index = schema.index_of(column.name()).ok()?;
            // No cast here: a literal of another type compares under rules of its own.
            if value.is_null() || &value.data_type() != schema.field(index).data_type() {
                return None;
            }
            Some(Self {
                column: index,
                op,
                value: Scalar::new(value.to_array().ok()?),
            })
        };
        filters
            .iter()
            .flat_map(column_comparisons)
            .filter_map(key_range)
            .collect()
    }

    /// The ranges `conjunct` is, when it is nothing else: one comparison (two for
    /// `BETWEEN`) of a column that is not floating point with a literal of its type.
    fn only(conjunct: &Expr, schema: &SchemaRef) -> Option<Vec<Self>> {
        let comparisons = match conjunct {
            Expr::Between(_) => 2,
            _ => 1,
        };
        let ranges = Self::from_filters(std::slice::from_ref(conjunct), schema);
        let floating = |r: &Self| schema.field(r.column).data_type().is_floating();
        (ranges.len() == comparisons && !ranges.iter().any(floating)).then_some(ranges)
    }

    /// The rows `[from, to)` of `column`, sorted, that can pass; `None` if the column
    /// and the value cannot be compared. Binary searches: a batch costs a few
    /// comparisons, not one per row.
    fn rows(&self, column: &ArrayRef) -> Option<(usize, usize)> {
        let compare =
            make_comparator(column.as_ref(), self.value.get().0, SortOptions::default()).ok()?;
        let all = column.len();
        // In a sorted column, the rows below the value (or up to it) come first.
        let below = || partition_point(all, |i| compare(i, 0).is_lt());
        let up_to = || partition_point(all, |i| compare(i, 0).is_le());
        Some(match self.op {
            Operator::Gt => (up_to(), all),
            Operator::GtEq => (below(), all),
            Operator::Lt => (0, below()),
            Operator::LtEq => (0, up_to()),
            Operator::Eq => (below(), up_to()),
            _ => (0, all),
        })
    }
}

/// The first of `0..len` for which `before` is false, `before` being true for a prefix.
fn partition_point(len: usize, before: impl Fn(usize) -> bool) -> usize {
    let (mut low, mut high) = (0, len);
    while low < high {
        let middle = low + (high - low) / 2;
        if before(middle) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low
}

/// One of arrow's comparison kernels (`cmp::lt`, ...).
type Compare = fn(&dyn Datum, &dyn Datum) -> Result<BooleanArray, ArrowError>;

/// Clears the flags in `keep` of batches whose `bound` (one per batch) does not satisfy
/// `compare(bound, range's value)`; a batch with no bound keeps its flag.
fn narrow(
    keep: &mut Option<Vec<bool>>,
    bound: &Option<ArrayRef>,
    compare: Compare,
    range: &KeyRange,
    containers: usize,
) {
    let Some(bound) = bound else {
        return;
    };
    let Ok(allows) = compare(bound, &range.value) else {
        return;
    };
    if allows.len() != containers {
        return;
    }
    let keep = keep.get_or_insert_with(|| vec![true; containers]);
    for (k, allowed) in keep.iter_mut().zip(&allows) {
        // NULL: the batch has no bound for the column, and proves nothing.
        *k &= allowed.unwrap_or(true);
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

    #[test]
    fn table_bounds_span_the_batches_and_are_unknown_where_a_batch_has_none() {
        let pinned = sorted();
        // The oracle: the keys are 0..30; every batch has a key bound.
        assert_eq!(
            pinned.bounds()[0],
            (
                Some(ScalarValue::Int64(Some(0))),
                Some(ScalarValue::Int64(Some(29)))
            )
        );
        // The last batch's names are all NULL: it has no bound, so the table has none.
        assert_eq!(pinned.bounds()[1], (None, None));

        let schema = Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, false)]));
        let batch = |names: &[&str]| {
            let names = Arc::new(StringArray::from(names.to_vec()));
            RecordBatch::try_new(Arc::clone(&schema), vec![names]).unwrap()
        };
        let names = PinnedBatches::new(
            Arc::clone(&schema),
            vec![
                vec![batch(&["m", "q"]), batch(&["b", "k"])],
                vec![batch(&["z", "c"])],
            ],
        );
        assert_eq!(
            names.bounds()[0],
            (Some(ScalarValue::from("b")), Some(ScalarValue::from("z")))
        );
        // A batch whose maximum is too long to keep leaves the table's maximum unknown,
        // not the greatest of the others.
        let long = "y".repeat(MAX_STATISTIC_BYTES + 1);
        let names = PinnedBatches::new(
            Arc::clone(&schema),
            vec![vec![batch(&["m", "q"]), batch(&["b", &long])]],
        );
        assert_eq!(names.bounds()[0], (Some(ScalarValue::from("b")), None));
    }

    /// The keys of each batch selected, by partition.
    fn batch_keys(selected: &Selected) -> Vec<Vec<Vec<i64>>> {
        let keys = |b: &RecordBatch| {
            let keys = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            keys.values().to_vec()
        };
        let partition = |p: &Vec<RecordBatch>| p.iter().map(keys).collect();
        selected.partitions.iter().map(partition).collect()
    }

    /// The first key of each batch selected, by partition.
    fn keys(selected: &Selected) -> Vec<Vec<i64>> {
        let first = |p: Vec<Vec<i64>>| p.into_iter().map(|b| b[0]).collect();
        batch_keys(selected).into_iter().map(first).collect()
    }

    #[test]
    fn a_key_range_keeps_only_the_batches_it_overlaps() {
        let pinned = sorted();
        let state = SessionContext::new().state();
        let selected = pinned.select(
            &state,
            &[col("key").gt_eq(lit(12i64)), col("key").lt(lit(15i64))],
        );
        // The first key of each batch kept: the batch of 10..19, from 12 on (sorted).
        assert_eq!(keys(&selected), vec![vec![12], Vec::<i64>::new()]);
        assert_eq!((selected.total, selected.kept), (3, 1));

        // Across a batch boundary.
        let selected = pinned.select(&state, &[col("key").between(lit(9i64), lit(20i64))]);
        assert_eq!(keys(&selected), vec![vec![9, 10], vec![20]]);

        // Outside the table.
        let selected = pinned.select(&state, &[col("key").gt(lit(100i64))]);
        assert_eq!(keys(&selected), vec![Vec::<i64>::new(), vec![]]);
        assert_eq!(selected.kept, 0);
    }

    #[test]
    fn key_ranges_keep_what_a_pruning_predicate_keeps() {
        // Keys not sorted in any batch, so only the bounds decide; one batch of NULL names.
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let batch = |keys: &[i64], named: bool| {
            let names =
                StringArray::from_iter(keys.iter().map(|k| named.then(|| format!("n{k:03}"))));
            let keys = Int64Array::from(keys.to_vec());
            RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(keys), Arc::new(names)])
                .unwrap()
        };
        let pinned = PinnedBatches::new(
            Arc::clone(&schema),
            vec![
                vec![batch(&[5, 1, 9], true), batch(&[12, 3, 7], false)],
                vec![batch(&[20, 15, 30], true)],
            ],
        );
        let batches: Vec<&RecordBatch> = pinned.partitions.iter().flatten().collect();
        let state = SessionContext::new().state();
        type Make = fn(Expr, Expr) -> Expr;
        let ops: [Make; 5] = [
            |c, v| c.eq(v),
            |c, v| c.lt(v),
            |c, v| c.lt_eq(v),
            |c, v| c.gt(v),
            |c, v| c.gt_eq(v),
        ];
        let mut filters = vec![];
        for value in 0..=32i64 {
            for make in ops {
                filters.push(vec![make(col("key"), lit(value))]);
                filters.push(vec![make(lit(value), col("key"))]);
                filters.push(vec![make(col("name"), lit(format!("n{value:03}")))]);
            }
            filters.push(vec![col("key").between(lit(value), lit(value + 4))]);
            filters.push(vec![
                col("key").gt(lit(value)),
                col("name").lt_eq(lit(format!("n{:03}", value + 6))),
            ]);
        }
        for filters in filters {
            let selector = Selector::new(&state, &filters, &schema);
            assert!(matches!(selector.keep, Keep::ByRanges), "{filters:?}");
            let keep = selector
                .keep(&pinned.statistics)
                .unwrap_or_else(|| vec![true; 3]);
            // The oracle: DataFusion's pruning predicate over the same statistics.
            let oracle = Selector::pruning(&state, &filters, &schema)
                .unwrap()
                .prune(&pinned.statistics)
                .unwrap();
            for (i, batch) in batches.iter().enumerate() {
                assert_eq!(keep[i], oracle[i], "{filters:?}: batch {i}");
                // And every batch with a row that passes is kept.
                let df_schema = DFSchema::try_from(Arc::clone(&schema)).unwrap();
                let predicate = conjunction(filters.clone()).unwrap();
                let physical = state.create_physical_expr(predicate, &df_schema).unwrap();
                let passes = physical
                    .evaluate(batch)
                    .unwrap()
                    .into_array(batch.num_rows())
                    .unwrap();
                if passes
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .unwrap()
                    .true_count()
                    > 0
                {
                    assert!(keep[i], "{filters:?}: batch {i} has a passing row");
                }
            }
        }
        // A filter that is not a key range is decided by the predicate.
        let like = [col("name").like(lit("n01%"))];
        let by_ranges = |s: Selector| matches!(s.keep, Keep::ByRanges);
        assert!(!by_ranges(Selector::new(&state, &like, &schema)));
        let float = Arc::new(Schema::new(vec![Field::new("x", DataType::Float64, false)]));
        let on_float = [col("x").lt(lit(1.0f64))];
        assert!(!by_ranges(Selector::new(&state, &on_float, &float)));
    }

    #[test]
    fn exact_key_ranges_select_exactly_the_rows_that_pass() {
        // Sorted keys with runs of duplicates, some across batch boundaries.
        let schema = Arc::new(Schema::new(vec![Field::new("key", DataType::Int64, false)]));
        let batch = |keys: &[i64]| {
            let keys = Int64Array::from(keys.to_vec());
            RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(keys)]).unwrap()
        };
        let batches = vec![
            vec![batch(&[0, 0, 1, 2, 2, 2, 3]), batch(&[3, 3, 4, 5, 5])],
            vec![batch(&[5, 6, 7, 7])],
        ];
        let all: Vec<i64> = batches
            .iter()
            .flatten()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        let pinned = PinnedBatches::new(Arc::clone(&schema), batches);
        let state = SessionContext::new().state();
        type Check = fn(i64, i64) -> bool;
        type Make = fn(Expr, Expr) -> Expr;
        let ops: [(&str, Make, Check); 5] = [
            ("=", |c, v| c.eq(v), |k, v| k == v),
            ("<", |c, v| c.lt(v), |k, v| k < v),
            ("<=", |c, v| c.lt_eq(v), |k, v| k <= v),
            (">", |c, v| c.gt(v), |k, v| k > v),
            (">=", |c, v| c.gt_eq(v), |k, v| k >= v),
        ];
        let rows = |filter: &Expr| -> Vec<i64> {
            assert!(pinned.applies_exactly(filter), "{filter}");
            let selected = pinned.select(&state, std::slice::from_ref(filter));
            batch_keys(&selected)
                .into_iter()
                .flatten()
                .flatten()
                .collect()
        };
        let passing = |pass: &dyn Fn(i64) -> bool| -> Vec<i64> {
            all.iter().copied().filter(|&k| pass(k)).collect()
        };
        for value in -1..=8 {
            for (op, make, check) in ops {
                // `key OP value`, and `value OP key`.
                let filter = make(col("key"), lit(value));
                assert_eq!(rows(&filter), passing(&|k| check(k, value)), "{op}");
                let filter = make(lit(value), col("key"));
                assert_eq!(rows(&filter), passing(&|k| check(value, k)), "{op}");
            }
            let filter = col("key").between(lit(value), lit(value + 2));
            let want = passing(&|k| (value..=value + 2).contains(&k));
            assert_eq!(rows(&filter), want, "{filter}");
        }
    }

    #[test]
    fn only_comparisons_on_columns_sorted_everywhere_are_exact() {
        let pinned = sorted();
        let exact = [
            col("key").gt_eq(lit(12i64)).and(col("key").lt(lit(15i64))),
            col("key").between(lit(1i64), lit(4i64)),
        ];
        for filter in exact {
            assert!(pinned.applies_exactly(&filter), "{filter}");
        }
        let not_exact = [
            // Not sorted in every batch (the last has NULL names).
            col("name").eq(lit("n015")),
            // A literal of another type, another column, other operators.
            col("key").gt_eq(lit(12i32)),
            col("key").gt_eq(col("key")),
            col("key").not_eq(lit(3i64)),
            col("key").eq(lit(3i64)).or(col("key").eq(lit(5i64))),
            col("key").not_between(lit(1i64), lit(4i64)),
            col("key").between(lit(1i64), col("key")),
            col("key").gt(lit(ScalarValue::Int64(None))),
            col("key")
                .gt_eq(lit(12i64))
                .and(col("name").eq(lit("n015"))),
        ];
        for filter in not_exact {
            assert!(!pinned.applies_exactly(&filter), "{filter}");
        }
        // Floating point keys are never exact, sorted or not.
        let schema = Arc::new(Schema::new(vec![Field::new("f", DataType::Float64, false)]));
        let floats = Arc::new(datafusion::arrow::array::Float64Array::from(vec![
            0.0, 1.0, 2.0,
        ]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![floats]).unwrap();
        let pinned = PinnedBatches::new(schema, vec![vec![batch]]);
        assert!(!pinned.applies_exactly(&col("f").gt(lit(1.0))));
    }

    #[test]
    fn strings_and_null_counts_prune_too() {
        let pinned = sorted();
        let state = SessionContext::new().state();
        let selected = pinned.select(&state, &[col("name").eq(lit("n015"))]);
        assert_eq!(keys(&selected), vec![vec![15], Vec::<i64>::new()]);
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

    /// Every key of every batch selected, by partition.
    fn all_keys(selected: &Selected) -> Vec<Vec<i64>> {
        let flat = |p: Vec<Vec<i64>>| p.into_iter().flatten().collect();
        batch_keys(selected).into_iter().map(flat).collect()
    }

    #[test]
    fn a_sorted_column_narrows_each_batch_to_its_range() {
        let pinned = sorted();
        let state = SessionContext::new().state();
        // Filters, the keys passed on, and the rows skipped in batches the statistics kept.
        let cases: Vec<(Vec<Expr>, Vec<Vec<i64>>, usize)> = vec![
            (
                vec![col("key").gt_eq(lit(12i64)), col("key").lt(lit(15i64))],
                vec![vec![12, 13, 14], vec![]],
                7,
            ),
            (
                vec![col("key").gt(lit(7i64)).and(col("key").lt_eq(lit(21i64)))],
                vec![
                    vec![8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
                    vec![20, 21],
                ],
                16,
            ),
            // The literal first.
            (
                vec![lit(27i64).lt(col("key"))],
                vec![vec![], vec![28, 29]],
                8,
            ),
            (vec![col("key").eq(lit(10i64))], vec![vec![10], vec![]], 9),
            (
                vec![col("key").between(lit(9i64), lit(10i64))],
                vec![vec![9, 10], vec![]],
                18,
            ),
            // Sorted strings narrow too.
            (
                vec![col("name").lt(lit("n002"))],
                vec![vec![0, 1], vec![]],
                8,
            ),
        ];
        for (filters, expected, skipped) in cases {
            let selected = pinned.select(&state, &filters);
            assert_eq!(all_keys(&selected), expected, "{filters:?}");
            assert_eq!(selected.rows_skipped, skipped, "{filters:?}");
        }
    }

    #[test]
    fn only_sorted_columns_and_matching_types_narrow() {
        let state = SessionContext::new().state();
        let schema = Arc::new(Schema::new(vec![Field::new("key", DataType::Int64, true)]));
        let pin = |values: Vec<Option<i64>>| {
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from(values))],
            )
            .unwrap();
            PinnedBatches::new(Arc::clone(&schema), vec![vec![batch]])
        };
        // Unsorted, or sorted with a NULL: the whole batch goes to the filter.
        for values in [
            vec![Some(3), Some(1), Some(2)],
            vec![Some(1), Some(2), None],
        ] {
            let selected = pin(values).select(&state, &[col("key").gt(lit(1i64))]);
            assert_eq!(selected.partitions[0][0].num_rows(), 3);
            assert_eq!(selected.rows_skipped, 0);
        }
        // A literal of another type (no cast here) bounds nothing.
        let pinned = pin(vec![Some(1), Some(2), Some(3)]);
        let selected = pinned.select(&state, &[col("key").gt(lit(1i32))]);
        assert_eq!(selected.partitions[0][0].num_rows(), 3);
        // Sorted and of its type: narrowed.
        let selected = pinned.select(&state, &[col("key").gt(lit(1i64))]);
        assert_eq!(all_keys(&selected), vec![vec![2, 3]]);
        // NOT BETWEEN and != are not ranges.
        for filter in [
            col("key").not_between(lit(1i64), lit(2i64)),
            col("key").not_eq(lit(2i64)),
        ] {
            let selected = pinned.select(&state, &[filter]);
            assert_eq!(selected.partitions[0][0].num_rows(), 3);
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
