//! The read-only guard: which statements a client may run.
//!
//! Two independent checks. Before planning, the parsed statement must be a query (or
//! `EXPLAIN` of one, or `SHOW`), and every table it names must be registered. After
//! planning, DataFusion's [`SQLOptions`] verifies the plan contains no DDL, DML or
//! statement nodes. Either one alone would stop writes; both together also give the
//! client a message that names what was rejected.

use datafusion::common::TableReference;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SQLOptions;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;

use super::TableAccess;
use crate::catalog::Catalog;
use crate::error::{Error, Result};

const HINT: &str = "send a SELECT, EXPLAIN or SHOW over the registered tables";

/// Rejects anything but reads.
pub(crate) fn check_statement(statement: &DfStatement) -> Result<()> {
    match statement {
        DfStatement::Statement(s) => check_sql_statement(s),
        DfStatement::Explain(e) => check_statement(&e.statement),
        DfStatement::CreateExternalTable(_) => Err(not_read_only("CREATE EXTERNAL TABLE")),
        DfStatement::CopyTo(_) => Err(not_read_only("COPY")),
        DfStatement::Reset(_) => Err(not_read_only("RESET")),
    }
}

fn check_sql_statement(statement: &Statement) -> Result<()> {
    match statement {
        Statement::Query(_)
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ExplainTable { .. } => Ok(()),
        Statement::Explain { statement, .. } => check_sql_statement(statement),
        other => {
            // The leading keywords name the statement well enough for a message
            // ("INSERT INTO", "CREATE TABLE", "SET", "DROP VIEW").
            let text = other.to_string();
            let what: Vec<&str> = text.split_whitespace().take(2).collect();
            let what = match what.as_slice() {
                [first, second] if second.chars().all(|c| c.is_ascii_uppercase()) => {
                    format!("{first} {second}")
                }
                [first, ..] => first.to_string(),
                [] => "an empty statement".to_string(),
            };
            Err(not_read_only(&what))
        }
    }
}

fn not_read_only(what: &str) -> Error {
    Error::NotReadOnly {
        what: what.to_string(),
        hint: HINT.to_string(),
    }
}

/// Every table the statement reads must be a registered table (or an
/// `information_schema` view); paths are refused outright.
pub(crate) fn check_tables(
    state: &SessionState,
    catalog: &Catalog,
    access: &TableAccess,
    statement: &DfStatement,
) -> Result<()> {
    for table in state.resolve_table_references(statement)? {
        let name = table.table();
        if looks_like_path(name) {
            return Err(Error::NotReadOnly {
                what: format!("reading the path '{name}'"),
                hint: "query a registered table instead; an operator adds tables with --table"
                    .into(),
            });
        }
        let ours = match &table {
            TableReference::Bare { .. } => true,
            TableReference::Partial { schema, .. } => schema.as_ref() == "public",
            TableReference::Full {
                catalog: c, schema, ..
            } => c.as_ref() == "datafusion" && schema.as_ref() == "public",
        };
        let system = matches!(table.schema(), Some("information_schema"));
        // Built-in table functions (generate_series, range) compute rows; none reads files.
        let table_function = matches!(table, TableReference::Bare { .. })
            && state.table_functions().contains_key(name);
        if system || table_function {
            continue;
        }
        // A table the caller may not read is missing for them, in the same words.
        if !ours || !catalog.knows(name) || !access.allows(name) {
            return Err(Error::TableNotFound {
                name: table.to_string(),
                available: access.visible(catalog.table_names()),
            });
        }
    }
    Ok(())
}

fn looks_like_path(name: &str) -> bool {
    name.contains('/')
        || name.contains('\\')
        || name.contains("://")
        || [".parquet", ".csv", ".json", ".arrow", ".avro", ".txt"]
            .iter()
            .any(|ext| name.to_ascii_lowercase().ends_with(ext))
}

/// The plan-level check.
pub(crate) fn check_plan(plan: &LogicalPlan) -> Result<()> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| Error::NotReadOnly {
            what: e.strip_backtrace(),
            hint: HINT.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn check(sql: &str) -> Result<()> {
        let mut statements = DFParser::parse_sql(sql).unwrap();
        check_statement(&statements.pop_front().unwrap())
    }

    #[test]
    fn reads_pass() {
        for sql in [
            "SELECT 1",
            "WITH t AS (SELECT 1) SELECT * FROM t",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE SELECT 1",
            "SHOW TABLES",
        ] {
            check(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[test]
    fn writes_are_rejected_by_name() {
        for (sql, what) in [
            ("INSERT INTO t VALUES (1)", "INSERT INTO"),
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE"),
            ("DROP TABLE t", "DROP TABLE"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("COPY (SELECT 1) TO '/tmp/x.parquet'", "COPY"),
            (
                "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc'",
                "CREATE EXTERNAL TABLE",
            ),
            ("EXPLAIN DELETE FROM t", "DELETE FROM"),
        ] {
            let err = check(sql).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("{what} is not allowed")),
                "{sql}: {err}"
            );
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn paths_are_recognised() {
        assert!(looks_like_path("/etc/passwd"));
        assert!(looks_like_path("data.parquet"));
        assert!(looks_like_path("s3://bucket/x"));
        assert!(!looks_like_path("logs"));
    }
}
