//! Bytes allocated and copied on the DoGet send path, per byte sent: the standard path
//! (arrow-flight's `FlightDataEncoder`, then tonic's prost codec writing each message into
//! its own buffer) against the zero-copy path (`FrameEncoder`), on the same batches, and
//! the zero-copy path sending a pinned table (batches laid out with their messages by
//! `wire::pinned`, as `--pin-table` holds them).
//!
//! ```sh
//! target/release/send_copies --parquet ~/.cache/quiver/tpch-sf1/lineitem.parquet
//! ```
//!
//! Allocation is jemalloc's own per-thread counter (`thread.allocatedp`) read before and
//! after encoding; every step runs on this thread. Copies on the zero-copy path are the
//! bytes it gathers into shared chunks (`Frame::copied_bytes`); the standard path copies
//! every body byte twice (into the IPC body, then into the gRPC message), which its
//! allocation shows. CPU is this thread's time per byte, against one `memcpy` of the same
//! bytes into a buffer allocated once (the floor for anything that touches each byte).

use std::fs::File;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use arrow_flight::encode::FlightDataEncoderBuilder;
use bytes::{BufMut, BytesMut};
use clap::Parser;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamEncoder};
use datafusion::arrow::record_batch::RecordBatchReader;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use futures::{StreamExt, stream};
use prost::Message;
use quiver::wire::frames::{FrameEncoder, split};
use quiver::wire::pinned::{PinnedMessages, Registration, lay_out};
use quiver::wire::views;
use tikv_jemalloc_ctl::thread::allocatedp;

/// The server's allocator, whose counters are read here.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The server's default message target (`--max-encoding-message-size` splits above it).
const MESSAGE_TARGET: usize = 2 * 1024 * 1024;

#[derive(Parser)]
#[command(about = "Bytes allocated and copied per byte sent, standard vs zero-copy send path")]
struct Args {
    /// Parquet file whose rows are encoded (e.g. TPC-H lineitem).
    #[arg(long)]
    parquet: PathBuf,
    /// Rows per batch, as the scan would produce them; repeatable.
    #[arg(long = "batch-rows", default_values_t = [8192usize, 65536])]
    batch_rows: Vec<usize>,
    /// Timed repetitions per path; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// What one path did to send the batches once.
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    /// Bytes on the wire (gRPC messages with their 5-byte prefixes).
    wire: usize,
    /// Bytes allocated on this thread while encoding.
    allocated: u64,
    /// Bytes copied out of the batches' buffers (zero-copy path only).
    copied: Option<usize>,
    /// Seconds of this thread.
    seconds: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let allocated =
        allocatedp::mib().map_err(|e| anyhow::anyhow!("jemalloc thread.allocatedp: {e}"))?;
    let counter = || allocated.read().map(|c| c.get()).unwrap_or(0);

    println!(
        "{}: bytes allocated and copied on the send path per byte sent, median of {} runs\n",
        args.parquet.display(),
        args.runs
    );
    println!(
        "| batch rows | path | MB sent | allocated / sent | copied / sent | ns per KB | vs memcpy |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let memcpy_per_byte = median_seconds(args.runs, memcpy) / MEMCPY_BYTES as f64;
    for &rows in &args.batch_rows {
        let batches = read(&args.parquet, rows)?;
        let (pinned, _registration, pinned_batches) = pin(&batches)?;
        let paths: [(&str, &dyn Fn() -> anyhow::Result<Sent>); 4] = [
            ("standard (FlightDataEncoder + prost)", &|| {
                standard(batches.clone(), counter)
            }),
            ("arrow-ipc StreamEncoder alone, for comparison", &|| {
                stream_encoder(&batches, counter)
            }),
            ("zero-copy (FrameEncoder)", &|| {
                zero_copy(&batches, None, counter)
            }),
            ("zero-copy, pinned table", &|| {
                zero_copy(&pinned_batches, Some(Arc::clone(&pinned)), counter)
            }),
        ];
        for (name, path) in paths {
            let mut runs = (0..args.runs.max(1))
                .map(|_| path())
                .collect::<anyhow::Result<Vec<_>>>()?;
            runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
            let sent = runs[runs.len() / 2];
            let per_sent = |n: f64| n / sent.wire as f64;
            println!(
                "| {rows} | {name} | {:.1} | {:.4} | {} | {:.1} | {:.2}x |",
                sent.wire as f64 / 1e6,
                per_sent(sent.allocated as f64),
                sent.copied
                    .map_or("2 (every body byte, twice)".into(), |c| format!(
                        "{:.4}",
                        per_sent(c as f64)
                    )),
                sent.seconds * 1e9 / (sent.wire as f64 / 1024.0),
                sent.seconds / sent.wire as f64 / memcpy_per_byte,
            );
        }
    }
    Ok(())
}

/// The file's rows in batches of `rows`, with string views expanded as the server sends
/// them (the send path's input).
fn read(path: &PathBuf, rows: usize) -> anyhow::Result<Vec<RecordBatch>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
        .with_batch_size(rows)
        .build()?;
    let expanded = views::expand_schema(&reader.schema());
    reader
        .map(|batch| Ok(views::expand_batch(batch?, &expanded, None)?))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("reading the Parquet file")
}

