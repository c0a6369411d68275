//! Query parameters: `?` placeholders numbered on the parsed statement, and bound values
//! cast to the types DataFusion infers.
//!
//! ADBC's DB-API (paramstyle `qmark`) and JDBC write `?`; DataFusion binds `$1..$n`.
//! The `?`s are numbered by their position in the text (their spans), not by string
//! replacement, so a `?` inside a string literal or a quoted name is left alone.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, Statement, Value, ValueWithSpan, visit_expressions, visit_expressions_mut,
};

use crate::error::{Error, Result};

/// Rewrites `?` (and `?N`) placeholders to `$N`. `?`s are numbered left to right; a
/// statement may use `?` or `$N`, not both.
pub(crate) fn number_placeholders(statement: &mut DfStatement) -> Result<()> {
    match statement {
        DfStatement::Statement(s) => number_in(s),
        DfStatement::Explain(e) => number_placeholders(&mut e.statement),
        _ => Ok(()),
    }
}

fn number_in(statement: &mut Statement) -> Result<()> {
    // Positions of the bare `?`s, in text order.
    let mut bare = vec![];
    let (mut dollar, mut numbered) = (false, false);
    let _ = visit_expressions(statement, |expr| {
        if let Some((name, span)) = placeholder(expr) {
            if name == "?" {
                bare.push((span.start.line, span.start.column));
            } else if name.starts_with('?') {
                numbered = true;
            } else if name.starts_with('$') {
                dollar = true;
            }
        }
        ControlFlow::<()>::Continue(())
    });
    if bare.is_empty() && !numbered {
        return Ok(());
    }
    if dollar && !bare.is_empty() {
        return Err(Error::invalid(
            "the statement mixes ? and $N placeholders: use one style",
        ));
    }
    bare.sort_unstable();
    let rank: HashMap<(u64, u64), usize> = bare
        .iter()
        .enumerate()
        .map(|(i, position)| (*position, i + 1))
        .collect();
    if rank.len() != bare.len() {
        return Err(Error::Internal(
            "two ? placeholders share a position in the SQL text".into(),
        ));
    }
    let _ = visit_expressions_mut(statement, |expr| {
        if let Expr::Value(ValueWithSpan {
            value: Value::Placeholder(name),
            span,
        }) = expr
        {
            if name == "?" {
                *name = format!("${}", rank[&(span.start.line, span.start.column)]);
            } else if let Some(n) = name.strip_prefix('?') {
                // JDBC-style numbered `?N`.
                *name = format!("${n}");
            }
        }
        ControlFlow::<()>::Continue(())
    });
    Ok(())
}

fn placeholder(expr: &Expr) -> Option<(&str, &datafusion::sql::sqlparser::tokenizer::Span)> {
    match expr {
        Expr::Value(ValueWithSpan {
            value: Value::Placeholder(name),
            span,
        }) => Some((name.as_str(), span)),
        _ => None,
    }
}

/// The parameter types of a plan, `$1` first; `None` where DataFusion could not infer
/// one (the value is then used as sent).
///
/// A statement with n distinct placeholders may number them up to `$n`: the list is
/// sized by what the statement holds, never by the number a client wrote (`$3000000`
/// alone would otherwise allocate three million entries).
pub(crate) fn parameter_types(
    types: HashMap<String, Option<DataType>>,
) -> Result<Vec<Option<DataType>>> {
    let count = types.len();
    let mut numbered = Vec::with_capacity(count);
    for (name, data_type) in types {
        let n: usize = name
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "placeholder '{}' is not positional: use ? or $1, $2, ...",
                    shorten(&name)
                ))
            })?;
        if n > count {
            return Err(Error::invalid(format!(
                "placeholder '{}' is numbered beyond the statement's {count} distinct \
                 placeholder(s): number them $1 to ${count}",
                shorten(&name)
            )));
        }
        numbered.push((n, data_type));
    }
    let mut out = vec![None; count];
    for (n, data_type) in numbered {
        out[n - 1] = data_type;
    }
    Ok(out)
}

