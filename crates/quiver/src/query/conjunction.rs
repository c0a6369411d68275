//! A filter's cheap conjuncts, evaluated on every row of a batch and combined bit by bit.
//!
//! DataFusion 55 evaluates `a AND b` by evaluating `a`, and, when it passes at most 20%
//! of the batch's rows, evaluating `b` only on those rows: it filters the batch down to
//! them and scatters `b`'s answers back one run of selected rows at a time (a
//! `BooleanArray::slice` and a builder append per run). A filter of several conjuncts
//! does that once per conjunct after the first selective one. That saves work when `b`
//! is expensive (a `LIKE`, a function call); when `b` is a comparison (a nanosecond or
//! two a row) the filtering and scattering cost far more than comparing every row: TPC-H
//! Q12's lineitem filter (a ship mode in two values, two date comparisons between
//! columns, a year of receipt dates) took 25-33 ns a row in its `FilterExec`.
//!
//! So a `FilterExec`'s conjuncts that are comparisons of columns and literals of one type
//! (and `AND`, `OR`, `NOT`, `IS [NOT] NULL`, `IN` lists of literals over them: nothing
//! that can fail or costs more than a comparison) are evaluated as one [`AllOf`]: each on
//! every row, combined with `and_kleene`, stopping early once no row can pass. The
//! other conjuncts follow it, evaluated by DataFusion on the rows it passes.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::compute::kernels::boolean::and_kleene;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Result, internal_err};
use datafusion::logical_expr::{ColumnarValue, Operator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{
    BinaryExpr, Column, InListExpr, IsNotNullExpr, IsNullExpr, Literal, NotExpr,
};
use datafusion::physical_expr::utils::{conjunction, split_conjunction};
use datafusion::physical_expr_common::physical_expr::proto_encode::PhysicalExprEncodeCtx;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion_proto_models::protobuf::PhysicalExprNode;

use super::node_rule::NodeRule;

/// Evaluates the cheap conjuncts of every `FilterExec` as one [`AllOf`].
pub(crate) const WHOLE_CHEAP_CONJUNCTS: NodeRule = NodeRule {
    name: "WholeCheapConjuncts",
    rewrite: whole_cheap_conjuncts,
};

fn whole_cheap_conjuncts(
    plan: Arc<dyn ExecutionPlan>,
) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    let Some(filter) = plan.downcast_ref::<FilterExec>() else {
        return Ok(Transformed::no(plan));
    };
    let schema = filter.input().schema();
    let (cheap, rest): (Vec<_>, Vec<_>) = split_conjunction(filter.predicate())
        .into_iter()
        .cloned()
        .partition(|conjunct| is_cheap(conjunct, &schema));
    if cheap.len() < 2 {
        return Ok(Transformed::no(plan));
    }
    let whole: Arc<dyn PhysicalExpr> = Arc::new(AllOf { conjuncts: cheap });
    let predicate = conjunction(std::iter::once(whole).chain(rest));
    let filter = FilterExecBuilder::from(filter)
        .with_predicate(predicate)
        .build()?;
    Ok(Transformed::yes(Arc::new(filter)))
}

/// Whether `expr` costs about a comparison a row and cannot fail.
fn is_cheap(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> bool {
    if expr.downcast_ref::<Column>().is_some() || expr.downcast_ref::<Literal>().is_some() {
        return true;
    }
    if let Some(binary) = expr.downcast_ref::<BinaryExpr>() {
        let (left, right) = (binary.left(), binary.right());
        if !(is_cheap(left, schema) && is_cheap(right, schema)) {
            return false;
        }
        return match binary.op() {
            Operator::And | Operator::Or => true,
            Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom => {
                match (left.data_type(schema), right.data_type(schema)) {
                    (Ok(left), Ok(right)) => left == right && !left.is_nested(),
                    _ => false,
                }
            }
            _ => false,
        };
    }
    if let Some(not) = expr.downcast_ref::<NotExpr>() {
        return is_cheap(not.arg(), schema);
    }
    if let Some(is_null) = expr.downcast_ref::<IsNullExpr>() {
        return is_cheap(is_null.arg(), schema);
    }
    if let Some(is_not_null) = expr.downcast_ref::<IsNotNullExpr>() {
        return is_cheap(is_not_null.arg(), schema);
    }
    if let Some(in_list) = expr.downcast_ref::<InListExpr>() {
        return in_list.expr().downcast_ref::<Column>().is_some()
            && in_list
                .list()
                .iter()
                .all(|item| item.downcast_ref::<Literal>().is_some());
    }
    false
}

/// The conjunction of boolean expressions, each evaluated on every row (see the module
/// documentation). Displayed, and sent to cluster workers, as the `AND` of them.
#[derive(Debug)]
pub(crate) struct AllOf {
    conjuncts: Vec<Arc<dyn PhysicalExpr>>,
}

impl AllOf {
    fn as_and(&self) -> Arc<dyn PhysicalExpr> {
        conjunction(self.conjuncts.iter().cloned())
    }
}

impl PartialEq for AllOf {
    fn eq(&self, other: &Self) -> bool {
        self.conjuncts.len() == other.conjuncts.len()
            && self
                .conjuncts
                .iter()
                .zip(&other.conjuncts)
                .all(|(a, b)| a.as_ref() == b.as_ref())
    }
}

impl Eq for AllOf {}

impl Hash for AllOf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for conjunct in &self.conjuncts {
            conjunct.hash(state);
        }
    }
}

impl fmt::Display for AllOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_and())
    }
}

