//! Caps on what one function call may produce.
//!
//! The memory pool bounds what operators reserve (sorts, joins, aggregations), but a
//! scalar function allocates its output outside it: `repeat('x', 800000000)` makes an
//! 800 MB string in one call, during execution or already during planning (constant
//! folding), and a chain of `||` or `concat` doubles what it is given. So the functions
//! that can make much more than they are given are wrapped: before the call, an estimate
//! of the output from the arguments (lengths and counts) must be within
//! `--max-function-output`; after it, so must the output itself. `||` on strings is
//! rewritten to a capped function of the same meaning and name.
//!
//! A call whose arguments are all constants is folded while planning, and DataFusion
//! then prints the folded value wherever it prints the plan: a constant may be at most
//! 1/256 of the cap (1 MiB by default, the size of the largest SQL text).
//!
//! The caps bound one call per batch. What many calls hold together is bounded by the
//! memory guard (`query::guard` of jemalloc's allocated bytes), which refuses new work
//! and cancels the largest query.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, LargeStringBuilder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::datatypes::{DataType, FieldRef, Int32Type, Int64Type};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{DFSchema, ExprSchema, Result, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::execution::{FunctionRegistry, SessionState};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::FunctionRewrite;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::preimage::PreimageResult;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, ExprSchemable, ExpressionPlacement, Operator,
    ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, StructFieldMapping,
    Volatility,
};

/// How a function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Estimate {
    /// `repeat(s, n)`: |s| × n.
    Repeat,
    /// `lpad`/`rpad(s, n [, fill])`: up to 4 bytes per character of n, plus |s|.
    Pad,
    /// `array_repeat(v, n)`: size of v × n.
    ArrayRepeat,
    /// `array_resize(a, n [, v])`: n elements.
    ArrayResize,
    /// `range`/`generate_series`: 8 bytes per element.
    Range,
    /// `replace(s, from, to)` and `regexp_replace(s, pattern, to, ...)`: every position
    /// of s may be replaced by `to`.
    Replace,
    /// `concat`, `array_concat`, `||`: the sum of the arguments.
    Sum,
    /// `concat_ws(sep, ...)`: the sum, and the separator between every two.
    SumWithSeparator,
}

/// The functions capped, by name (aliases are registered with them).
const CAPPED: [(&str, Estimate); 12] = [
    ("repeat", Estimate::Repeat),
    ("lpad", Estimate::Pad),
    ("rpad", Estimate::Pad),
    ("array_repeat", Estimate::ArrayRepeat),
    ("array_resize", Estimate::ArrayResize),
    ("range", Estimate::Range),
    ("generate_series", Estimate::Range),
    ("replace", Estimate::Replace),
    ("regexp_replace", Estimate::Replace),
    ("concat", Estimate::Sum),
    ("concat_ws", Estimate::SumWithSeparator),
    ("array_concat", Estimate::Sum),
];

/// Wraps the functions in [`CAPPED`] and rewrites string `||`, so that no call
/// produces more than `max_bytes`.
pub(crate) fn install(state: &mut SessionState, max_bytes: usize) -> Result<()> {
    for (name, estimate) in CAPPED {
        let Some(inner) = state.scalar_functions().get(name).cloned() else {
            continue;
        };
        let capped = ScalarUDF::new_from_impl(Capped {
            inner,
            estimate: Some(estimate),
            max_bytes,
        });
        state.register_udf(Arc::new(capped))?;
    }
    let concat = Arc::new(ScalarUDF::new_from_impl(StringConcat::new(max_bytes)));
    state.register_function_rewrite(Arc::new(CapStringConcat { concat }))?;
    Ok(())
}

/// A function with its output capped.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Capped {
    inner: Arc<ScalarUDF>,
    estimate: Option<Estimate>,
    max_bytes: usize,
}

/// What a call may produce: `max_bytes`, or 1/256 of it for a constant.
fn cap_for(args: &[ColumnarValue], max_bytes: usize) -> (usize, &'static str) {
    if args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
        (
            max_bytes / 256,
            "a constant may have (1/256 of --max-function-output)",
        )
    } else {
        (
            max_bytes,
            "one function call may produce (--max-function-output)",
        )
    }
}