/// A client's placeholder name, cut for a message.
fn shorten(name: &str) -> String {
    const MAX: usize = 40;
    match name.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &name[..end]),
        None => name.to_string(),
    }
}

/// Casts bound values to the parameter types (ADBC sends Python ints as int64 and
/// strings as utf8, whatever the column's type).
pub(crate) fn cast_params(
    values: Vec<ScalarValue>,
    types: &[Option<DataType>],
) -> Result<Vec<ScalarValue>> {
    if values.len() != types.len() {
        return Err(Error::invalid(format!(
            "the statement has {} parameter(s) but {} value(s) were bound",
            types.len(),
            values.len()
        )));
    }
    values
        .into_iter()
        .zip(types)
        .enumerate()
        .map(|(i, (value, data_type))| match data_type {
            Some(t) if value.data_type() != *t => value.cast_to(t).map_err(|e| {
                Error::invalid(format!(
                    "parameter ${} is {} but the statement needs {t}: {}",
                    i + 1,
                    value.data_type(),
                    e.strip_backtrace()
                ))
            }),
            _ => Ok(value),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn numbered(sql: &str) -> Result<String> {
        let mut statement = DFParser::parse_sql(sql).unwrap().pop_front().unwrap();
        number_placeholders(&mut statement)?;
        Ok(statement.to_string())
    }

    #[test]
    fn qmarks_are_numbered_in_text_order() {
        assert_eq!(
            numbered("SELECT ? + 1 FROM t WHERE a = ? AND b IN (?, '?')").unwrap(),
            "SELECT $1 + 1 FROM t WHERE a = $2 AND b IN ($3, '?')"
        );
        // Subqueries and CTEs, where AST order and text order could differ.
        assert_eq!(
            numbered("WITH c AS (SELECT ? AS x) SELECT * FROM c WHERE x > (SELECT ?)").unwrap(),
            "WITH c AS (SELECT $1 AS x) SELECT * FROM c WHERE x > (SELECT $2)"
        );
        assert_eq!(
            numbered("SELECT * FROM t WHERE a = $2 OR b = $1").unwrap(),
            "SELECT * FROM t WHERE a = $2 OR b = $1"
        );
        assert_eq!(numbered("SELECT ?2, ?1").unwrap(), "SELECT $2, $1");
        assert!(numbered("SELECT ?, $1").is_err());
    }

    #[test]
    fn types_and_casts() {
        let types = parameter_types(HashMap::from([
            ("$2".to_string(), Some(DataType::Int32)),
            ("$1".to_string(), None),
        ]))
        .unwrap();
        assert_eq!(types, vec![None, Some(DataType::Int32)]);
        let cast = cast_params(
            vec![ScalarValue::from("x"), ScalarValue::Int64(Some(7))],
            &types,
        )
        .unwrap();
        assert_eq!(cast[1], ScalarValue::Int32(Some(7)));
        assert!(cast_params(vec![], &types).is_err());
        let e = cast_params(
            vec![ScalarValue::from("x"), ScalarValue::from("seven")],
            &types,
        )
        .unwrap_err();
        assert!(e.to_string().contains("parameter $2"), "{e}");
        assert!(parameter_types(HashMap::from([("$name".to_string(), None)])).is_err());
        // Numbers past what the statement holds are refused, not allocated.
        for name in [
            "$100000000000000",
            "$3000000",
            "$2",
            "$99999999999999999999999",
        ] {
            let e = parameter_types(HashMap::from([(name.to_string(), None)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}: {e}");
        }
        let types = parameter_types(HashMap::from([
            ("$1".to_string(), None),
            ("$2".to_string(), None),
        ]))
        .unwrap();
        assert_eq!(types.len(), 2);
    }
}
