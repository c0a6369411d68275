//! Record batches as gRPC-framed `FlightData` messages made of shared buffers.
//!
//! The standard send path copies every result byte twice: arrow-flight's encoder writes
//! each batch body into a fresh `Vec`, then tonic's codec writes the whole `FlightData`
//! message into its send buffer. Here a message is a list of [`Bytes`] instead: the
//! 5-byte gRPC prefix, the protobuf field headers, the IPC flatbuffer header, and the
//! batch's Arrow buffers themselves (shared, not copied), with the IPC padding between
//! them. Pieces smaller than [`COPY_BELOW`] (prefixes, headers, padding, validity bitmaps
//! of small batches) are gathered into one chunk, so HTTP/2 is not handed a frame per
//! 3-byte pad; larger buffers go to the socket as they are.
//!
//! The bytes, concatenated, are exactly what tonic would send for the `FlightData`
//! arrow-flight's `FlightDataEncoder` produces for the same batches (tested below): the
//! wire format does not change, only who copies. (Dictionaries are the exception in
//! form, not content: arrow-flight resends a dictionary with every batch, this encoder
//! only when it changes, as an IPC stream does.)

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Fields, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::writer::{IpcWriteOptions, StreamEncoder, StreamWriter};
use bytes::{BufMut, Bytes, BytesMut};

use sink::{FrameSink, varint_len};
use split::fits;
pub use split::split;

mod sink;
mod split;
#[cfg(test)]
mod tests;

/// Pieces shorter than this are copied into a shared chunk; longer ones are sent as the
/// buffers they are. h2 writes each chunk as its own DATA frame and system call (pyarrow's
/// client allows 4 MiB frames), so a chunk per 3-byte pad would cost a call each. End to
/// end, 4, 8 and 16 KiB measured the same (docs/benchmarks.md); 8 KiB keeps an 8k-row
/// column of one-byte values (TPC-H's flags) out of the copies.
pub const COPY_BELOW: usize = 8 * 1024;

/// Protobuf tag of `FlightData.data_header` (field 2, length-delimited).
const DATA_HEADER_TAG: u8 = (2 << 3) | 2;
/// Protobuf tag of `FlightData.data_body` (field 1000, length-delimited), as a varint.
const DATA_BODY_TAG: [u8; 2] = [0xC2, 0x3E];

/// One gRPC message (a serialized `FlightData` with its 5-byte prefix), as chunks.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    chunks: Vec<Bytes>,
    len: usize,
    copied: usize,
    /// Rows, for a record batch message.
    rows: Option<u64>,
    /// Bytes of the IPC header and body (the Flight payload, without framing).
    payload: usize,
    /// Where the IPC header starts in the message, and its length.
    header: (usize, usize),
    /// Bytes of the IPC body, which ends the message.
    body: usize,
}

impl Frame {
    /// The chunks, in order; concatenated they are the message on the wire.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// Consumes the frame into its chunks.
    pub fn into_chunks(self) -> Vec<Bytes> {
        self.chunks
    }

    /// Bytes on the wire, prefix included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame has no bytes (never true for an encoded message).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows of a record batch message; `None` for schema and dictionary messages.
    pub fn rows(&self) -> Option<u64> {
        self.rows
    }

    /// Bytes of the Flight payload: IPC header and body, without protobuf and gRPC
    /// framing.
    pub fn payload_len(&self) -> usize {
        self.payload
    }

    /// Bytes that were copied into gathered chunks rather than shared.
    pub fn copied_bytes(&self) -> usize {
        self.copied
    }

    /// Where the IPC flatbuffer header starts in the message, and its length.
    pub fn header_range(&self) -> (usize, usize) {
        self.header
    }

    /// Bytes of the IPC body, the end of the message.
    pub fn body_len(&self) -> usize {
        self.body
    }

