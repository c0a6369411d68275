//! Slices: one query's result split over several `FlightEndpoint`s, which clients fetch
//! in parallel (`--endpoints-per-query`).
//!
//! A plan that only scans, filters, projects and repartitions (no aggregate, join, sort,
//! limit or window) produces each result row from exactly one *piece* of its scans: a
//! byte range of a Parquet file, or a batch of a pinned table. Slice `i` of `n` runs the
//! same plan over the pieces assigned to `i`, so the `n` slices together return every
//! row exactly once, and no slice repeats another's work. Any other plan has one
//! endpoint: splitting it would repeat the work below its aggregate, join or sort in
//! every slice.
//!
//! ```text
//!  GetFlightInfo: plan ──▶ pieces(plan) ──▶ n = min(--endpoints-per-query, pieces)
//!                          + fingerprint     tickets {sql, slice i of n, fingerprint}
//!  DoGet(ticket i): plan ──▶ restrict(plan, i of n, fingerprint) ──▶ execute
//! ```
//!
//! Pieces are assigned by size, largest first to the lightest slice, from the plan
//! alone, so every node that plans the same SQL over the same files assigns them the
//! same way. The fingerprint (every piece's file, range, size, ETag and modification
//! time, or batch shape) is checked at `DoGet`: if a refresh published other files
//! between `GetFlightInfo` and a `DoGet`, or a node lists them differently, the slice
//! fails with `ABORTED` instead of returning rows of another version.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion_datasource::file_groups::FileGroup;
use datafusion_datasource::file_scan_config::{FileScanConfig, FileScanConfigBuilder};
use datafusion_datasource::memory::MemorySourceConfig;

use crate::catalog::memory_source;
use datafusion_datasource::source::DataSourceExec;

use crate::error::{Error, Result};

/// Most slices one query may be split into (the ceiling of `--endpoints-per-query`).
pub const MAX_SLICES: u32 = 1024;

/// Operators that pass each input row to at most one output row of their own, so they
/// run the same over any subset of the scans' pieces.
const ROW_WISE: [&str; 8] = [
    "ProjectionExec",
    "FilterExec",
    "CoalesceBatchesExec",
    "CoalescePartitionsExec",
    "RepartitionExec",
    "CooperativeExec",
    "UnionExec",
    "EmptyExec",
];

/// Which part of a query's result a ticket asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// This slice, `0..count`.
    pub index: u32,
    /// How many slices the result was split into.
    pub count: u32,
    /// The fingerprint of the pieces the slices were planned on.
    pub fingerprint: u64,
}

impl Slice {
    /// Checks a slice a client sent.
    pub fn checked(index: u32, count: u32, fingerprint: u64) -> Result<Self> {
        if count == 0 || count > MAX_SLICES || index >= count {
            return Err(Error::invalid(format!(
                "the ticket's slice {index} of {count} is out of range: a ticket's slice \
                 must be below its slice count, which is 1 to {MAX_SLICES}; use the tickets \
                 GetFlightInfo returns"
            )));
        }
        Ok(Self {
            index,
            count,
            fingerprint,
        })
    }
}

/// What a plan's scans consist of, if it can be sliced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pieces {
    /// How many pieces: the most slices the plan can be split into.
    pub count: usize,
    /// Their fingerprint.
    pub fingerprint: u64,
}

/// One unit a slice takes whole: a file's byte range, or a pinned batch.
struct Piece {
    bytes: u64,
    id: u64,
}

/// The pieces of `plan`'s scans, in plan order; `None` if the plan cannot be sliced.
fn collect(plan: &Arc<dyn ExecutionPlan>) -> Option<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut sliceable = true;
    let walked = plan.apply(|node| {
        if node.fetch().is_some() {
            sliceable = false;
        } else if let Some(exec) = node.downcast_ref::<DataSourceExec>() {
            match scan_pieces(exec) {
                Some(found) => pieces.extend(found),
                None => sliceable = false,
            }
        } else if !ROW_WISE.contains(&node.name()) {
            sliceable = false;
        }
        Ok(match sliceable {
            true => TreeNodeRecursion::Continue,
            false => TreeNodeRecursion::Stop,
        })
    });
    (walked.is_ok() && sliceable).then_some(pieces)
}

/// A scan's pieces; `None` for a source that cannot be sliced.
fn scan_pieces(exec: &DataSourceExec) -> Option<Vec<Piece>> {
    let source = exec.data_source();
    if let Some(config) = source.downcast_ref::<FileScanConfig>() {
        if config.limit.is_some() {
            return None;
        }
        let files = config.file_groups.iter().flat_map(|g| g.files());
        return Some(
            files
                .map(|file| {
                    let meta = &file.object_meta;
                    let (start, end) = file
                        .range
                        .as_ref()
                        .map_or((0, meta.size), |r| (r.start as u64, r.end as u64));
                    let mut hasher = DefaultHasher::new();
                    meta.location.as_ref().hash(&mut hasher);
                    (start, end, meta.size).hash(&mut hasher);
                    meta.e_tag.hash(&mut hasher);
                    meta.last_modified.timestamp_nanos_opt().hash(&mut hasher);
                    Piece {
                        bytes: end.saturating_sub(start),
                        id: hasher.finish(),
                    }
                })
                .collect(),
        );
    }
    if let Some(memory) = memory_source(exec) {
        let batches = memory
            .partitions()
            .iter()
            .enumerate()
            .flat_map(|(p, batches)| {
                batches
                    .iter()
                    .enumerate()
                    .map(move |(b, batch)| (p, b, batch))
            });
        return Some(
            batches
                .map(|(p, b, batch)| {
                    let mut hasher = DefaultHasher::new();
                    (p, b, batch.num_rows(), batch.num_columns()).hash(&mut hasher);
                    Piece {
                        bytes: batch.get_array_memory_size() as u64,
                        id: hasher.finish(),
                    }
                })
                .collect(),
        );
    }
    None
}