/// `batches` as a pinned table holds them: in pieces no larger than a message, each
/// laid out with its message (registered while the guard lives).
fn pin(
    batches: &[RecordBatch],
) -> anyhow::Result<(Arc<PinnedMessages>, Registration, Vec<RecordBatch>)> {
    let pinned = Arc::new(PinnedMessages::new(MESSAGE_TARGET));
    let (mut held, mut messages) = (Vec::new(), Vec::new());
    for batch in batches {
        for piece in split(batch, MESSAGE_TARGET)? {
            match lay_out(&piece)? {
                Some(laid_out) => {
                    messages.push((laid_out.batch.clone(), laid_out.frame));
                    held.push(laid_out.batch);
                }
                None => held.push(piece),
            }
        }
    }
    let registration = pinned.register(messages);
    Ok((pinned, registration, held))
}

/// `batches` by value: the encoder's input stream must own them (a clone of the Vec shares
/// the buffers, so no data is copied to call this).
fn standard(batches: Vec<RecordBatch>, allocated: impl Fn() -> u64) -> anyhow::Result<Sent> {
    let schema = batches[0].schema();
    let input = stream::iter(batches.into_iter().map(Ok));
    let started = Instant::now();
    let before = allocated();
    let mut encoder = FlightDataEncoderBuilder::new()
        .with_options(IpcWriteOptions::default())
        .with_max_flight_data_size(MESSAGE_TARGET)
        .with_schema(Arc::clone(&schema))
        .build(input);
    let mut wire = 0;
    futures::executor::block_on(async {
        while let Some(message) = encoder.next().await {
            let message = message?;
            // tonic's codec: the 5-byte prefix and the whole message, in a buffer that
            // h2 holds until it is written, so the next message needs a new one.
            let len = message.encoded_len();
            let mut body = BytesMut::with_capacity(5 + len);
            body.put_u8(0);
            body.put_u32(len as u32);
            message.encode(&mut body)?;
            wire += black_box(body.freeze()).len();
        }
        anyhow::Ok(())
    })?;
    Ok(Sent {
        wire,
        allocated: allocated() - before,
        copied: None,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// arrow-ipc's `StreamEncoder` alone on the same pieces, framing nothing: what encoding
/// with it allocates (its metadata, a `Buffer` per padding, its buffer list), against
/// `FrameEncoder`, which encodes whole batches with arrow-ipc's `StreamWriter` into its
/// own sink instead. Bytes "sent" are the IPC stream's.
fn stream_encoder(batches: &[RecordBatch], allocated: impl Fn() -> u64) -> anyhow::Result<Sent> {
    let schema = batches[0].schema();
    let pieces = batches
        .iter()
        .map(|b| split(b, MESSAGE_TARGET))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let before = allocated();
    let mut encoder = StreamEncoder::try_new_with_options(&schema, IpcWriteOptions::default())?;
    let mut wire = 0;
    for piece in pieces.iter().flatten() {
        let buffers = encoder.encode(piece)?;
        wire += buffers.iter().map(|b| b.len()).sum::<usize>();
        black_box(buffers);
    }
    Ok(Sent {
        wire,
        allocated: allocated() - before,
        copied: Some(0),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn zero_copy(
    batches: &[RecordBatch],
    pinned: Option<Arc<PinnedMessages>>,
    allocated: impl Fn() -> u64,
) -> anyhow::Result<Sent> {
    let schema = batches[0].schema();
    let started = Instant::now();
    let before = allocated();
    let mut encoder = FrameEncoder::try_new(&schema, IpcWriteOptions::default(), MESSAGE_TARGET)?;
    if let Some(pinned) = pinned {
        encoder = encoder.with_pinned_messages(pinned);
    }
    let (mut wire, mut copied) = (0, 0);
    for batch in batches {
        for frame in encoder.encode(batch)? {
            wire += frame.len();
            copied += frame.copied_bytes();
            black_box(frame);
        }
    }
    Ok(Sent {
        wire,
        allocated: allocated() - before,
        copied: Some(copied),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Bytes the `memcpy` baseline copies: larger than the caches, as the batches are.
const MEMCPY_BYTES: usize = 256 * 1024 * 1024;

/// Seconds for one `memcpy` of `MEMCPY_BYTES` into a buffer allocated and written
/// beforehand (so no page faults are timed).
fn memcpy() -> f64 {
    let source = vec![7u8; MEMCPY_BYTES];
    let mut target = vec![1u8; MEMCPY_BYTES];
    let started = Instant::now();
    target.copy_from_slice(black_box(&source));
    black_box(&target);
    started.elapsed().as_secs_f64()
}

fn median_seconds(runs: usize, f: impl Fn() -> f64) -> f64 {
    let mut times: Vec<f64> = (0..runs.max(1)).map(|_| f()).collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