    /// A message arrow-flight encoded, framed for the wire as tonic's codec would: one
    /// chunk, the message copied into it (the standard send path, and keep-alives).
    pub fn from_flight_data(message: &arrow_flight::FlightData) -> Frame {
        use prost::Message;
        let body_len = message.encoded_len();
        let mut bytes = BytesMut::with_capacity(5 + body_len);
        bytes.put_u8(0);
        bytes.put_u32(u32::try_from(body_len).unwrap_or(u32::MAX));
        message
            .encode(&mut bytes)
            .expect("a BytesMut grows to fit any message");
        let header_len = message.data_header.len();
        // prost writes field 1 (the descriptor, absent here), then 2 (the header).
        let header_start = 5 + 1 + varint_len(header_len as u64);
        let rows = arrow::ipc::root_as_message(&message.data_header)
            .ok()
            .and_then(|m| m.header_as_record_batch())
            .map(|b| b.length().max(0) as u64);
        Frame {
            len: bytes.len(),
            copied: bytes.len(),
            chunks: vec![bytes.freeze()],
            rows,
            payload: header_len + message.data_body.len() + message.app_metadata.len(),
            header: (header_start, header_len),
            body: message.data_body.len(),
        }
    }

    /// This message as one chunk of `bytes`, which must hold exactly its bytes.
    pub(crate) fn sharing(&self, bytes: Buffer) -> Frame {
        debug_assert_eq!(bytes.len(), self.len);
        Frame {
            chunks: vec![Bytes::from_owner(ArrowBytes(bytes))],
            copied: 0,
            ..self.clone()
        }
    }
}

/// An Arrow buffer as the owner of a [`Bytes`]: the bytes stay where Arrow put them.
struct ArrowBytes(Buffer);