fn fingerprint(pieces: &[Piece]) -> u64 {
    let mut hasher = DefaultHasher::new();
    pieces.len().hash(&mut hasher);
    for piece in pieces {
        piece.id.hash(&mut hasher);
    }
    hasher.finish()
}

/// How `plan` can be sliced; `None` if it cannot.
pub fn pieces(plan: &Arc<dyn ExecutionPlan>) -> Option<Pieces> {
    collect(plan).map(|pieces| Pieces {
        count: pieces.len(),
        fingerprint: fingerprint(&pieces),
    })
}

/// The slice each piece goes to: largest first, each to the slice with the fewest bytes
/// so far (the lowest-numbered on ties).
fn assign(pieces: &[Piece], count: u32) -> Vec<u32> {
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(pieces[i].bytes), i));
    let mut load = vec![0u64; count as usize];
    let mut assigned = vec![0u32; pieces.len()];
    for i in order {
        let lightest = (0..load.len()).min_by_key(|&s| (load[s], s)).unwrap_or(0);
        load[lightest] += pieces[i].bytes;
        assigned[i] = lightest as u32;
    }
    assigned
}

/// `plan` reading only `slice`'s pieces of its scans.
pub fn restrict(plan: Arc<dyn ExecutionPlan>, slice: Slice) -> Result<Arc<dyn ExecutionPlan>> {
    let Some(pieces) = collect(&plan) else {
        return Err(Error::invalid(
            "this query cannot be split into slices (it aggregates, joins, sorts, limits \
             or runs window functions); remove the ticket's slice",
        ));
    };
    if fingerprint(&pieces) != slice.fingerprint {
        return Err(Error::SliceChanged);
    }
    let assigned = assign(&pieces, slice.count);
    let mut next = 0;
    let mine = |next: &mut usize| {
        let keep = assigned.get(*next) == Some(&slice.index);
        *next += 1;
        keep
    };
    // Leaves come in the same order as `collect` walked them.
    let restricted = plan.transform_up(|node| {
        let Some(exec) = node.downcast_ref::<DataSourceExec>() else {
            return Ok(Transformed::no(node));
        };
        let source = exec.data_source();
        if let Some(config) = source.downcast_ref::<FileScanConfig>() {
            let groups: Vec<FileGroup> = config
                .file_groups
                .iter()
                .map(|group| {
                    let files = group.files().iter().filter(|_| mine(&mut next));
                    FileGroup::new(files.cloned().collect())
                })
                .filter(|group| !group.is_empty())
                .collect();
            if groups.is_empty() {
                let empty: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(node.schema()));
                return Ok(Transformed::yes(empty));
            }
            let config = FileScanConfigBuilder::from(config.clone())
                .with_file_groups(groups)
                .build();
            let exec: Arc<dyn ExecutionPlan> = DataSourceExec::from_data_source(config);
            return Ok(Transformed::yes(exec));
        }
        if let Some(memory) = memory_source(exec) {
            let partitions: Vec<Vec<_>> = memory
                .partitions()
                .iter()
                .map(|batches| {
                    let kept = batches.iter().filter(|_| mine(&mut next));
                    kept.cloned().collect()
                })
                .collect();
            let exec: Arc<dyn ExecutionPlan> = MemorySourceConfig::try_new_exec(
                &partitions,
                memory.original_schema(),
                memory.projection().clone(),
            )?;
            return Ok(Transformed::yes(exec));
        }
        Ok(Transformed::no(node))
    })?;
    Ok(restricted.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces_of(bytes: &[u64]) -> Vec<Piece> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| Piece {
                bytes,
                id: i as u64,
            })
            .collect()
    }

    #[test]
    fn every_piece_goes_to_one_slice_balanced_by_size() {
        let pieces = pieces_of(&[100, 10, 10, 50, 50, 10, 10, 60]);
        let assigned = assign(&pieces, 3);
        let mut load = [0u64; 3];
        for (piece, slice) in pieces.iter().zip(&assigned) {
            load[*slice as usize] += piece.bytes;
        }
        assert_eq!(load.iter().sum::<u64>(), 300);
        // Largest first to the lightest: 100 | 60+10+10+10 | 50+50 ... within one piece.
        assert!(
            load.iter().max().unwrap() - load.iter().min().unwrap() <= 10,
            "{load:?}"
        );
        // Deterministic.
        assert_eq!(assigned, assign(&pieces, 3));
    }

    #[test]
    fn more_slices_than_pieces_leaves_some_empty() {
        let assigned = assign(&pieces_of(&[5, 5]), 4);
        assert_eq!(assigned, vec![0, 1]);
    }

    #[test]
    fn fingerprints_differ_when_a_piece_does() {
        let a = fingerprint(&pieces_of(&[1, 2, 3]));
        let mut changed = pieces_of(&[1, 2, 3]);
        changed[1].id = 99;
        assert_ne!(a, fingerprint(&changed));
        assert_ne!(a, fingerprint(&pieces_of(&[1, 2])));
        assert_eq!(a, fingerprint(&pieces_of(&[1, 2, 3])));
    }

    #[test]
    fn slices_out_of_range_are_refused() {
        assert!(Slice::checked(0, 1, 0).is_ok());
        assert!(Slice::checked(3, 4, 0).is_ok());
        assert!(Slice::checked(4, 4, 0).is_err());
        assert!(Slice::checked(0, 0, 0).is_err());
        assert!(Slice::checked(0, MAX_SLICES + 1, 0).is_err());
    }
}
