//! Batches held in their IPC layout, so a message body goes to the socket as one piece.
//!
//! HTTP/2 (h2) writes one DATA frame per system call and a frame never spans two chunks of
//! a response body, so a message made of one chunk per Arrow buffer costs a `writev`, a
//! TCP push and a client wake-up per buffer (docs/benchmarks.md). A pinned table has time
//! to prepare: [`lay_out`] writes each batch once as an IPC stream into one allocation and
//! reads it back without copying, so the batch's buffers sit in that allocation exactly
//! where the IPC encoder will place them again. [`ContiguousBodies`] remembers those
//! allocations; when a message body's pieces turn out to be consecutive ranges of one of
//! them, [`ContiguousBodies::find`] returns the whole range as one [`Buffer`]: the same
//! bytes, shared, in one chunk.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arrow::array::RecordBatch;
use arrow::buffer::{Buffer, MutableBuffer};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamDecoder;
use arrow::ipc::writer::{IpcWriteOptions, StreamEncoder};

/// Pieces not in the allocation (padding the encoder allocates) are compared byte for
/// byte with the allocation; longer ones make the body not contiguous.
const MAX_FOREIGN_PIECE: usize = 64;

/// `batch` re-created with every buffer inside one allocation laid out as the IPC stream
/// `options` produces (schema message, then the batch), and that allocation.
pub fn lay_out(
    batch: &RecordBatch,
    options: &IpcWriteOptions,
) -> Result<(RecordBatch, Buffer), ArrowError> {
    let mut encoder =
        StreamEncoder::try_new_with_options(batch.schema().as_ref(), options.clone())?;
    let pieces = encoder.encode(batch)?;
    let len = pieces.iter().map(Buffer::len).sum();
    // 64-byte aligned: every buffer lands aligned for its type and is read in place.
    let mut joined = MutableBuffer::with_capacity(len);
    for piece in &pieces {
        joined.extend_from_slice(piece.as_slice());
    }
    let whole: Buffer = joined.into();
    let mut rest = whole.clone();
    let mut decoder = StreamDecoder::new().with_require_alignment(true);
    let mut decoded = None;
    while !rest.is_empty() {
        if let Some(b) = decoder.decode(&mut rest)? {
            decoded = Some(b);
        }
    }
    let decoded =
        decoded.ok_or_else(|| ArrowError::IpcError("the laid-out stream holds no batch".into()))?;
    let batch = RecordBatch::try_new(batch.schema(), decoded.columns().to_vec())?;
    Ok((batch, whole))
}

/// Allocations made by [`lay_out`] whose ranges may be sent whole, by start address.
#[derive(Debug, Default)]
pub struct ContiguousBodies {
    by_start: RwLock<HashMap<usize, Buffer>>,
}

impl ContiguousBodies {
    /// Remembers `allocations` until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, allocations: Vec<Buffer>) -> Registration {
        let mut map = self.by_start.write().expect("poisoned");
        let keys = allocations
            .into_iter()
            .map(|b| {
                let key = start(&b);
                map.insert(key, b);
                key
            })
            .collect();
        Registration {
            bodies: Arc::clone(self),
            keys,
        }
    }

    /// `pieces` (a message body: Arrow buffers and padding, in order) as one range of a
    /// registered allocation, if that range holds exactly their bytes.
    pub fn find(&self, pieces: &[Buffer]) -> Option<Buffer> {
        let map = self.by_start.read().expect("poisoned");
        if map.is_empty() {
            return None;
        }
        // Where the body starts in the allocation, from the first piece that lives there.
        let mut offset = 0;
        let mut found = None;
        for piece in pieces {
            if let Some(whole) = map.get(&start(piece)) {
                let at =
                    (piece.ptr_offset().checked_sub(whole.ptr_offset())?).checked_sub(offset)?;
                found = Some((whole, at));
                break;
            }
            offset += piece.len();
        }
        let (whole, at) = found?;
        let total: usize = pieces.iter().map(Buffer::len).sum();
        if at.checked_add(total)? > whole.len() {
            return None;
        }
        let held = &whole.as_slice()[at..at + total];
        let mut offset = 0;
        for piece in pieces {
            let here = at + offset;
            let in_place = start(piece) == start(whole)
                && piece.ptr_offset().checked_sub(whole.ptr_offset()) == Some(here);
            if !in_place
                && (piece.len() > MAX_FOREIGN_PIECE
                    || held[offset..offset + piece.len()] != *piece.as_slice())
            {
                return None;
            }
            offset += piece.len();
        }
        Some(whole.slice_with_length(at, total))
    }

    /// Allocations remembered.
    pub fn len(&self) -> usize {
        self.by_start.read().expect("poisoned").len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Forgets its allocations when dropped (the memory is freed once no batch shares it).
#[derive(Debug)]
pub struct Registration {
    bodies: Arc<ContiguousBodies>,
    keys: Vec<usize>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.bodies.by_start.write().expect("poisoned");
        for key in &self.keys {
            map.remove(key);
        }
    }
}

/// The start address of the allocation `buffer` is a slice of: equal for two buffers
/// exactly when they share it, while it is alive.
fn start(buffer: &Buffer) -> usize {
    buffer.data_ptr().as_ptr() as usize
}