impl AsRef<[u8]> for ArrowBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Messages laid out ahead of time for some batches (`wire::pinned` implements it for
/// pinned tables): [`FrameEncoder`] sends such a batch as its message, encoding nothing.
pub trait LaidOutMessages: Send + Sync {
    /// The message laid out for exactly `batch`'s columns, if any.
    fn find(&self, batch: &RecordBatch) -> Option<Frame>;
    /// The message size limit the messages were laid out under.
    fn max_message_size(&self) -> usize;
}

/// Encodes a stream of record batches into [`Frame`]s.
///
/// arrow-ipc encodes; a [`FrameSink`] frames. Whole batches go through its
/// `StreamWriter`, which writes each message into the sink in order (prefix, flatbuffer
/// header, padding, then the body one Arrow buffer at a time, as slices of the batch's
/// own buffers); the sink gathers the small pieces and shares the slices. Its
/// `StreamEncoder` shares the buffers as well, but allocates a buffer list and a `Buffer`
/// per padding for every message, 0.9% of the bytes of an 8k-row TPC-H lineitem batch
/// (docs/benchmarks.md): it takes the pieces of split batches, whose new buffers (rebased
/// offsets) it can hand over. Any other new buffer (a LIMIT slice's rebased offsets, a
/// dictionary's values) is gathered, a copy.
pub struct FrameEncoder {
    writer: StreamWriter<FrameSink>,
    /// For the pieces of a split batch after the first (see [`Slices`]).
    slices: Slices,
    max_message_size: usize,
    /// Messages already laid out for pinned batches.
    pinned: Option<Arc<dyn LaidOutMessages>>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameEncoder")
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

impl FrameEncoder {
    /// An encoder for batches of `schema`, splitting batches larger than
    /// `max_message_size` bytes into several messages.
    pub fn try_new(
        schema: &SchemaRef,
        options: IpcWriteOptions,
        max_message_size: usize,
    ) -> Result<Self, ArrowError> {
        let slices = if has_dictionary(schema.fields()) {
            Slices::Writer
        } else {
            Slices::Later(Arc::clone(schema), options.clone())
        };
        // The schema message waits in the sink until the first batch (or `finish`).
        let writer = StreamWriter::try_new_with_options(FrameSink::default(), schema, options)?;
        Ok(Self {
            writer,
            slices,
            max_message_size: max_message_size.max(1),
            pinned: None,
        })
    }

    /// Sends a pinned batch (laid out by [`crate::wire::pinned::lay_out`]) as the message
    /// laid out with it, one shared chunk, without encoding it: the same bytes in one
    /// HTTP/2 frame and no allocation. Only for encoders with default (uncompressed)
    /// options, which is how those messages were encoded.
    pub fn with_pinned_messages(mut self, pinned: Arc<dyn LaidOutMessages>) -> Self {
        self.pinned = Some(pinned);
        self
    }

    /// The messages for `batch`: the schema before the first batch, any dictionaries,
    /// then the batch in one or more pieces.
    /// Empty batches send nothing, as with arrow-flight's encoder.
    pub fn encode(&mut self, batch: &RecordBatch) -> Result<Vec<Frame>, ArrowError> {
        let mut frames = VecDeque::new();
        self.encode_into(batch, &mut frames)?;
        Ok(frames.into())
    }

    /// [`Self::encode`], appending to `frames` (whose capacity a stream reuses).
    pub fn encode_into(
        &mut self,
        batch: &RecordBatch,
        frames: &mut VecDeque<Frame>,
    ) -> Result<(), ArrowError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        // A pinned batch was laid out in one message under the pinning limit; this
        // encoder would send it whole too when its own limit is no smaller.
        if let Some(frame) = self.pinned.as_ref().and_then(|p| {
            p.find(batch).filter(|f| {
                f.payload_len() <= self.max_message_size
                    || p.max_message_size() <= self.max_message_size
            })
        }) {
            frames.extend(self.writer.get_mut().frames.drain(..));
            frames.push_back(frame);
            return Ok(());
        }
        if fits(batch, self.max_message_size) {
            self.write(batch, false)?;
        } else {
            for (i, piece) in split(batch, self.max_message_size)?.iter().enumerate() {
                self.write(piece, i > 0)?;
            }
        }
        frames.extend(self.writer.get_mut().frames.drain(..));
        Ok(())
    }

    /// Encodes `batch` into the sink; `sliced` when it starts inside its buffers (a
    /// piece of a split batch after the first), so that offsets are rebased.
    fn write(&mut self, batch: &RecordBatch, sliced: bool) -> Result<(), ArrowError> {
        if sliced && let Slices::Later(schema, options) = &self.slices {
            // Its own schema message (and an empty batch's) dropped: the writer sent it.
            let mut encoder = StreamEncoder::try_new_with_options(schema, options.clone())?;
            encoder.encode(&RecordBatch::new_empty(Arc::clone(schema)))?;
            self.slices = Slices::Encoder(Box::new(encoder));
        }
        let sink = self.writer.get_mut();
        let written = match &mut self.slices {
            Slices::Encoder(encoder) if sliced => encoder.encode(batch).and_then(|buffers| {
                buffers.iter().for_each(|b| sink.share(b));
                buffers.iter().try_for_each(|b| sink.take(b.as_slice()))
            }),
            _ => {
                for column in batch.columns() {
                    sink.share_array(&column.to_data());
                }
                self.writer.write(batch)
            }
        };
        self.writer.get_mut().owners.clear();
        written
    }

    /// Moves the messages ready now to `frames`: after [`Self::try_new`], the schema
    /// message, so it can be sent before the first batch is computed (a client's
    /// `do_get` returns once it has the schema).
    pub fn ready_into(&mut self, frames: &mut VecDeque<Frame>) {
        frames.extend(self.writer.get_mut().frames.drain(..));
    }

    /// The schema message, when no batch was encoded (an empty result); else nothing.
    /// Flight streams carry no IPC end-of-stream marker.
    pub fn finish(mut self) -> Result<Vec<Frame>, ArrowError> {
        self.writer.finish()?;
        Ok(self.writer.into_inner()?.frames.into())
    }
}

/// Who encodes the pieces of a split batch after the first. arrow-ipc rebases a slice's
/// string offsets into new buffers: its `StreamEncoder` hands them over (so the sink shares
/// them), while its `StreamWriter` writes them out (so the sink copies them). Without
/// dictionaries an encoder holds no stream state but its schema message, so the two can
/// take turns.
enum Slices {
    /// The schema has dictionaries, whose state the writer keeps: it encodes everything.
    Writer,
    /// A `StreamEncoder` made on the first such piece.
    Later(SchemaRef, IpcWriteOptions),
    Encoder(Box<StreamEncoder>),
}

/// Whether any field, at any depth, is dictionary encoded.
fn has_dictionary(fields: &Fields) -> bool {
    fields.iter().any(|f| has_dictionary_type(f.data_type()))
}

fn has_dictionary_type(data_type: &DataType) -> bool {
    match data_type {
        DataType::Dictionary(..) => true,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => has_dictionary_type(f.data_type()),
        DataType::Struct(fields) => has_dictionary(fields),
        DataType::Union(fields, _) => fields
            .iter()
            .any(|(_, f)| has_dictionary_type(f.data_type())),
        DataType::RunEndEncoded(_, values) => has_dictionary_type(values.data_type()),
        _ => false,
    }
}
