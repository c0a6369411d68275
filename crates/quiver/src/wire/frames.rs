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
//! wire format does not change, only who copies.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::writer::{IpcWriteOptions, StreamEncoder};
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

/// Builds a [`Frame`], gathering small pieces and sharing large ones.
#[derive(Debug, Default)]
struct FrameBuilder {
    frame: Frame,
    small: BytesMut,
}

impl FrameBuilder {
    fn with_capacity(chunks: usize, small: usize) -> Self {
        Self {
            frame: Frame {
                chunks: Vec::with_capacity(chunks),
                ..Frame::default()
            },
            small: BytesMut::with_capacity(small),
        }
    }

    fn put_slice(&mut self, bytes: &[u8]) {
        self.small.put_slice(bytes);
    }

    fn put_buffer(&mut self, buffer: Buffer) {
        if buffer.len() < COPY_BELOW {
            self.put_slice(buffer.as_slice());
            return;
        }
        self.flush_small();
        self.frame.len += buffer.len();
        self.frame
            .chunks
            .push(Bytes::from_owner(ArrowBytes(buffer)));
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            let small = self.small.split().freeze();
            self.frame.len += small.len();
            self.frame.copied += small.len();
            self.frame.chunks.push(small);
        }
    }

    fn finish(mut self) -> Frame {
        self.flush_small();
        self.frame
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
pub struct FrameEncoder {
    encoder: StreamEncoder,
    max_message_size: usize,
    /// Messages already laid out for pinned batches.
    pinned: Option<Arc<PinnedMessages>>,
    /// Whether `encoder` has sent the schema.
    schema_sent: bool,
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
        Ok(Self {
            encoder: StreamEncoder::try_new_with_options(schema, options)?,
            max_message_size: max_message_size.max(1),
            pinned: None,
            schema_sent: false,
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
        let mut frames = Vec::new();
        if batch.num_rows() == 0 {
            return Ok(frames);
        }
        // A pinned batch was laid out in one message under the pinning limit; this
        // encoder would send it whole too when its own limit is no smaller.
        if let Some(frame) = self.pinned.as_ref().and_then(|p| {
            p.find(batch).filter(|f| {
                f.payload_len() <= self.max_message_size
                    || p.max_message_size() <= self.max_message_size
            })
        }) {
            if !self.schema_sent {
                // The encoder writes the schema before its first batch: an empty one,
                // whose own message is dropped.
                let buffers = self.encoder.encode(&batch.slice(0, 0))?;
                frame_ipc_messages(buffers, &mut frames)?;
                frames.retain(|f| f.rows.is_none());
                self.schema_sent = true;
            }
            frames.push(frame);
            return Ok(frames);
        }
        for piece in split(batch, self.max_message_size)? {
            let buffers = self.encoder.encode(&piece)?;
            self.schema_sent = true;
            frame_ipc_messages(buffers, &mut frames)?;
        }
        Ok(frames)
    }

    /// The schema message, when no batch was encoded (an empty result); else nothing.
    /// Flight streams carry no IPC end-of-stream marker.
    pub fn finish(self) -> Result<Vec<Frame>, ArrowError> {
        let mut frames = Vec::new();
        frame_ipc_messages(self.encoder.finish()?, &mut frames)?;
        Ok(frames)
    }
}

/// `batch` in row ranges of about `max` bytes each (by the bytes the rows reference,
/// not the capacity of shared buffers), as arrow-flight splits them.
pub fn split(batch: &RecordBatch, max: usize) -> Result<Vec<RecordBatch>, ArrowError> {
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

/// Reads the IPC stream `buffers` (as `StreamEncoder` lays them out: continuation
/// marker and length, flatbuffer header, padding, body buffers with their padding)
/// message by message, and frames each as a `FlightData`.
fn frame_ipc_messages(buffers: Vec<Buffer>, frames: &mut Vec<Frame>) -> Result<(), ArrowError> {
    let mut rope = Rope::new(buffers);
    while !rope.is_empty() {
        let prefix = rope.take_contiguous(8)?;
        if prefix[..4] != [0xFF; 4] {
            return Err(ArrowError::IpcError(
                "IPC stream without continuation marker".into(),
            ));
        }
        let header_len = i32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes"));
        if header_len == 0 {
            // End of stream: Flight does not send it.
            continue;
        }
        let header_len = usize::try_from(header_len)
            .map_err(|_| ArrowError::IpcError("negative IPC header length".into()))?;
        // StreamEncoder writes the flatbuffer as one buffer and its alignment padding
        // after it; arrow-flight sends the flatbuffer without the padding.
        let unpadded = rope.front_len().min(header_len);
        let header = rope.take_contiguous(unpadded)?;
        rope.take(header_len - unpadded)?;
        let message = arrow::ipc::root_as_message(&header)
            .map_err(|e| ArrowError::IpcError(format!("invalid IPC header: {e}")))?;
        let body_len = usize::try_from(message.bodyLength())
            .map_err(|_| ArrowError::IpcError("negative IPC body length".into()))?;
        let rows = message
            .header_as_record_batch()
            .map(|b| b.length().max(0) as u64);
        let body = rope.take(body_len)?;
        let mut frame = flight_data_frame(&header, body);
        frame.rows = rows;
        frame.payload = header.len() + body_len;
        frames.push(frame);
    }
    Ok(())
}

fn flight_data_frame(header: &[u8], body: Vec<Buffer>) -> Frame {
    let body_len: usize = body.iter().map(Buffer::len).sum();
    let mut message_len = 0;
    if !header.is_empty() {
        message_len += 1 + varint_len(header.len() as u64) + header.len();
    }
    if body_len > 0 {
        message_len += DATA_BODY_TAG.len() + varint_len(body_len as u64) + body_len;
    }
    // One chunk per body buffer at most, plus the gathered header; the gathered bytes
    // start with the prefix, the field headers and the IPC header.
    let mut builder = FrameBuilder::with_capacity(body.len() + 1, 16 + header.len());
    builder.put_slice(&[0]);
    builder.put_slice(&(message_len as u32).to_be_bytes());
    if !header.is_empty() {
        builder.put_slice(&[DATA_HEADER_TAG]);
        put_varint(&mut builder, header.len() as u64);
        builder.frame.header = (builder.small.len(), header.len());
        builder.put_slice(header);
    }
    builder.frame.body = body_len;
    if body_len > 0 {
        builder.put_slice(&DATA_BODY_TAG);
        put_varint(&mut builder, body_len as u64);
        for buffer in body {
            builder.put_buffer(buffer);
        }
    }
    builder.finish()
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(builder: &mut FrameBuilder, mut v: u64) {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        bytes[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    builder.put_slice(&bytes[..=n]);
}

/// A sequence of buffers read front to back, taking byte ranges without copying.
struct Rope {
    buffers: std::collections::VecDeque<Buffer>,
}

impl Rope {
    fn new(mut buffers: Vec<Buffer>) -> Self {
        buffers.retain(|b| !b.is_empty());
        // Reuses the Vec's allocation.
        Self {
            buffers: buffers.into(),
        }
    }

    fn is_empty(&self) -> bool {
        self.buffers.is_empty()
    }

    /// Length of the next buffer.
    fn front_len(&self) -> usize {
        self.buffers.front().map_or(0, Buffer::len)
    }

    /// The next `n` bytes as the buffers (or slices of them) that hold them.
    fn take(&mut self, mut n: usize) -> Result<Vec<Buffer>, ArrowError> {
        // Sized once: the buffers the range touches.
        let mut covered = 0;
        let touched = self
            .buffers
            .iter()
            .take_while(|b| {
                let before = covered;
                covered += b.len();
                before < n
            })
            .count();
        let mut out = Vec::with_capacity(touched);
        while n > 0 {
            let Some(front) = self.buffers.pop_front() else {
                return Err(ArrowError::IpcError(
                    "IPC stream ended inside a message".into(),
                ));
            };
            if front.len() <= n {
                n -= front.len();
                out.push(front);
            } else {
                out.push(front.slice_with_length(0, n));
                self.buffers.push_front(front.slice(n));
                n = 0;
            }
        }
        Ok(out)
    }

    /// The next `n` bytes in one piece (copied only if they span buffers).
    fn take_contiguous(&mut self, n: usize) -> Result<Buffer, ArrowError> {
        let mut parts = self.take(n)?;
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        let mut joined = Vec::with_capacity(n);
        for part in &parts {
            joined.extend_from_slice(part.as_slice());
        }
        Ok(Buffer::from_vec(joined))
    }
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
        let (wire, frames) = ours(&batches, 2 * 1024 * 1024);
        let expected = reference(batches.to_vec(), 2 * 1024 * 1024);
        if let Some(at) = wire.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!(
                "first difference at byte {at} of {} (expected {}): ours {:?}, reference {:?}",
                wire.len(),
                expected.len(),
                &wire[at.saturating_sub(8)..(at + 24).min(wire.len())],
                &expected[at.saturating_sub(8)..(at + 24).min(expected.len())]
            );
        }
        assert_eq!(wire.len(), expected.len());
        assert_eq!(
            frames.iter().map(Frame::len).sum::<usize>(),
            wire.len(),
            "lengths add up"
        );
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
            let mut builder = FrameBuilder::default();
            put_varint(&mut builder, v);
            let frame = builder.finish();
            let mut expected = Vec::new();
            prost::encoding::encode_varint(v, &mut expected);
            assert_eq!(frame.chunks()[0].as_ref(), &expected[..]);
            assert_eq!(varint_len(v), expected.len());
        }
    }
}
