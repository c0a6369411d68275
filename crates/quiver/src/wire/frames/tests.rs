//! The encoder against arrow-flight + prost, byte for byte, and decode round trips.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow_flight::encode::FlightDataEncoderBuilder;
use futures::TryStreamExt;
use prost::Message;

use super::*;
use crate::wire::pinned::{PinnedMessages, lay_out};

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
        arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(futures::stream::iter(
            messages,
        ))
        .try_collect(),
    )
    .unwrap()
}

/// Lists, structs, dictionaries, string and binary views, nulls, plain strings.
fn every_layout(rows: i32) -> RecordBatch {
    use arrow::array::{
        BinaryViewArray, BooleanArray, DictionaryArray, Float64Array, ListArray, StringViewArray,
        StructArray,
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
        (0..rows).map(|i| (i % 11 != 0).then(|| format!("a longer string than twelve bytes {i}"))),
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