fn too_large(name: &str, what: &str, bytes: usize, (max, rule): (usize, &str)) -> DataFusionError {
    DataFusionError::ResourcesExhausted(format!(
        "{name} {what} {bytes} bytes, over the {max} bytes {rule}"
    ))
}

// Delegates every method, so the wrapped function behaves exactly as before.
impl ScalarUDFImpl for Capped {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        #[allow(deprecated)]
        self.inner.inner().display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.inner().return_field_from_args(args)
    }

    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        #[allow(deprecated)]
        self.inner.inner().is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let cap = cap_for(&args.args, self.max_bytes);
        let name = format!("{}()", self.inner.name());
        if let Some(estimate) = self.estimate {
            let bytes = estimate_bytes(estimate, &args.args, args.number_rows)?;
            if bytes > cap.0 as u128 {
                let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
                return Err(too_large(&name, "would produce about", bytes, cap));
            }
        }
        let output = self.inner.invoke_with_args(args)?;
        let bytes = output_bytes(&output);
        if bytes > cap.0 {
            return Err(too_large(&name, "produced", bytes, cap));
        }
        Ok(output)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let updated = self.inner.inner().with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Capped {
            inner: Arc::new(updated),
            estimate: self.estimate,
            max_bytes: self.max_bytes,
        }))
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    /// Some functions fold literal arguments in `simplify` rather than in a call
    /// (`concat` joins adjacent literals): the same caps hold for what they fold.
    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        let cap = (
            self.max_bytes / 256,
            "a constant may have (1/256 of --max-function-output)",
        );
        let name = format!("{}()", self.inner.name());
        if matches!(
            self.estimate,
            Some(Estimate::Sum | Estimate::SumWithSeparator)
        ) {
            let literals: usize = args
                .iter()
                .map(|a| match a {
                    Expr::Literal(v, _) => scalar_size(v).max(0) as usize,
                    _ => 0,
                })
                .sum();
            if literals > cap.0 {
                return Err(too_large(
                    &name,
                    "would fold its literals into",
                    literals,
                    cap,
                ));
            }
        }
        let simplified = self.inner.inner().simplify(args, info)?;
        if let ExprSimplifyResult::Simplified(Expr::Literal(v, _)) = &simplified
            && v.size() > cap.0
        {
            return Err(too_large(&name, "folded into", v.size(), cap));
        }
        Ok(simplified)
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<PreimageResult> {
        self.inner.inner().preimage(args, lit_expr, info)
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.inner().short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.inner().evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.inner().propagate_constraints(interval, inputs)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<StructFieldMapping> {
        self.inner.inner().struct_field_mapping(literal_args)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.inner().output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.inner().documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

fn output_bytes(output: &ColumnarValue) -> usize {
    match output {
        ColumnarValue::Array(a) => a.get_array_memory_size(),
        ColumnarValue::Scalar(s) => s.size(),
    }
}

/// An argument, row by row, without materialising scalars (a scalar broadcast to a
/// batch of rows would be the very allocation this module prevents).
enum Values {
    /// The same value on every row.
    Scalar(Option<i128>),
    /// One value per row.
    Array(Vec<Option<i128>>),
}

impl Values {
    fn at(&self, row: usize) -> Option<i128> {
        match self {
            Values::Scalar(v) => *v,
            Values::Array(v) => v.get(row).copied().flatten(),
        }
    }
}

/// Integer arguments (counts, bounds), as i128.
fn ints(value: &ColumnarValue) -> Result<Values> {
    Ok(match value {
        ColumnarValue::Scalar(s) => Values::Scalar(int_of_scalar(s)),
        ColumnarValue::Array(a) => Values::Array(int_array(a)?),
    })
}

fn int_of_scalar(s: &ScalarValue) -> Option<i128> {
    if s.is_null() {
        return None;
    }
    let data_type = s.data_type();
    if data_type.is_integer() {
        return s.cast_to(&DataType::Int64).ok().and_then(|v| match v {
            ScalarValue::Int64(v) => v.map(i128::from),
            _ => None,
        });
    }
    match s {
        ScalarValue::Date32(v) => v.map(i128::from),
        ScalarValue::Date64(v) => v.map(|ms| i128::from(ms) / 86_400_000),
        ScalarValue::TimestampSecond(v, _) => v.map(|x| i128::from(x) * 1_000_000_000),
        ScalarValue::TimestampMillisecond(v, _) => v.map(|x| i128::from(x) * 1_000_000),
        ScalarValue::TimestampMicrosecond(v, _) => v.map(|x| i128::from(x) * 1_000),
        ScalarValue::TimestampNanosecond(v, _) => v.map(i128::from),
        // An interval step, in days for dates and nanoseconds for timestamps alike; a
        // month counts as 28 days, so counts are overestimated, never under.
        ScalarValue::IntervalMonthDayNano(Some(i)) => Some(
            i128::from(i.months) * 28 * 86_400_000_000_000
                + i128::from(i.days) * 86_400_000_000_000
                + i128::from(i.nanoseconds),
        ),
        ScalarValue::IntervalDayTime(Some(i)) => {
            Some(i128::from(i.days) * 86_400_000_000_000 + i128::from(i.milliseconds) * 1_000_000)
        }
        ScalarValue::IntervalYearMonth(Some(m)) => Some(i128::from(*m) * 28 * 86_400_000_000_000),
        _ => None,
    }
}

fn int_array(a: &ArrayRef) -> Result<Vec<Option<i128>>> {
    if a.data_type().is_integer() {
        let cast = cast(a, &DataType::Int64)?;
        let values: &Int64Array = cast.as_primitive::<Int64Type>();
        return Ok(values.iter().map(|v| v.map(i128::from)).collect());
    }
    // Dates, timestamps and intervals, value by value (rare: range over columns).
    (0..a.len())
        .map(|i| Ok(int_of_scalar(&ScalarValue::try_from_array(a, i)?)))
        .collect()
}

/// Byte sizes of an argument's values (string and binary bytes; list elements count
/// their values' bytes).
fn sizes(value: &ColumnarValue) -> Result<Values> {
    Ok(match value {
        ColumnarValue::Scalar(s) => Values::Scalar(Some(scalar_size(s))),
        ColumnarValue::Array(a) => Values::Array(array_sizes(a)?),
    })
}

fn scalar_size(s: &ScalarValue) -> i128 {
    if let Some(width) = s.data_type().primitive_width() {
        return width as i128;
    }
    match s {
        ScalarValue::Utf8(v) | ScalarValue::LargeUtf8(v) | ScalarValue::Utf8View(v) => {
            v.as_ref().map_or(0, |v| v.len() as i128)
        }
        ScalarValue::Binary(v) | ScalarValue::LargeBinary(v) | ScalarValue::BinaryView(v) => {
            v.as_ref().map_or(0, |v| v.len() as i128)
        }
        other => other.size() as i128,
    }
}

fn array_sizes(a: &ArrayRef) -> Result<Vec<Option<i128>>> {
    let rows = a.len();
    let lengths = match a.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => Some(length(a)?),
        _ => None,
    };
    if let Some(lengths) = lengths {
        return Ok(match lengths.data_type() {
            DataType::Int32 => lengths
                .as_primitive::<Int32Type>()
                .iter()
                .map(|v| Some(v.map_or(0, i128::from)))
                .collect(),
            _ => lengths
                .as_primitive::<Int64Type>()
                .iter()
                .map(|v| Some(v.map_or(0, i128::from)))
                .collect(),
        });
    }
    // Anything else: its memory spread evenly over its rows.
    let each = (a.get_array_memory_size() / rows.max(1)) as i128;
    Ok(vec![Some(each); rows])
}

/// The estimated output bytes of one call with `args` over `rows` rows.
fn estimate_bytes(estimate: Estimate, args: &[ColumnarValue], rows: usize) -> Result<u128> {
    let rows = if args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
        1
    } else {
        rows
    };
    let arg = |i: usize| args.get(i);
    let count = |v: Option<i128>| v.unwrap_or(0).max(0) as u128;
    let mut total: u128 = 0;
    match estimate {
        Estimate::Repeat | Estimate::ArrayRepeat | Estimate::Pad => {
            let (Some(value), Some(n)) = (arg(0), arg(1)) else {
                return Ok(0);
            };
            let (value, n) = (sizes(value)?, ints(n)?);
            for row in 0..rows {
                let n = count(n.at(row));
                total += match estimate {
                    Estimate::Pad => n * 4 + count(value.at(row)),
                    _ => n * count(value.at(row)).max(1),
                };
            }
        }
        Estimate::ArrayResize => {
            let Some(n) = arg(1) else { return Ok(0) };
            let n = ints(n)?;
            for row in 0..rows {
                total += count(n.at(row)) * 16;
            }
        }
        Estimate::Range => {
            let bounds: Vec<Values> = args.iter().map(ints).collect::<Result<_>>()?;
            for row in 0..rows {
                let at = |i: usize| bounds.get(i).and_then(|b| b.at(row));
                let (start, stop, step) = match bounds.len() {
                    1 => (Some(0), at(0), Some(1)),
                    2 => (at(0), at(1), Some(1)),
                    _ => (at(0), at(1), at(2)),
                };
                let (Some(start), Some(stop), Some(step)) = (start, stop, step) else {
                    continue;
                };
                // Dates count in days, their interval step in nanoseconds.
                let step = if matches!(args[0].data_type(), DataType::Date32 | DataType::Date64) {
                    (step / 86_400_000_000_000).max(1)
                } else {
                    step
                };
                if step != 0 {
                    total += ((stop - start) / step).unsigned_abs() + 1;
                }
            }
            total *= 8;
        }
        Estimate::Replace => {
            let (Some(text), Some(to)) = (arg(0), arg(2)) else {
                return Ok(0);
            };
            let (text, to) = (sizes(text)?, sizes(to)?);
            for row in 0..rows {
                let len = count(text.at(row));
                total += len + (len + 1) * count(to.at(row));
            }
        }
        Estimate::Sum | Estimate::SumWithSeparator => {
            let all: Vec<Values> = args.iter().map(sizes).collect::<Result<_>>()?;
            for row in 0..rows {
                if estimate == Estimate::SumWithSeparator {
                    total += count(all.first().and_then(|v| v.at(row))) * args.len() as u128;
                }
                for values in &all {
                    total += count(values.at(row));
                }
            }
        }
    }
    Ok(total)
}

