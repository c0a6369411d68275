//! A partitioned hash join's runtime filter, evaluated by routing each row once.
//!
//! When a hash join runs partitioned, DataFusion 55 gives the probe side's scan one
//! filter for all the join's partitions:
//!
//! ```text
//! CASE hash_repartition(key) % N
//!   WHEN 0 THEN key >= min0 AND key <= max0 AND hash_lookup0
//!   WHEN 1 THEN key >= min1 AND key <= max1 AND hash_lookup1
//!   ...
//!   ELSE false
//! END
//! ```
//!
//! `CaseExpr` evaluates it branch by branch: each branch compares every remaining row's
//! route with its value, filters the remaining rows twice (those it takes, those it
//! leaves), and at the end `merge_n` interleaves the branches' results row by row. With
//! the rows of a batch spread evenly over the partitions that is most of the filter's
//! cost: TPC-H Q12's runtime filter on `orders` took 46 ns a row in the decoder, of which
//! the hash lookups were a fifth. [`RoutedCase`] evaluates the same expression in one pass
//! over the routes: it buckets the row numbers by branch, evaluates each branch once on
//! the rows it takes (`take`), and writes each branch's answers straight into the result's
//! bits. Anything that is not a CASE over `UInt64` routes with literal `WHEN`s and a
//! boolean or null `ELSE` is left to DataFusion.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, BooleanBufferBuilder, UInt32Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{DataType, Schema, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{CaseExpr, Literal};

/// The largest route value routed through a table; a CASE with larger `WHEN` values is
/// left to DataFusion (a join has one branch per partition, a few hundred at most).
const MOST_ROUTES: u64 = 4096;

/// No branch takes this route: the row gets the `ELSE` value.
const NO_BRANCH: u32 = u32::MAX;

/// A CASE over route numbers, evaluated one pass per batch (see the module documentation).
#[derive(Debug)]
pub(crate) struct RoutedCase {
    /// The route of each row, a `UInt64`.
    route: Arc<dyn PhysicalExpr>,
    /// Which branch takes each route value, [`NO_BRANCH`] for none.
    branch_of: Vec<u32>,
    /// Each branch's boolean `THEN`.
    then: Vec<Arc<dyn PhysicalExpr>>,
    /// The `ELSE` value: `None` is null.
    otherwise: Option<bool>,
}

