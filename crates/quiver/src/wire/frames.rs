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

use arrow::array::{Array, ArrayData, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Fields, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::writer::{IpcWriteOptions, StreamEncoder, StreamWriter};
use bytes::{BufMut, Bytes, BytesMut};

use super::pinned::PinnedMessages;

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

    /// A record batch message arrow-flight encoded, framed for the wire (one chunk, a
    /// copy: for small messages such as keep-alives, not for results).
    pub fn from_flight_data(message: &arrow_flight::FlightData) -> Frame {
        use prost::Message;
        let body = message.encode_to_vec();
        let mut bytes = BytesMut::with_capacity(5 + body.len());
        bytes.put_u8(0);
        bytes.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
        bytes.put_slice(&body);
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
    pinned: Option<Arc<PinnedMessages>>,
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
    pub fn with_pinned_messages(mut self, pinned: Arc<PinnedMessages>) -> Self {
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

/// Whether `batch` goes in one message: the capacity of its buffers bounds the bytes its
/// rows reference, and needs no `ArrayData` to sum.
fn fits(batch: &RecordBatch, max: usize) -> bool {
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

/// Bytes reserved at a time for the gathered pieces of messages (prefixes, IPC headers,
/// padding, small buffers), at most. Chunks are split off a block, and once every chunk of
/// it is sent the block is reused, so gathering allocates nothing per message. Blocks
/// start at [`FIRST_GATHER_BLOCK`] and double, so that a small result allocates little.
const GATHER_BLOCK: usize = 64 * 1024;
const FIRST_GATHER_BLOCK: usize = 2 * 1024;

/// Where [`FrameSink`] is in the IPC stream arrow-ipc writes into it.
#[derive(Debug, Clone, Copy, Default)]
enum Reading {
    /// The continuation marker and header length.
    #[default]
    Prefix,
    /// The IPC header (flatbuffer and padding) of this many bytes.
    Header(usize),
    /// This many bytes of the body still to come.
    Body(usize),
}

/// Receives an IPC stream from arrow-ipc's `StreamWriter` and frames each message as a
/// `FlightData`: the prefix, field headers and IPC header gathered into a chunk, body
/// slices of the batch's own buffers shared, anything else (padding, small buffers,
/// buffers arrow-ipc made anew, such as the rebased offsets of a sliced string column)
/// gathered.
#[derive(Default)]
struct FrameSink {
    /// The batch being written: its buffers of at least [`COPY_BELOW`] bytes, by address.
    owners: Vec<(usize, Buffer)>,
    reading: Reading,
    prefix: [u8; 8],
    prefix_len: usize,
    /// The IPC header as it arrives, and the length of its flatbuffer.
    header: Vec<u8>,
    flatbuffer_len: Option<usize>,
    /// Gathered bytes of the current run; earlier runs are split off as chunks.
    gathered: BytesMut,
    /// Size of the last gathering block reserved.
    block: usize,
    /// The message being framed.
    frame: Frame,
    /// Messages framed and not yet handed out.
    frames: VecDeque<Frame>,
}

impl FrameSink {
    /// Makes `buffer` available to share: body pieces inside it are sent from it.
    fn share(&mut self, buffer: &Buffer) {
        if buffer.len() >= COPY_BELOW {
            self.owners.push((buffer.as_ptr() as usize, buffer.clone()));
        }
    }

    /// [`Self::share`] for every buffer of an array and its children.
    fn share_array(&mut self, data: &ArrayData) {
        let nulls = data.nulls().map(|n| n.buffer());
        for buffer in data.buffers().iter().chain(nulls) {
            self.share(buffer);
        }
        for child in data.child_data() {
            self.share_array(child);
        }
    }

    fn take(&mut self, mut bytes: &[u8]) -> Result<(), ArrowError> {
        while !bytes.is_empty() {
            match self.reading {
                Reading::Prefix => {
                    let n = (8 - self.prefix_len).min(bytes.len());
                    self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&bytes[..n]);
                    self.prefix_len += n;
                    bytes = &bytes[n..];
                    if self.prefix_len == 8 {
                        self.prefix_len = 0;
                        self.begin_header()?;
                    }
                }
                Reading::Header(len) => {
                    // arrow-ipc writes the flatbuffer in one piece and its alignment
                    // padding after it; arrow-flight sends the flatbuffer alone.
                    self.flatbuffer_len.get_or_insert(bytes.len().min(len));
                    let n = (len - self.header.len()).min(bytes.len());
                    self.header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.header.len() == len {
                        self.begin_message()?;
                    }
                }
                Reading::Body(remaining) => {
                    let n = remaining.min(bytes.len());
                    self.put_body(&bytes[..n]);
                    bytes = &bytes[n..];
                    self.reading = Reading::Body(remaining - n);
                    if n == remaining {
                        self.end_message();
                    }
                }
            }
        }
        Ok(())
    }

    fn begin_header(&mut self) -> Result<(), ArrowError> {
        if self.prefix[..4] != [0xFF; 4] {
            return Err(ArrowError::IpcError(
                "IPC stream without continuation marker".into(),
            ));
        }
        let len = i32::from_le_bytes(self.prefix[4..].try_into().expect("4 bytes"));
        let len = usize::try_from(len)
            .map_err(|_| ArrowError::IpcError("negative IPC header length".into()))?;
        // A zero length marks the end of the stream, which Flight does not send.
        if len > 0 {
            self.header.clear();
            self.flatbuffer_len = None;
            self.reading = Reading::Header(len);
        }
        Ok(())
    }

    /// The header is complete: the message's framing, and its IPC header, gathered.
    fn begin_message(&mut self) -> Result<(), ArrowError> {
        let header = std::mem::take(&mut self.header);
        let flatbuffer = &header[..self.flatbuffer_len.unwrap_or(header.len())];
        let message = arrow::ipc::root_as_message(flatbuffer)
            .map_err(|e| ArrowError::IpcError(format!("invalid IPC header: {e}")))?;
        let body_len = usize::try_from(message.bodyLength())
            .map_err(|_| ArrowError::IpcError("negative IPC body length".into()))?;
        let record_batch = message.header_as_record_batch();

        let mut message_len = 1 + varint_len(flatbuffer.len() as u64) + flatbuffer.len();
        if body_len > 0 {
            message_len += DATA_BODY_TAG.len() + varint_len(body_len as u64) + body_len;
        }
        self.frame = Frame {
            chunks: Vec::with_capacity(chunk_count(record_batch, body_len)),
            rows: record_batch.map(|b| b.length().max(0) as u64),
            payload: flatbuffer.len() + body_len,
            body: body_len,
            ..Frame::default()
        };
        self.gather(&[0]);
        self.gather(&(message_len as u32).to_be_bytes());
        self.gather(&[DATA_HEADER_TAG]);
        self.put_varint(flatbuffer.len() as u64);
        self.frame.header = (self.gathered.len(), flatbuffer.len());
        self.gather(flatbuffer);
        self.header = header;
        if body_len > 0 {
            self.gather(&DATA_BODY_TAG);
            self.put_varint(body_len as u64);
            self.reading = Reading::Body(body_len);
        } else {
            self.end_message();
        }
        Ok(())
    }

    /// A piece of the body: shared when it is a large slice of the batch's buffers.
    fn put_body(&mut self, bytes: &[u8]) {
        if bytes.len() >= COPY_BELOW {
            let at = bytes.as_ptr() as usize;
            let owner = self
                .owners
                .iter()
                .find(|(start, b)| *start <= at && at + bytes.len() <= start + b.len());
            if let Some((start, buffer)) = owner {
                let shared = buffer.slice_with_length(at - start, bytes.len());
                self.flush_gathered();
                self.frame.len += shared.len();
                self.frame
                    .chunks
                    .push(Bytes::from_owner(ArrowBytes(shared)));
                return;
            }
        }
        self.gather(bytes);
    }

    fn gather(&mut self, bytes: &[u8]) {
        if self.gathered.capacity() - self.gathered.len() < bytes.len() {
            self.block = (self.block * 2).clamp(FIRST_GATHER_BLOCK, GATHER_BLOCK);
            self.gathered.reserve(bytes.len().max(self.block));
        }
        self.gathered.put_slice(bytes);
    }

    fn put_varint(&mut self, mut v: u64) {
        let mut bytes = [0u8; 10];
        let mut n = 0;
        while v >= 0x80 {
            bytes[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        bytes[n] = v as u8;
        self.gather(&bytes[..=n]);
    }

    fn flush_gathered(&mut self) {
        if !self.gathered.is_empty() {
            let run = self.gathered.split().freeze();
            self.frame.len += run.len();
            self.frame.copied += run.len();
            self.frame.chunks.push(run);
        }
    }

    fn end_message(&mut self) {
        self.flush_gathered();
        self.frames.push_back(std::mem::take(&mut self.frame));
        self.reading = Reading::Prefix;
    }
}

impl std::io::Write for FrameSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.take(bytes).map_err(std::io::Error::other)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The most chunks a message can have, from its buffers: one per buffer of at least
/// [`COPY_BELOW`] bytes, and one per run of gathered bytes between them (framing and
/// header, padding, small buffers).
fn chunk_count(batch: Option<arrow::ipc::RecordBatch<'_>>, body_len: usize) -> usize {
    let mut chunks = 1;
    let Some(buffers) = batch.and_then(|b| b.buffers()) else {
        return chunks;
    };
    let (mut gathering, mut end) = (true, 0);
    for buffer in buffers {
        let (offset, len) = (
            buffer.offset().max(0) as usize,
            buffer.length().max(0) as usize,
        );
        if offset > end && !gathering {
            chunks += 1;
            gathering = true;
        }
        if len >= COPY_BELOW {
            chunks += 1;
            gathering = false;
        } else if len > 0 && !gathering {
            chunks += 1;
            gathering = true;
        }
        end = offset + len;
    }
    if body_len > end && !gathering {
        chunks += 1;
    }
    chunks
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow_flight::encode::FlightDataEncoderBuilder;
    use futures::TryStreamExt;
    use prost::Message;

    use super::*;
    use crate::wire::pinned::lay_out;

    fn batch(rows: usize) -> RecordBatch {
        let ids: ArrayRef = Arc::new(Int64Array::from_iter(
            (0..rows as i64).map(|i| (i % 7 != 0).then_some(i)),
        ));
        let names: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("name-{}", i % 113)),
        ));
        RecordBatch::try_from_iter([("id", ids), ("name", names)]).unwrap()
    }

    /// What tonic sends for arrow-flight's encoding of `batches`: each FlightData
    /// prost-encoded behind a 5-byte gRPC prefix.
    fn reference(batches: Vec<RecordBatch>, max: usize) -> Vec<u8> {
        let schema = batches[0].schema();
        let encoder = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_max_flight_data_size(max)
            .build(futures::stream::iter(batches.into_iter().map(Ok)));
        let messages: Vec<_> = futures::executor::block_on(encoder.try_collect()).unwrap();
        let mut wire = Vec::new();
        for m in messages {
            let body = m.encode_to_vec();
            wire.push(0);
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(&body);
        }
        wire
    }

    fn ours(batches: &[RecordBatch], max: usize) -> (Vec<u8>, Vec<Frame>) {
        ours_with(batches, max, None)
    }

    fn ours_with(
        batches: &[RecordBatch],
        max: usize,
        pinned: Option<Arc<PinnedMessages>>,
    ) -> (Vec<u8>, Vec<Frame>) {
        let schema = batches[0].schema();
        let mut encoder = FrameEncoder::try_new(&schema, IpcWriteOptions::default(), max).unwrap();
        if let Some(pinned) = pinned {
            encoder = encoder.with_pinned_messages(pinned);
        }
        let mut frames = Vec::new();
        for b in batches {
            frames.extend(encoder.encode(b).unwrap());
        }
        frames.extend(encoder.finish().unwrap());
        let wire = frames
            .iter()
            .flat_map(|f| f.chunks().iter().flatten().copied())
            .collect();
        (wire, frames)
    }

    #[test]
    fn bytes_equal_the_standard_path() {
        let batches = [batch(10), batch(70_000), batch(0), batch(3)];
        for max in [2 * 1024 * 1024, 64 * 1024] {
            // Split as the server's standard path splits before arrow-flight encodes: the
            // pieces after the first go through `StreamEncoder` here.
            let pieces: Vec<_> = batches
                .iter()
                .flat_map(|b| split(b, max).unwrap())
                .collect();
            assert!(
                max > 1 << 20 || pieces.len() > 10,
                "{} pieces",
                pieces.len()
            );
            let (wire, frames) = ours(&batches, max);
            assert_equal_wire(&wire, &reference(pieces.clone(), usize::MAX));
            assert_eq!(
                frames.iter().map(Frame::len).sum::<usize>(),
                wire.len(),
                "lengths add up"
            );
            let messages = frames.iter().filter(|f| f.rows().is_some()).count();
            assert_eq!(messages, pieces.iter().filter(|p| p.num_rows() > 0).count());
        }
    }

    fn assert_equal_wire(wire: &[u8], expected: &[u8]) {
        if let Some(at) = wire.iter().zip(expected).position(|(a, b)| a != b) {
            panic!(
                "first difference at byte {at} of {} (expected {}): ours {:?}, reference {:?}",
                wire.len(),
                expected.len(),
                &wire[at.saturating_sub(8)..(at + 24).min(wire.len())],
                &expected[at.saturating_sub(8)..(at + 24).min(expected.len())]
            );
        }
        assert_eq!(wire.len(), expected.len());
    }

    #[test]
    fn large_buffers_are_shared_not_copied() {
        let b = batch(100_000);
        let (wire, frames) = ours(std::slice::from_ref(&b), usize::MAX);
        let copied: usize = frames.iter().map(Frame::copied_bytes).sum();
        assert!(
            copied * 100 < wire.len(),
            "{copied} of {} bytes copied",
            wire.len()
        );
        // The id column's values are sent from the batch's own memory.
        let values = b.column(0).to_data().buffers()[0].as_ptr();
        assert!(
            frames
                .iter()
                .flat_map(Frame::chunks)
                .any(|c| c.as_ptr() == values),
            "the values buffer itself is a chunk"
        );
    }

    #[test]
    fn chunk_lists_are_sized_once() {
        let b = batch(100_000);
        // Whole, and split (pieces after the first sliced).
        for max in [usize::MAX, 256 * 1024] {
            let (_, frames) = ours(std::slice::from_ref(&b), max);
            for frame in &frames {
                assert_eq!(frame.chunks.len(), frame.chunks.capacity(), "{frame:?}");
            }
        }
    }

    #[test]
    fn empty_result_is_just_the_schema() {
        let schema = batch(1).schema();
        let encoder = FrameEncoder::try_new(&schema, IpcWriteOptions::default(), 1024).unwrap();
        let frames = encoder.finish().unwrap();
        assert_eq!(frames.len(), 1);
        let wire: Vec<u8> = frames[0].chunks().iter().flatten().copied().collect();
        let reference = {
            let encoder = FlightDataEncoderBuilder::new()
                .with_schema(schema)
                .build(futures::stream::empty());
            let messages: Vec<_> = futures::executor::block_on(encoder.try_collect()).unwrap();
            assert_eq!(messages.len(), 1);
            messages[0].encode_to_vec()
        };
        assert_eq!(&wire[5..], &reference[..]);
    }

    #[test]
    fn split_batches_decode_to_the_same_rows() {
        let b = batch(50_000);
        let (wire, frames) = ours(std::slice::from_ref(&b), 64 * 1024);
        assert!(frames.len() > 5, "split into several messages");
        // The pieces' rebased string offsets are shared too, not copied.
        let copied: usize = frames.iter().map(Frame::copied_bytes).sum();
        assert!(
            copied * 50 < wire.len(),
            "{copied} of {} bytes copied",
            wire.len()
        );
        let decoded = decode(&wire);
        let decoded = arrow::compute::concat_batches(&b.schema(), &decoded).unwrap();
        assert_eq!(decoded, b);
    }

    /// Decodes `wire` (gRPC-framed FlightData) with arrow-flight's own decoder.
    fn decode(wire: &[u8]) -> Vec<RecordBatch> {
        let mut messages = Vec::new();
        let mut rest = wire;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            messages.push(Ok(
                arrow_flight::FlightData::decode(&rest[5..5 + len]).unwrap()
            ));
            rest = &rest[5 + len..];
        }
        futures::executor::block_on(
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
                futures::stream::iter(messages),
            )
            .try_collect(),
        )
        .unwrap()
    }

    /// Lists, structs, dictionaries, string and binary views, nulls, plain strings.
    fn every_layout(rows: i32) -> RecordBatch {
        use arrow::array::{
            BinaryViewArray, BooleanArray, DictionaryArray, Float64Array, ListArray,
            StringViewArray, StructArray,
        };
        use arrow::datatypes::{Field, Int32Type};
        let list = ListArray::from_iter_primitive::<arrow::datatypes::Int32Type, _, _>(
            (0..rows).map(|i| (i % 5 != 0).then(|| (0..i % 4).map(Some).collect::<Vec<_>>())),
        );
        let strukt = StructArray::from(vec![
            (
                Arc::new(Field::new("x", arrow::datatypes::DataType::Float64, true)),
                Arc::new(Float64Array::from_iter(
                    (0..rows).map(|i| (i % 3 != 0).then_some(i as f64 / 3.0)),
                )) as ArrayRef,
            ),
            (
                Arc::new(Field::new("ok", arrow::datatypes::DataType::Boolean, true)),
                Arc::new(BooleanArray::from_iter((0..rows).map(|i| Some(i % 2 == 0)))) as ArrayRef,
            ),
        ]);
        let dict: DictionaryArray<Int32Type> = (0..rows)
            .map(|i| ["red", "green", "blue"][i as usize % 3])
            .collect();
        let views = StringViewArray::from_iter(
            (0..rows)
                .map(|i| (i % 11 != 0).then(|| format!("a longer string than twelve bytes {i}"))),
        );
        let binary =
            BinaryViewArray::from_iter_values((0..rows).map(|i| vec![i as u8; (i % 20) as usize]));
        RecordBatch::try_from_iter([
            ("list", Arc::new(list) as ArrayRef),
            ("struct", Arc::new(strukt) as ArrayRef),
            ("dict", Arc::new(dict) as ArrayRef),
            ("views", Arc::new(views) as ArrayRef),
            ("binary", Arc::new(binary) as ArrayRef),
            ("base", batch(rows as usize).column(1).clone()),
        ])
        .unwrap()
    }

    #[test]
    fn every_layout_round_trips() {
        let full = every_layout(5_000);
        // Whole, sliced from an odd offset, and split into small messages.
        for (input, max) in [
            (full.clone(), usize::MAX),
            (full.slice(777, 1_234), usize::MAX),
            (full.clone(), 16 * 1024),
        ] {
            let (wire, _) = ours(std::slice::from_ref(&input), max);
            let decoded = decode(&wire);
            let decoded = arrow::compute::concat_batches(&input.schema(), &decoded).unwrap();
            assert_eq!(decoded, input, "max message size {max}");
        }
    }

    #[test]
    fn pinned_batches_go_out_as_one_chunk_each() {
        let max = 2 * 1024 * 1024;
        let pinned = Arc::new(PinnedMessages::new(usize::MAX));
        let originals = [batch(8_192), batch(3), batch(20_000)];
        let laid_out: Vec<_> = originals
            .iter()
            .map(|b| lay_out(b).unwrap().expect("no dictionaries"))
            .collect();
        let batches: Vec<_> = laid_out.iter().map(|l| l.batch.clone()).collect();
        assert_eq!(batches, originals);
        for l in &laid_out {
            let body = l.batch.column(0).to_data().buffers()[0].as_ptr() as usize;
            assert_eq!(body % 64, 0, "buffers aligned in the allocation");
            assert!(l.allocated >= l.frame.len());
        }
        let registration = pinned.register(
            laid_out
                .iter()
                .map(|l| (l.batch.clone(), l.frame.clone()))
                .collect(),
        );
        assert_eq!(pinned.len(), 3);

        // What arrow-flight sends, byte for byte, one chunk per batch message.
        let (wire, frames) = ours_with(&batches, max, Some(Arc::clone(&pinned)));
        assert_eq!(wire, reference(originals.to_vec(), max));
        let messages: Vec<_> = frames.iter().filter(|f| f.rows().is_some()).collect();
        assert_eq!(messages.len(), 3);
        for (frame, l) in messages.iter().zip(&laid_out) {
            assert_eq!(frame.chunks().len(), 1, "{frame:?}");
            assert_eq!(frame.copied_bytes(), 0);
            // Sent from the memory the batch lives in.
            let chunk = frame.chunks()[0].as_ptr_range();
            let values = l.batch.column(0).to_data().buffers()[0].as_ptr();
            assert!(chunk.contains(&values));
        }

        // Anything but the very batch is encoded as usual, to the same bytes: a slice, a
        // projection, a batch above the message limit (split), a copy of the batch.
        let slice = batches[0].slice(777, 1_234);
        let projected = batches[0].project(&[1]).unwrap();
        let copy = RecordBatch::try_new(
            originals[0].schema(),
            originals[0]
                .columns()
                .iter()
                .map(|c| {
                    arrow::compute::kernels::take::take(
                        c,
                        &Int64Array::from_iter_values(0..c.len() as i64),
                        None,
                    )
                    .unwrap()
                })
                .collect(),
        )
        .unwrap();
        for (input, max) in [
            (slice, max),
            (projected, max),
            (batches[2].clone(), 64 * 1024),
            (copy, max),
        ] {
            let (theirs, frames) =
                ours_with(std::slice::from_ref(&input), max, Some(Arc::clone(&pinned)));
            assert_eq!(theirs, ours(std::slice::from_ref(&input), max).0);
            let pinned_chunks: Vec<_> = laid_out
                .iter()
                .map(|l| l.frame.chunks()[0].as_ptr())
                .collect();
            assert!(
                frames
                    .iter()
                    .flat_map(Frame::chunks)
                    .all(|c| !pinned_chunks.contains(&c.as_ptr()))
            );
        }

        // Unregistered, the same batches are encoded as usual.
        drop(registration);
        assert!(pinned.is_empty());
        let (after, after_frames) = ours_with(&batches, max, Some(Arc::clone(&pinned)));
        assert_eq!(after, wire);
        assert!(after_frames.iter().any(|f| f.chunks().len() > 1));
    }

    #[test]
    fn batches_with_dictionaries_are_not_laid_out() {
        assert!(lay_out(&every_layout(100)).unwrap().is_none());
        let without = every_layout(5_000).project(&[0, 1, 3, 4, 5]).unwrap();
        let laid_out = lay_out(&without).unwrap().expect("no dictionaries");
        assert_eq!(laid_out.batch, without);
        let pinned = Arc::new(PinnedMessages::new(usize::MAX));
        let _registration = pinned.register(vec![(laid_out.batch.clone(), laid_out.frame.clone())]);
        let (wire, frames) = ours_with(
            std::slice::from_ref(&laid_out.batch),
            usize::MAX,
            Some(Arc::clone(&pinned)),
        );
        assert_eq!(frames.len(), 2);
        assert_eq!(wire, ours(&[without], usize::MAX).0);
    }

    #[test]
    fn flight_data_frames_round_trip() {
        use prost::Message;
        let message = arrow_flight::FlightData {
            data_header: vec![1, 2, 3].into(),
            data_body: vec![4; 300].into(),
            ..Default::default()
        };
        let frame = Frame::from_flight_data(&message);
        let bytes: Vec<u8> = frame.chunks().concat();
        assert_eq!(bytes.len(), frame.len());
        assert_eq!(bytes[0], 0);
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 5, bytes.len());
        assert_eq!(
            arrow_flight::FlightData::decode(&bytes[5..]).unwrap(),
            message
        );
        let (start, header_len) = frame.header_range();
        assert_eq!(&bytes[start..start + header_len], &[1, 2, 3]);
        assert_eq!(frame.body_len(), 300);
        assert_eq!(frame.rows(), None, "not a record batch header");
    }

    #[test]
    fn varints_match_prost() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut sink = FrameSink::default();
            sink.put_varint(v);
            let mut expected = Vec::new();
            prost::encoding::encode_varint(v, &mut expected);
            assert_eq!(&sink.gathered[..], &expected[..]);
            assert_eq!(varint_len(v), expected.len());
        }
    }
}