/// Rewrites a chain `a || b || c ...` on strings into one call of [`StringConcat`],
/// which is capped. One call for the whole chain, not one per `||`: DataFusion names a
/// function call after its arguments' names, so a nested chain of n calls would cost
/// O(n²) to name and O(n³) to type, where the flat call costs O(n).
#[derive(Debug)]
struct CapStringConcat {
    concat: Arc<ScalarUDF>,
}

impl CapStringConcat {
    /// The arguments of `e` if it is already a [`StringConcat`] call.
    fn flattened(&self, e: Expr) -> std::result::Result<Vec<Expr>, Expr> {
        match e {
            Expr::ScalarFunction(f) if f.func.name() == self.concat.name() => Ok(f.args),
            other => Err(other),
        }
    }
}

impl FunctionRewrite for CapStringConcat {
    fn name(&self) -> &str {
        "CapStringConcat"
    }

    fn rewrite(
        &self,
        expr: Expr,
        schema: &DFSchema,
        _config: &ConfigOptions,
    ) -> Result<Transformed<Expr>> {
        let Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::StringConcat,
            right,
        }) = expr
        else {
            return Ok(Transformed::no(expr));
        };
        let string = |e: &Expr| match e {
            Expr::ScalarFunction(f) if f.func.name() == self.concat.name() => true,
            e => e.get_type(schema).is_ok_and(|t| {
                matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
            }),
        };
        if !(string(&left) && string(&right)) {
            return Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::StringConcat,
                right,
            })));
        }
        let mut args = self.flattened(*left).unwrap_or_else(|e| vec![e]);
        match self.flattened(*right) {
            Ok(more) => args.extend(more),
            Err(e) => args.push(e),
        }
        Ok(Transformed::yes(Expr::ScalarFunction(
            ScalarFunction::new_udf(Arc::clone(&self.concat), args),
        )))
    }
}