impl RoutedCase {
    /// `expr` routed, if it is a CASE of that shape over `schema`.
    pub(crate) fn of(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Option<Self> {
        let case = expr.downcast_ref::<CaseExpr>()?;
        let route = case.expr()?;
        if route.data_type(schema).ok()? != DataType::UInt64 {
            return None;
        }
        let otherwise = match case.else_expr() {
            None => None,
            Some(otherwise) => match otherwise.downcast_ref::<Literal>()?.value() {
                ScalarValue::Boolean(value) => *value,
                _ => return None,
            },
        };
        let mut branch_of = vec![];
        let mut then = vec![];
        for (when, then_expr) in case.when_then_expr() {
            let ScalarValue::UInt64(Some(value)) = when.downcast_ref::<Literal>()?.value() else {
                return None;
            };
            if *value >= MOST_ROUTES || then_expr.data_type(schema).ok()? != DataType::Boolean {
                return None;
            }
            let value = *value as usize;
            if branch_of.len() <= value {
                branch_of.resize(value + 1, NO_BRANCH);
            }
            // A repeated WHEN value never matches: the first branch takes its rows.
            if branch_of[value] == NO_BRANCH {
                branch_of[value] = then.len() as u32;
            }
            then.push(Arc::clone(then_expr));
        }
        Some(Self {
            route: Arc::clone(route),
            branch_of,
            then,
            otherwise,
        })
    }

    /// The CASE's value for each row of `batch`, as `CaseExpr` would compute it.
    pub(crate) fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let rows = batch.num_rows();
        let routes = self.route.evaluate(batch)?.into_array(rows)?;
        let Some(routes) = routes.as_primitive_opt::<UInt64Type>() else {
            return internal_err!("a routed CASE's route is {}", routes.data_type());
        };
        // Row numbers by branch; rows of no branch (a null route included) take ELSE.
        let mut taken: Vec<Vec<u32>> = vec![vec![]; self.then.len()];
        for (row, route) in routes.iter().enumerate() {
            let branch = route
                .and_then(|route| self.branch_of.get(route as usize))
                .copied()
                .unwrap_or(NO_BRANCH);
            if branch != NO_BRANCH {
                taken[branch as usize].push(row as u32);
            }
        }
        let mut values = BooleanBufferBuilder::new(rows);
        values.append_n(rows, self.otherwise.unwrap_or(false));
        let mut valid = BooleanBufferBuilder::new(rows);
        valid.append_n(rows, self.otherwise.is_some());
        for (then, rows_taken) in self.then.iter().zip(taken) {
            if rows_taken.is_empty() {
                continue;
            }
            if rows_taken.len() == rows {
                // One branch takes every row (a file of one partition's keys).
                return then.evaluate(batch);
            }
            let count = rows_taken.len();
            let indices = UInt32Array::from(rows_taken);
            let answers = match then.evaluate(&take_record_batch(batch, &indices)?)? {
                ColumnarValue::Scalar(ScalarValue::Boolean(value)) => {
                    for row in indices.values() {
                        values.set_bit(*row as usize, value.unwrap_or(false));
                        valid.set_bit(*row as usize, value.is_some());
                    }
                    continue;
                }
                answers => answers.into_array(count)?,
            };
            let Some(answers) = answers.as_boolean_opt() else {
                return internal_err!("a routed CASE's branch is {}", answers.data_type());
            };
            for (answer, row) in indices.values().iter().enumerate() {
                let row = *row as usize;
                values.set_bit(row, answers.value(answer));
                valid.set_bit(row, answers.is_valid(answer));
            }
        }
        let nulls = NullBuffer::new(valid.finish());
        let nulls = (nulls.null_count() > 0).then_some(nulls);
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::new(
            values.finish(),
            nulls,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::{ArrayRef, Int64Array};
    use datafusion::arrow::datatypes::Field;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, lit};

    /// A batch of keys (some null) and a second column, from a small seeded generator.
    fn batch(rows: usize, seed: u64) -> RecordBatch {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let keys: Int64Array = (0..rows)
            .map(|_| {
                let value = next();
                (value % 11 != 0).then_some((value % 1000) as i64)
            })
            .collect();
        let other: Int64Array = (0..rows).map(|_| Some((next() % 100) as i64)).collect();
        let schema = Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, false),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(keys) as ArrayRef, Arc::new(other)],
        )
        .unwrap()
    }

    fn binary(
        left: Arc<dyn PhysicalExpr>,
        op: Operator,
        right: Arc<dyn PhysicalExpr>,
    ) -> Arc<dyn PhysicalExpr> {
        Arc::new(BinaryExpr::new(left, op, right))
    }

    fn column(name: &str, index: usize) -> Arc<dyn PhysicalExpr> {
        Arc::new(Column::new(name, index))
    }

    /// `CASE CAST(k AS UInt64) % partitions WHEN 0 THEN .. END`, branches of the join's
    /// kinds: bounds and a membership-like test, an empty partition (`false`), a canceled
    /// one (`true`), one that can be null.
    fn routed_case(partitions: u64, otherwise: Option<Option<bool>>) -> Arc<dyn PhysicalExpr> {
        let route = binary(
            Arc::new(CastExpr::new(column("k", 0), DataType::UInt64, None)),
            Operator::Modulo,
            lit(ScalarValue::UInt64(Some(partitions))),
        );
        let branches = (0..partitions)
            .map(|partition| {
                let then = match partition % 4 {
                    0 => binary(
                        binary(column("k", 0), Operator::GtEq, lit(100i64)),
                        Operator::And,
                        binary(column("v", 1), Operator::Lt, lit(7i64)),
                    ),
                    1 => lit(false),
                    2 => lit(true),
                    _ => binary(column("k", 0), Operator::Lt, lit(500i64)),
                };
                (lit(ScalarValue::UInt64(Some(partition))), then)
            })
            .collect();
        let otherwise = otherwise.map(|value| lit(ScalarValue::Boolean(value)));
        Arc::new(CaseExpr::try_new(Some(route), branches, otherwise).unwrap())
    }

    #[test]
    fn routes_as_datafusion_evaluates_the_case() {
        for partitions in [1, 2, 3, 8, 33] {
            for otherwise in [Some(Some(false)), Some(Some(true)), None] {
                for rows in [0, 1, 7, 8192] {
                    let batch = batch(rows, partitions * 31 + rows as u64);
                    let case = routed_case(partitions, otherwise);
                    let routed = RoutedCase::of(&case, &batch.schema()).expect("a routed CASE");
                    let expected = case.evaluate(&batch).unwrap().into_array(rows).unwrap();
                    let actual = routed.evaluate(&batch).unwrap().into_array(rows).unwrap();
                    assert_eq!(
                        actual.as_boolean(),
                        expected.as_boolean(),
                        "{partitions} partitions, ELSE {otherwise:?}, {rows} rows"
                    );
                }
            }
        }
    }

    #[test]
    fn other_cases_are_left_to_datafusion() {
        let schema = batch(0, 0).schema();
        // Routes of another type.
        let signed = Arc::new(
            CaseExpr::try_new(
                Some(column("k", 0)),
                vec![(lit(1i64), lit(true))],
                Some(lit(false)),
            )
            .unwrap(),
        ) as Arc<dyn PhysicalExpr>;
        assert!(RoutedCase::of(&signed, &schema).is_none());
        // A CASE without a route (`CASE WHEN .. THEN`).
        let searched = Arc::new(
            CaseExpr::try_new(
                None,
                vec![(binary(column("k", 0), Operator::Lt, lit(3i64)), lit(true))],
                Some(lit(false)),
            )
            .unwrap(),
        ) as Arc<dyn PhysicalExpr>;
        assert!(RoutedCase::of(&searched, &schema).is_none());
        // Not a CASE at all.
        assert!(RoutedCase::of(&lit(true), &schema).is_none());
    }
}
