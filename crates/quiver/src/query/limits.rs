//! Bounds on the shape of a statement, checked before anything plans it.
//!
//! sqlparser parses a chain like `1+1+1+...`, `a OR b OR ...`, `'a'||'a'||...` or
//! `SELECT 1 UNION ALL SELECT 1 ...` in a loop, but the tree it builds is as deep as the
//! chain is long, and everything after the parser walks it recursively: DataFusion's
//! planner and optimizer, and the derived `Clone`, `Drop`, `PartialEq` and `Hash` of its
//! `Expr` and `LogicalPlan`. A few thousand terms overflow a thread's stack, which aborts
//! the whole process. So the parsed statement is measured first, with a visitor that
//! stops as soon as a limit is passed (its own recursion is bounded by the limit), and
//! the threads that plan and run queries get a stack large enough for every statement
//! within the limits (`QueryOptions::stack_size`; the edges are tested in `tests.rs`).
//!
//! | limit | flag | counts |
//! |-------|------|--------|
//! | bytes | `--max-sql-size` | the SQL text, before parsing |
//! | depth | `--max-sql-depth` | nesting of expressions: each term of an operator chain is one level |
//! | set operations | `--max-sql-set-operations` | `UNION`/`INTERSECT`/`EXCEPT` chained in one query |
//! | relations | `--max-sql-relations` | `SELECT` blocks, CTEs and every table, subquery or function in a `FROM` |

use std::ops::ControlFlow;

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, Query, Select, SetExpr, Statement, TableFactor, Visit, Visitor,
};

use crate::error::{Error, Result};

/// Limits on the statements a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlLimits {
    /// Longest SQL text, in bytes (`--max-sql-size`).
    pub max_bytes: usize,
    /// Deepest expression nesting (`--max-sql-depth`).
    pub max_depth: usize,
    /// Most set operations chained in one query (`--max-sql-set-operations`).
    pub max_set_operations: usize,
    /// Most relations in one statement (`--max-sql-relations`).
    pub max_relations: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
            // A generated `k = 0 OR k = 1 OR ...` of 1,000 terms still plans; the
            // default stack size is sized for this (see `DEFAULT_STACK_SIZE`).
            max_depth: 1000,
            max_set_operations: 500,
            max_relations: 1000,
        }
    }
}

/// Stack of each thread that plans or runs queries. Only the pages a statement touches
/// become resident; 256 MiB leaves a wide margin over what a statement at every default
/// limit needs, and over dropping the deepest tree a `--max-sql-size` text can parse to
/// before it is rejected.
pub const DEFAULT_STACK_SIZE: usize = 256 * 1024 * 1024;