/// `a || b || ...` on strings, capped: NULL if any part is NULL, as `||` is, and named
/// `a || b || ...`, so column names are unchanged.
#[derive(Debug, PartialEq, Eq, Hash)]
struct StringConcat {
    signature: Signature,
    max_bytes: usize,
}

impl StringConcat {
    fn new(max_bytes: usize) -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
            max_bytes,
        }
    }
}

/// One argument of [`StringConcat`], row by row; a scalar is never broadcast.
enum Part {
    Scalar(Option<String>),
    Array(ArrayRef),
}

impl Part {
    fn new(value: &ColumnarValue) -> Result<Self> {
        Ok(match value {
            ColumnarValue::Scalar(s) => match s.cast_to(&DataType::LargeUtf8)? {
                ScalarValue::LargeUtf8(v) => Part::Scalar(v),
                other => Part::Scalar(Some(other.to_string())),
            },
            ColumnarValue::Array(a) => Part::Array(cast(a, &DataType::LargeUtf8)?),
        })
    }

    fn at(&self, row: usize) -> Option<&str> {
        match self {
            Part::Scalar(v) => v.as_deref(),
            Part::Array(a) => {
                let a = a.as_string::<i64>();
                a.is_valid(row).then(|| a.value(row))
            }
        }
    }
}

