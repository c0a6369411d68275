//! Pinned batches held as the gRPC messages that send them.
//!
//! HTTP/2 (h2) writes one DATA frame per system call and a frame never spans two chunks of
//! a response body, so a message made of one chunk per Arrow buffer costs a `writev`, a
//! TCP push and a client wake-up per buffer (docs/benchmarks.md). A pinned table has time
//! to prepare: [`lay_out`] encodes each batch once into the bytes the zero-copy send path
//! would write for it (gRPC prefix, `FlightData` field headers, IPC header, body) in one
//! allocation, and reads the batch back from the body in place. The batch the table
//! serves and the message that sends it are then the same memory: [`PinnedMessages`]
//! remembers the message by the batch's columns, and when a query sends exactly those
//! columns (`SELECT *`, any filter that keeps whole batches), the encoder sends the
//! message as one shared chunk and encodes nothing.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::buffer::{Buffer, MutableBuffer};
use arrow::error::ArrowError;
use arrow::ipc::reader::RecordBatchDecoder;
use arrow::ipc::writer::IpcWriteOptions;

use super::frames::{Frame, FrameEncoder, LaidOutMessages};

/// Every buffer lands at least this aligned, for any Arrow type, and is read in place.
const ALIGNMENT: usize = 64;

/// A batch re-created inside the allocation that holds its message.
#[derive(Debug)]
pub struct LaidOut {
    /// The same rows, every buffer inside the allocation.
    pub batch: RecordBatch,
    /// The batch's gRPC message, uncompressed: one chunk of the allocation.
    pub frame: Frame,
    /// Bytes allocated.
    pub allocated: usize,
}

/// `batch` and its message in one allocation; `None` when the batch is not sent as a
/// single record batch message (dictionaries travel in messages of their own).
pub fn lay_out(batch: &RecordBatch) -> Result<Option<LaidOut>, ArrowError> {
    let mut encoder =
        FrameEncoder::try_new(&batch.schema(), IpcWriteOptions::default(), usize::MAX)?;
    let frames = encoder.encode(batch)?;
    let [schema, message] = frames.as_slice() else {
        return Ok(None);
    };
    if schema.rows().is_some() || message.rows().is_none() {
        return Ok(None);
    }
    let (header_at, header_len) = message.header_range();
    let body_len = message.body_len();
    let body_at = message.len() - body_len;

    let mut joined = MutableBuffer::with_capacity(message.len() + ALIGNMENT);
    // Zeros before the message, so that its body starts aligned.
    let pad = (ALIGNMENT - (joined.as_ptr() as usize + body_at) % ALIGNMENT) % ALIGNMENT;
    joined.extend_zeros(pad);
    for chunk in message.chunks() {
        joined.extend_from_slice(chunk);
    }
    let allocated = joined.capacity();
    let whole: Buffer = joined.into();

    let header = whole.slice_with_length(pad + header_at, header_len);
    let ipc = arrow::ipc::root_as_message(header.as_slice())
        .map_err(|e| ArrowError::IpcError(format!("invalid IPC header: {e}")))?;
    let record_batch = ipc
        .header_as_record_batch()
        .ok_or_else(|| ArrowError::IpcError("the message holds no record batch".into()))?;
    let body = whole.slice_with_length(pad + body_at, body_len);
    let no_dictionaries = HashMap::new();
    let version = ipc.version();
    let decoded = RecordBatchDecoder::try_new(
        &body,
        record_batch,
        batch.schema(),
        &no_dictionaries,
        &version,
    )?
    .with_require_alignment(true)
    .read_record_batch()?;
    Ok(Some(LaidOut {
        batch: decoded,
        frame: message.sharing(whole.slice_with_length(pad, message.len())),
        allocated,
    }))
}

/// Messages of pinned batches, found by the batch's columns.
#[derive(Debug)]
pub struct PinnedMessages {
    /// Largest message the send path writes: batches are pinned in pieces no larger.
    max_message_size: usize,
    /// By the address of the batch's first column.
    by_column: RwLock<HashMap<usize, Entry>>,
}

#[derive(Debug)]
struct Entry {
    columns: Vec<ArrayRef>,
    frame: Frame,
}

impl PinnedMessages {
    /// An empty registry for a send path whose messages carry at most
    /// `max_message_size` bytes of Arrow data.
    pub fn new(max_message_size: usize) -> Self {
        Self {
            max_message_size: max_message_size.max(1),
            by_column: RwLock::default(),
        }
    }

    /// Largest message the send path writes; a pinned batch larger than this is split
    /// (and so encoded) on every send, so batches are laid out in pieces no larger.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Remembers each batch's message until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, laid_out: Vec<(RecordBatch, Frame)>) -> Registration {
        let mut map = self.by_column.write();
        let keys = laid_out
            .into_iter()
            .filter_map(|(batch, frame)| {
                let key = key(&batch)?;
                let columns = batch.columns().to_vec();
                map.insert(key, Entry { columns, frame });
                Some(key)
            })
            .collect();
        Registration {
            messages: Arc::clone(self),
            keys,
        }
    }

    /// The uncompressed message for `batch`, when `batch` is a pinned batch: every column
    /// the very array laid out (so the same rows, types and buffers).
    pub fn find(&self, batch: &RecordBatch) -> Option<Frame> {
        let key = key(batch)?;
        let map = self.by_column.read();
        let entry = map.get(&key)?;
        let same = entry.columns.len() == batch.num_columns()
            && entry
                .columns
                .iter()
                .zip(batch.columns())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        same.then(|| entry.frame.clone())
    }

    /// Messages remembered.
    pub fn len(&self) -> usize {
        self.by_column.read().len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LaidOutMessages for PinnedMessages {
    fn find(&self, batch: &RecordBatch) -> Option<Frame> {
        PinnedMessages::find(self, batch)
    }

    fn max_message_size(&self) -> usize {
        PinnedMessages::max_message_size(self)
    }
}

/// Forgets its messages when dropped (the memory is freed once nothing shares it).
#[derive(Debug)]
pub struct Registration {
    messages: Arc<PinnedMessages>,
    keys: Vec<usize>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.messages.by_column.write();
        for key in &self.keys {
            map.remove(key);
        }
    }
}

/// The address of the batch's first column; the registry holds that array, so no other
/// array can take the address while the entry exists.
fn key(batch: &RecordBatch) -> Option<usize> {
    let first = batch.columns().first()?;
    Some(Arc::as_ptr(first).cast::<u8>() as usize)
}