impl PhysicalExpr for AllOf {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        for conjunct in &self.conjuncts {
            if conjunct.nullable(input_schema)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let rows = batch.num_rows();
        let mut passed: Option<BooleanArray> = None;
        for conjunct in &self.conjuncts {
            let value = conjunct.evaluate(batch)?.into_array(rows)?;
            let Some(value) = value.as_boolean_opt() else {
                return internal_err!("a conjunct evaluated to {}", value.data_type());
            };
            let combined = match passed {
                None => value.clone(),
                Some(passed) => and_kleene(&passed, value)?,
            };
            // No row true or unknown: false whatever the rest says.
            if combined.null_count() == 0 && !combined.has_true() {
                return Ok(ColumnarValue::Array(Arc::new(combined)));
            }
            passed = Some(combined);
        }
        match passed {
            Some(passed) => Ok(ColumnarValue::Array(Arc::new(passed))),
            None => internal_err!("a conjunction of no conjuncts"),
        }
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        self.conjuncts.iter().collect()
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        Ok(Arc::new(Self {
            conjuncts: children,
        }))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_and().fmt_sql(f)
    }

    /// A worker gets the plain `AND`.
    fn try_to_proto(&self, ctx: &PhysicalExprEncodeCtx<'_>) -> Result<Option<PhysicalExprNode>> {
        ctx.encode_child(&self.as_and()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::{ArrayRef, Int64Array, StringViewArray};
    use datafusion::arrow::datatypes::Field;
    use datafusion::common::ScalarValue;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::physical_expr::expressions::{
        binary, col, in_list, is_not_null, is_null, lit, not,
    };

    /// Rows of (a, b, s) with nulls in each, from a small seeded generator.
    fn batch(rows: usize) -> RecordBatch {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut ints = |modulo| -> Int64Array {
            (0..rows)
                .map(|_| {
                    let v = next();
                    (v % 13 != 0).then_some((v % modulo) as i64)
                })
                .collect()
        };
        let (a, b) = (ints(100), ints(100));
        let names = ["MAIL", "SHIP", "TRUCK", "a string longer than twelve"];
        let s: StringViewArray = (0..rows)
            .map(|i| (i % 17 != 0).then(|| names[i % names.len()]))
            .collect();
        let schema = Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("s", DataType::Utf8View, true),
        ]);
        let columns: Vec<ArrayRef> = vec![Arc::new(a), Arc::new(b), Arc::new(s)];
        RecordBatch::try_new(Arc::new(schema), columns).unwrap()
    }

    fn string(value: &str) -> Arc<dyn PhysicalExpr> {
        lit(ScalarValue::Utf8View(Some(value.to_string())))
    }

    #[test]
    fn answers_as_datafusion_evaluates_the_and() {
        let batch = batch(8192);
        let schema = batch.schema();
        let c = |name| col(name, &schema).unwrap();
        let cmp = |left, op, right| binary(left, op, right, &schema).unwrap();
        let conjuncts = [
            cmp(
                cmp(c("s"), Operator::Eq, string("MAIL")),
                Operator::Or,
                cmp(c("s"), Operator::Eq, string("a string longer than twelve")),
            ),
            cmp(c("a"), Operator::Gt, c("b")),
            cmp(c("a"), Operator::GtEq, lit(20i64)),
            not(cmp(c("b"), Operator::Eq, lit(3i64))).unwrap(),
            is_null(c("b")).unwrap(),
            in_list(c("a"), vec![lit(21i64), lit(50i64)], &false, &schema).unwrap(),
        ];
        // No row passes the first two of these: the early exit is taken.
        let none_pass = vec![
            is_not_null(c("a")).unwrap(),
            cmp(c("a"), Operator::Lt, lit(0i64)),
            cmp(c("b"), Operator::Gt, lit(3i64)),
        ];
        let lists = (2..=conjuncts.len())
            .map(|count| conjuncts[..count].to_vec())
            .chain([none_pass]);
        for conjuncts in lists {
            let count = conjuncts.len();
            assert!(conjuncts.iter().all(|c| is_cheap(c, &schema)));
            let and = conjunction(conjuncts.iter().cloned());
            let all_of = AllOf { conjuncts };
            let expected = and.evaluate(&batch).unwrap().into_array(8192).unwrap();
            let actual = all_of.evaluate(&batch).unwrap().into_array(8192).unwrap();
            assert_eq!(
                actual.as_boolean(),
                expected.as_boolean(),
                "{count} conjuncts"
            );
        }
    }

    #[test]
    fn a_filter_evaluates_its_cheap_conjuncts_whole() {
        let batch = batch(64);
        let schema = batch.schema();
        let c = |name| col(name, &schema).unwrap();
        let cmp = |left, op, right| binary(left, op, right, &schema).unwrap();
        let like = Arc::new(datafusion::physical_expr::expressions::LikeExpr::new(
            false,
            false,
            c("s"),
            string("%AI%"),
        )) as Arc<dyn PhysicalExpr>;
        let predicate = conjunction([
            cmp(c("a"), Operator::Gt, c("b")),
            Arc::clone(&like),
            cmp(c("a"), Operator::Lt, lit(90i64)),
        ]);
        let input = MemorySourceConfig::try_new_exec(&[vec![batch]], schema, None).unwrap();
        let filter = Arc::new(FilterExec::try_new(predicate, input).unwrap());
        let rewritten = whole_cheap_conjuncts(filter).unwrap();
        assert!(rewritten.transformed);
        let rewritten = rewritten.data;
        let rewritten = rewritten.downcast_ref::<FilterExec>().unwrap();
        let [whole, rest] = &split_conjunction(rewritten.predicate())[..] else {
            panic!("{}", rewritten.predicate());
        };
        let whole = whole.downcast_ref::<AllOf>().expect("the cheap conjuncts");
        assert_eq!(whole.to_string(), "a@0 > b@1 AND a@0 < 90");
        assert_eq!(rest.to_string(), like.to_string());
    }
}
