//! Splitting a batch that is larger than one message into row ranges.

use arrow::array::{Array, RecordBatch};
use arrow::error::ArrowError;

/// Whether `batch` goes in one message: the capacity of its buffers bounds the bytes its
/// rows reference, and needs no `ArrayData` to sum.
pub(super) fn fits(batch: &RecordBatch, max: usize) -> bool {
    batch
        .columns()
        .iter()
        .map(|c| c.get_buffer_memory_size())
        .sum::<usize>()
        <= max
}

/// `batch` in row ranges of about `max` bytes each (by the bytes the rows reference,
/// not the capacity of shared buffers), as arrow-flight splits them.
pub fn split(batch: &RecordBatch, max: usize) -> Result<Vec<RecordBatch>, ArrowError> {
    if fits(batch, max) {
        return Ok(vec![batch.clone()]);
    }
    let size: usize = batch
        .columns()
        .iter()
        .map(|c| c.to_data().get_slice_memory_size())
        .sum::<Result<usize, _>>()?;
    let pieces = size.div_ceil(max).max(1);
    let rows = batch.num_rows();
    if pieces == 1 || rows <= 1 {
        return Ok(vec![batch.clone()]);
    }
    let per_piece = (rows / pieces).max(1);
    Ok((0..rows)
        .step_by(per_piece)
        .map(|offset| batch.slice(offset, per_piece.min(rows - offset)))
        .collect())
}