impl ScalarUDFImpl for StringConcat {
    fn name(&self) -> &str {
        "quiver_string_concat"
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        let parts: Vec<String> = args.iter().map(ToString::to_string).collect();
        Ok(parts.join(" || "))
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        let parts: Vec<String> = args.iter().map(|a| a.schema_name().to_string()).collect();
        Ok(parts.join(" || "))
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let common = if arg_types.contains(&DataType::Utf8View) {
            DataType::Utf8View
        } else if arg_types.contains(&DataType::LargeUtf8) {
            DataType::LargeUtf8
        } else {
            DataType::Utf8
        };
        Ok(vec![common; arg_types.len()])
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types.first().cloned().unwrap_or(DataType::Utf8))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let cap = cap_for(&args.args, self.max_bytes);
        let bytes = estimate_bytes(Estimate::Sum, &args.args, args.number_rows)?;
        if bytes > cap.0 as u128 {
            let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
            return Err(too_large("||", "would produce about", bytes, cap));
        }
        let scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let rows = if scalar { 1 } else { args.number_rows };
        let parts = args
            .args
            .iter()
            .map(Part::new)
            .collect::<Result<Vec<_>>>()?;
        let mut out = LargeStringBuilder::with_capacity(rows, usize::try_from(bytes).unwrap_or(0));
        let mut value = String::new();
        for row in 0..rows {
            value.clear();
            let mut null = false;
            for part in &parts {
                match part.at(row) {
                    Some(s) => value.push_str(s),
                    None => {
                        null = true;
                        break;
                    }
                }
            }
            if null {
                out.append_null();
            } else {
                out.append_value(&value);
            }
        }
        let array: ArrayRef = Arc::new(out.finish());
        let array = cast(&array, args.return_field.data_type())?;
        if scalar {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                &array, 0,
            )?));
        }
        Ok(ColumnarValue::Array(array))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_int(v: i64) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Int64(Some(v)))
    }

    fn scalar_str(s: &str) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Utf8(Some(s.into())))
    }

    #[test]
    fn estimates_follow_the_arguments() {
        let e =
            |estimate, args: &[ColumnarValue], rows| estimate_bytes(estimate, args, rows).unwrap();
        assert_eq!(
            e(
                Estimate::Repeat,
                &[scalar_str("ab"), scalar_int(800_000_000)],
                1
            ),
            1_600_000_000
        );
        assert_eq!(
            e(Estimate::Repeat, &[scalar_str("ab"), scalar_int(-5)], 1),
            0
        );
        // A column of counts sums over its rows.
        let counts: ArrayRef = Arc::new(Int64Array::from(vec![10, 20, 30]));
        assert_eq!(
            e(
                Estimate::Repeat,
                &[scalar_str("x"), ColumnarValue::Array(counts)],
                3
            ),
            60
        );
        assert_eq!(
            e(
                Estimate::Range,
                &[scalar_int(1), scalar_int(1_000_000_000)],
                1
            ),
            8_000_000_000
        );
        assert_eq!(
            e(
                Estimate::Range,
                &[scalar_int(0), scalar_int(100), scalar_int(0)],
                1
            ),
            0
        );
        assert!(e(Estimate::Pad, &[scalar_str("a"), scalar_int(1 << 40)], 1) > 1 << 40);
        assert!(
            e(
                Estimate::Replace,
                &[
                    scalar_str(&"a".repeat(1000)),
                    scalar_str("a"),
                    scalar_str(&"b".repeat(1000))
                ],
                1
            ) >= 1_000_000
        );
    }
}