impl SqlLimits {
    /// Checks the text's size, before parsing.
    pub fn check_text(&self, sql: &str) -> Result<()> {
        if sql.len() > self.max_bytes {
            return Err(Error::invalid(format!(
                "the SQL text is {} bytes, over the limit of {} (--max-sql-size); \
                 send a shorter statement (long IN lists can often be a join with a table)",
                sql.len(),
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// Checks the parsed statement's shape, before anything else walks it.
    pub fn check_statement(&self, statement: &DfStatement) -> Result<()> {
        let mut meter = Meter {
            limits: *self,
            depth: 0,
            relations: 0,
        };
        let flow = match statement {
            DfStatement::Statement(s) => s.visit(&mut meter),
            DfStatement::Explain(e) => return self.check_statement(&e.statement),
            DfStatement::CopyTo(c) => match &c.source {
                datafusion::sql::parser::CopyToSource::Query(q) => q.visit(&mut meter),
                datafusion::sql::parser::CopyToSource::Relation(_) => ControlFlow::Continue(()),
            },
            DfStatement::CreateExternalTable(_) | DfStatement::Reset(_) => {
                ControlFlow::Continue(())
            }
        };
        match flow {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(exceeded) => Err(self.error(exceeded)),
        }
    }

    fn error(&self, exceeded: Exceeded) -> Error {
        let reason = match exceeded {
            Exceeded::Depth => format!(
                "the statement nests expressions deeper than {} levels (--max-sql-depth); \
                 each term of a chain like a OR b OR ... or 1 + 2 + ... is one level: \
                 use IN (...) lists, or split the expression",
                self.max_depth
            ),
            Exceeded::SetOperations => format!(
                "a query chains more than {} UNION/INTERSECT/EXCEPT operations \
                 (--max-sql-set-operations); split it into several queries",
                self.max_set_operations
            ),
            Exceeded::Relations => format!(
                "the statement has more than {} relations (SELECT blocks, CTEs, tables \
                 and subqueries; --max-sql-relations); split it into several queries",
                self.max_relations
            ),
        };
        Error::invalid(reason)
    }
}

/// Which limit a statement passed. One byte, as the visitor's `Break` should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exceeded {
    Depth,
    SetOperations,
    Relations,
}

/// Walks a statement, stopping at the first limit passed.
struct Meter {
    limits: SqlLimits,
    /// Expressions open on the visitor's stack.
    depth: usize,
    relations: usize,
}

impl Meter {
    fn count_relations(&mut self, n: usize) -> ControlFlow<Exceeded> {
        self.relations = self.relations.saturating_add(n);
        if self.relations > self.limits.max_relations {
            return ControlFlow::Break(Exceeded::Relations);
        }
        ControlFlow::Continue(())
    }
}

impl Visitor for Meter {
    type Break = Exceeded;

    fn pre_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Exceeded> {
        self.depth += 1;
        if self.depth > self.limits.max_depth {
            return ControlFlow::Break(Exceeded::Depth);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Exceeded> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Exceeded> {
        // Measured here, before the visitor descends into the chain: without a loop
        // of its own, the visitor would recurse once per set operation.
        if set_operation_depth(&query.body, self.limits.max_set_operations)
            > self.limits.max_set_operations
        {
            return ControlFlow::Break(Exceeded::SetOperations);
        }
        let ctes = query.with.as_ref().map_or(0, |w| w.cte_tables.len());
        self.count_relations(ctes)
    }

    fn pre_visit_select(&mut self, _select: &Select) -> ControlFlow<Exceeded> {
        self.count_relations(1)
    }

    fn pre_visit_table_factor(&mut self, _factor: &TableFactor) -> ControlFlow<Exceeded> {
        self.count_relations(1)
    }

    fn pre_visit_statement(&mut self, _statement: &Statement) -> ControlFlow<Exceeded> {
        ControlFlow::Continue(())
    }
}

/// The longest path of set operations under `body`, counted without recursion and given
/// up on past `max`. Parenthesised queries inside are measured when the visitor reaches
/// them.
fn set_operation_depth(body: &SetExpr, max: usize) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(body, 0usize)];
    while let Some((expr, depth)) = pending.pop() {
        if let SetExpr::SetOperation { left, right, .. } = expr {
            let depth = depth + 1;
            deepest = deepest.max(depth);
            if deepest > max {
                break;
            }
            pending.push((left, depth));
            pending.push((right, depth));
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn limits() -> SqlLimits {
        SqlLimits {
            max_bytes: 1 << 20,
            max_depth: 50,
            max_set_operations: 10,
            max_relations: 20,
        }
    }

    fn check(sql: &str) -> Result<()> {
        let statement = DFParser::parse_sql(sql).unwrap().pop_front().unwrap();
        limits().check_statement(&statement)
    }

    fn chain(term: &str, op: &str, n: usize) -> String {
        vec![term; n].join(op)
    }

    #[test]
    fn depth_is_counted_per_term_and_the_limit_is_exact() {
        // `SELECT t1 + t2 + ... + tn`: n terms nest n - 1 binary operations plus the
        // leaves, so the deepest leaf sits at depth n.
        for (term, op) in [
            ("1", " + "),
            ("a", " + "),
            ("k = 0", " OR "),
            ("'a'", " || "),
        ] {
            let at = |n| format!("SELECT {} FROM t", chain(term, op, n));
            let mut n = 2;
            while check(&at(n)).is_ok() {
                n += 1;
            }
            let err = check(&at(n)).unwrap_err();
            assert!(err.to_string().contains("--max-sql-depth"), "{err}");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(n <= 51, "{term}{op}: rejected only at {n} terms");
            assert!(n >= 25, "{term}{op}: rejected already at {n} terms");
        }
    }

    #[test]
    fn set_operations_and_relations() {
        let union = |n| chain("SELECT 1", " UNION ALL ", n);
        check(&union(11)).unwrap();
        let err = check(&union(12)).unwrap_err();
        assert!(
            err.to_string().contains("--max-sql-set-operations"),
            "{err}"
        );
        // Inside a subquery too.
        let err = check(&format!("SELECT * FROM ({})", union(12))).unwrap_err();
        assert!(
            err.to_string().contains("--max-sql-set-operations"),
            "{err}"
        );

        let joins = |n| format!("SELECT 1 FROM {}", chain("t", " CROSS JOIN ", n));
        check(&joins(19)).unwrap();
        let err = check(&joins(20)).unwrap_err();
        assert!(err.to_string().contains("--max-sql-relations"), "{err}");
        let ctes = |n: usize| {
            let defs: Vec<String> = (0..n).map(|i| format!("c{i} AS (SELECT 1)")).collect();
            format!("WITH {} SELECT 1", defs.join(", "))
        };
        check(&ctes(9)).unwrap();
        let err = check(&ctes(30)).unwrap_err();
        assert!(err.to_string().contains("--max-sql-relations"), "{err}");
    }

    #[test]
    fn text_size() {
        let l = SqlLimits {
            max_bytes: 10,
            ..limits()
        };
        l.check_text("SELECT 1").unwrap();
        let err = l.check_text("SELECT 1234").unwrap_err();
        assert!(err.to_string().contains("--max-sql-size"), "{err}");
    }
}
