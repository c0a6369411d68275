//! [`FrameSink`]: where arrow-ipc writes an IPC stream, and each message becomes a
//! [`Frame`] of gathered small pieces and shared Arrow buffers.

use std::collections::VecDeque;

use arrow::array::ArrayData;
use arrow::buffer::Buffer;
use arrow::error::ArrowError;
use bytes::{BufMut, Bytes, BytesMut};

use super::{ArrowBytes, COPY_BELOW, DATA_BODY_TAG, DATA_HEADER_TAG, Frame};

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
pub(super) struct FrameSink {
    /// The batch being written: its buffers of at least [`COPY_BELOW`] bytes, by address.
    pub(super) owners: Vec<(usize, Buffer)>,
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
    pub(super) frames: VecDeque<Frame>,
}

impl FrameSink {
    /// Makes `buffer` available to share: body pieces inside it are sent from it.
    pub(super) fn share(&mut self, buffer: &Buffer) {
        if buffer.len() >= COPY_BELOW {
            self.owners.push((buffer.as_ptr() as usize, buffer.clone()));
        }
    }

    /// [`Self::share`] for every buffer of an array and its children.
    pub(super) fn share_array(&mut self, data: &ArrayData) {
        let nulls = data.nulls().map(|n| n.buffer());
        for buffer in data.buffers().iter().chain(nulls) {
            self.share(buffer);
        }
        for child in data.child_data() {
            self.share_array(child);
        }
    }

    pub(super) fn take(&mut self, mut bytes: &[u8]) -> Result<(), ArrowError> {
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

    fn put_varint(&mut self, v: u64) {
        let mut bytes = [0u8; 10];
        let n = {
            let mut buf = &mut bytes[..];
            prost::encoding::encode_varint(v, &mut buf);
            10 - buf.len()
        };
        self.gather(&bytes[..n]);
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

pub(super) fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}
