//! Filters over pinned tables pass the batches they keep on as they are.
//!
//! DataFusion's `FilterExec` gathers the rows it passes into batches of 8192 rows: every
//! kept batch under half that size is copied into a new one. A pinned table narrows its
//! batches to the rows a key range allows (`catalog::pinned`), so a range across two
//! batches reaches the filter as two slices that pass whole, and the gathering copied
//! every row of the answer (6-8% of a pinned key-range stream's CPU, docs/benchmarks.md).
//! This rule gives the filters above pinned scans a target of [`TARGET_ROWS`]: slices over
//! half of it go on untouched (arrow's filter hands on a slice whose rows all pass without
//! copying it), and a filter that keeps only a few rows of each batch still gathers them
//! into batches of that size, so the send path does not get a message per handful of rows.

use std::sync::Arc;

use datafusion::common::tree_node::Transformed;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::repartition::RepartitionExec;

use super::node_rule::NodeRule;
use crate::catalog::memory_source;

/// Rows a filter over a pinned scan gathers its output into.
const TARGET_ROWS: usize = 2048;

/// Whether `plan` scans batches held in memory (a pinned table), directly or through a
/// repartitioning.
fn scans_memory(plan: &Arc<dyn ExecutionPlan>) -> bool {
    if plan.downcast_ref::<RepartitionExec>().is_some() {
        return plan
            .children()
            .first()
            .is_some_and(|input| scans_memory(input));
    }
    memory_source(plan.as_ref()).is_some()
}

/// The rule; runs after DataFusion's.
pub(crate) const KEEP_PINNED_SLICES: NodeRule = NodeRule {
    name: "KeepPinnedSlices",
    rewrite: |node| {
        let Some(filter) = node.downcast_ref::<FilterExec>() else {
            return Ok(Transformed::no(node));
        };
        if filter.batch_size() <= TARGET_ROWS || !scans_memory(filter.input()) {
            return Ok(Transformed::no(node));
        }
        let filter: Arc<dyn ExecutionPlan> = Arc::new(filter.with_batch_size(TARGET_ROWS)?);
        Ok(Transformed::yes(filter))
    },
};
