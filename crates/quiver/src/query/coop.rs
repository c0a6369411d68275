//! Yield points above operators that make many rows from few.
//!
//! Cancellation and deadlines reach a query only when its task yields. DataFusion makes
//! its leaves (scans, `generate_series`) cooperative, spending the task's Tokio budget
//! per batch they produce; but an operator that amplifies its input (a cross or
//! nested-loop join, `unnest`) drains its few input batches and then computes without
//! spending any, so an aggregate above it can run for minutes in one `poll`. This rule
//! puts a `CooperativeExec` above each such operator, so that its output spends the
//! budget too and the task yields every 128 batches.
//!
//! Work inside one call (one huge batch, one accumulator merge) still cannot be
//! interrupted: the memory guard and output caps bound it, and the deadline is watched
//! from outside the CPU runtime (`flight::do_get`), so the client is answered at once.

use std::sync::Arc;

use datafusion::common::tree_node::Transformed;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;

use super::node_rule::NodeRule;

/// Operators whose output can be far larger than their input.
const AMPLIFIERS: [&str; 5] = [
    "CrossJoinExec",
    "NestedLoopJoinExec",
    "UnnestExec",
    "HashJoinExec",
    "SortMergeJoinExec",
];

/// The rule; runs last among the physical optimizer rules.
pub(crate) const YIELD_ABOVE_AMPLIFIERS: NodeRule = NodeRule {
    name: "YieldAboveAmplifiers",
    rewrite: |node| {
        if AMPLIFIERS.contains(&node.name()) {
            let wrapped: Arc<dyn ExecutionPlan> = Arc::new(CooperativeExec::new(node));
            return Ok(Transformed::yes(wrapped));
        }
        Ok(Transformed::no(node))
    },
};
