//! What the Flight port's response bodies are made of.
//!
//! h2 writes each HTTP/2 DATA frame with one `writev` of the frame's head and the slices
//! of its payload, and hands a body's data on one frame at a time. tonic's bodies carry
//! `Bytes`, so a `DoGet` message sent as the Arrow buffers it is (one `Bytes` each) went
//! out as one frame and one system call per buffer: ~25 for a 1 MB batch of lineitem.
//! A [`Chunks`] is a whole message's buffers as one piece of data: one frame, written
//! with one `writev` of all its slices, still without copying them.
//!
//! [`PortBody`] puts the two kinds of response under one type: tonic's bodies (every RPC
//! but `DoGet`), each message a single `Bytes`, and the `DoGet` route's, each message
//! its chunks.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use super::route::FrameBody;

/// The buffers of one message, read as one [`Buf`] in order.
#[derive(Debug, Default)]
pub struct Chunks {
    /// Never an empty one: `chunk()` must not be empty while bytes remain.
    chunks: Vec<Bytes>,
    /// Index of the first chunk not yet read to its end.
    next: usize,
    remaining: usize,
}

impl Chunks {
    /// `chunks` in order, the empty ones left out.
    pub fn new(mut chunks: Vec<Bytes>) -> Self {
        chunks.retain(|c| !c.is_empty());
        let remaining = chunks.iter().map(Bytes::len).sum();
        Self {
            chunks,
            next: 0,
            remaining,
        }
    }
}

impl From<Bytes> for Chunks {
    fn from(bytes: Bytes) -> Self {
        Self::new(vec![bytes])
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.get(self.next).map_or(&[], |c| c.as_ref())
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let unread = &self.chunks[self.next.min(self.chunks.len())..];
        for (slot, chunk) in dst.iter_mut().zip(unread) {
            *slot = IoSlice::new(chunk);
        }
        dst.len().min(unread.len())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(
            cnt <= self.remaining,
            "advance past the end: {cnt} of {} bytes",
            self.remaining
        );
        self.remaining -= cnt;
        while cnt > 0 {
            let chunk = &mut self.chunks[self.next];
            if cnt < chunk.len() {
                chunk.advance(cnt);
                return;
            }
            cnt -= chunk.len();
            // Drop the buffer's reference as soon as it is written.
            *chunk = Bytes::new();
            self.next += 1;
        }
    }
}

/// A response body of the Flight port: tonic's, or the `DoGet` route's.
pub enum PortBody {
    /// Every RPC but `DoGet`: each message one `Bytes`.
    Tonic(tonic::body::Body),
    /// `DoGet`: each message all its chunks.
    DoGet(FrameBody),
}

impl Body for PortBody {
    type Data = Chunks;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunks>, Status>>> {
        match self.get_mut() {
            Self::Tonic(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map(|frame| frame.map_data(Chunks::from)))),
            Self::DoGet(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Tonic(body) => body.is_end_stream(),
            Self::DoGet(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Tonic(body) => body.size_hint(),
            Self::DoGet(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_as_the_concatenation_of_its_chunks() {
        let parts: Vec<Bytes> = ["", "head", "", "a longer body", "x", ""]
            .into_iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect();
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        // Every split point: advance that far, then the rest reads as the whole's tail,
        // by chunk() and by chunks_vectored() alike.
        for at in 0..=whole.len() {
            let mut chunks = Chunks::new(parts.clone());
            assert_eq!(chunks.remaining(), whole.len());
            chunks.advance(at);
            assert_eq!(chunks.remaining(), whole.len() - at);
            let mut slices = [IoSlice::new(&[]); 8];
            let n = chunks.chunks_vectored(&mut slices);
            let gathered: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(gathered, whole[at..], "vectored after {at}");
            assert!(slices[..n].iter().all(|s| !s.is_empty()));
            let mut read = Vec::new();
            while chunks.has_remaining() {
                let chunk = chunks.chunk();
                assert!(!chunk.is_empty(), "an empty chunk with bytes left");
                read.extend_from_slice(chunk);
                let len = chunk.len();
                chunks.advance(len);
            }
            assert_eq!(read, whole[at..], "chunk by chunk after {at}");
        }
    }

    #[test]
    fn fills_no_more_slices_than_it_is_given() {
        let mut chunks = Chunks::new(vec![
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"c"),
        ]);
        let mut slices = [IoSlice::new(&[]); 2];
        assert_eq!(chunks.chunks_vectored(&mut slices), 2);
        assert_eq!(&*slices[1], b"b");
        assert_eq!(chunks.copy_to_bytes(3), Bytes::from_static(b"abc"));
    }
}
