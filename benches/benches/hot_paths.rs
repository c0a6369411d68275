//! criterion micro-benchmarks of the per-request and per-batch hot paths.
//!
//! `cargo bench --workspace --bench hot_paths` (add `-- --quick` for a short run).
//!
//! Every group carries its own baseline measured in the same process, so the figures to
//! read are ratios within a group:
//! - `ticket_decode`: telling the three ticket forms apart (docs/protocol.md), against
//!   copying the same bytes into a `String`, the least any decoder must do.
//! - `flight_encode/*`: a result batch to `FlightData` messages through the send path
//!   (`FlightDataEncoderBuilder`, 2 MiB messages) and then to one contiguous gRPC body
//!   the way tonic's codec writes it, against one `memcpy` of the batch's bytes (into a
//!   buffer that is reused, so the floor, not the cost of fresh memory); and through the
//!   zero-copy send path (`zero_copy_frames`), whose messages share the batch buffers.
//! - `expand_views`: the Utf8View -> Utf8 cast every string column takes before it is
//!   sent, against one `memcpy` of the batch's bytes.

use std::hint::black_box;
use std::sync::Arc;

use arrow_flight::FlightData;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use futures::{TryStreamExt, stream};
use prost::Message;
use quiver::flight::ticket::{self, QueryTicket};
use quiver::wire::frames::FrameEncoder;
use quiver::wire::views;

/// The server's allocator: encoding allocates, and glibc's malloc would measure page faults
/// of fresh mappings for every large buffer instead.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const SQL: &str = "SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty \
                   FROM lineitem WHERE l_shipdate <= DATE '1998-09-02' \
                   GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus";

fn ticket_decode(c: &mut Criterion) {
    let plain = SQL.as_bytes().to_vec();
    let ours = QueryTicket::new(SQL)
        .with_query_id("0193a4f1-7d2c-7c3e-9a51-5c1f0e9b2a77")
        .encode_any()
        .to_vec();
    let flight_sql = CommandStatementQuery {
        query: SQL.to_string(),
        transaction_id: None,
    }
    .as_any()
    .encode_to_vec();

    let mut group = c.benchmark_group("ticket_decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline_copy_to_string", |b| {
        b.iter(|| String::from_utf8(black_box(&plain).clone()).unwrap())
    });
    for (name, bytes) in [
        ("sql_text", &plain),
        ("query_ticket", &ours),
        ("flight_sql_any", &flight_sql),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| ticket::decode(black_box(bytes)).unwrap())
        });
    }
    group.finish();
}

/// A batch of the shape of TPC-H lineitem's hot columns: ids, prices and short strings.
fn batch(rows: usize) -> RecordBatch {
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows as i64));
    let prices: ArrayRef = Arc::new(Float64Array::from_iter_values(
        (0..rows).map(|i| (i % 10_000) as f64 * 1.25),
    ));
    let comments: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..rows).map(|i| format!("carefully final deposits {}", i % 977)),
    ));
    RecordBatch::try_from_iter([("id", ids), ("price", prices), ("comment", comments)]).unwrap()
}

fn batch_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .flat_map(|c| c.to_data().buffers().to_vec())
        .map(|b| b.len())
        .sum()
}

/// One `memcpy` of `bytes` into a buffer allocated (and faulted in) once: the floor any
/// path that touches every byte once stays above.
fn baseline_memcpy(group: &mut BenchmarkGroup<'_, WallTime>, bytes: usize) {
    let source = vec![7u8; bytes];
    let mut target = vec![0u8; bytes];
    group.bench_function("baseline_memcpy", |b| {
        b.iter(|| target.copy_from_slice(black_box(&source)))
    });
}

/// Encodes `batches` (shared buffers: cloning the Vec copies no data) as the DoGet path does, then writes each message into one
/// contiguous buffer as tonic's prost codec does. Returns the bytes produced.
fn encode(schema: &SchemaRef, batches: Vec<RecordBatch>, ipc: &IpcWriteOptions) -> usize {
    let input = stream::iter(batches.into_iter().map(Ok));
    let encoder = FlightDataEncoderBuilder::new()
        .with_options(ipc.clone())
        .with_schema(Arc::clone(schema))
        .build(input);
    futures::executor::block_on(async {
        let messages: Vec<FlightData> = encoder.try_collect().await.unwrap();
        let mut body = Vec::new();
        for message in &messages {
            body.clear();
            message.encode(&mut body).unwrap();
            black_box(&body);
        }
        messages.iter().map(|m| m.encoded_len()).sum()
    })
}

/// Encodes `batches` as the zero-copy send path does: gRPC-framed messages whose large
/// chunks are the batches' own buffers. Returns the bytes produced.
fn encode_frames(schema: &SchemaRef, batches: &[RecordBatch]) -> usize {
    let mut encoder =
        FrameEncoder::try_new(schema, IpcWriteOptions::default(), 2 * 1024 * 1024).unwrap();
    let mut bytes = 0;
    for batch in batches {
        for frame in encoder.encode(batch).unwrap() {
            bytes += black_box(&frame).len();
        }
    }
    bytes
}

fn flight_encode(c: &mut Criterion) {
    for rows in [8 * 1024, 64 * 1024] {
        let batches: Vec<RecordBatch> = (0..16).map(|_| batch(rows)).collect();
        let schema = batches[0].schema();
        let bytes: usize = batches.iter().map(batch_bytes).sum();

        let mut group = c.benchmark_group(format!("flight_encode/{}k_rows", rows / 1024));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.sample_size(20);
        baseline_memcpy(&mut group, bytes);
        group.bench_function("zero_copy_frames", |b| {
            b.iter(|| encode_frames(&schema, &batches))
        });
        for (name, compression) in [
            ("uncompressed", None),
            ("lz4_frame", Some(CompressionType::LZ4_FRAME)),
            ("zstd", Some(CompressionType::ZSTD)),
        ] {
            let ipc = IpcWriteOptions::default()
                .try_with_compression(compression)
                .unwrap();
            group.bench_with_input(BenchmarkId::from_parameter(name), &ipc, |b, ipc| {
                b.iter(|| encode(&schema, batches.clone(), ipc))
            });
        }
        group.finish();
    }
}

fn expand_views(c: &mut Criterion) {
    let plain = batch(64 * 1024);
    let viewed = {
        let schema = plain.schema();
        let columns = plain
            .columns()
            .iter()
            .map(|column| match column.data_type() {
                DataType::Utf8 => cast(column, &DataType::Utf8View).unwrap(),
                _ => Arc::clone(column),
            })
            .collect::<Vec<_>>();
        let fields = schema
            .fields()
            .iter()
            .zip(&columns)
            .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()))
            .collect::<Vec<_>>();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    };
    let expanded = views::expand_schema(&viewed.schema());
    assert_eq!(expanded, plain.schema());

    let mut group = c.benchmark_group("expand_views/64k_rows");
    group.throughput(Throughput::Bytes(batch_bytes(&plain) as u64));
    baseline_memcpy(&mut group, batch_bytes(&plain));
    group.bench_function("utf8view_to_utf8", |b| {
        b.iter(|| views::expand_batch(black_box(viewed.clone()), &expanded, None).unwrap())
    });
    // The row group cache's rows: view columns with offset twins, sent as their slices.
    let twins = Arc::new(views::ViewTwins::default());
    let (twinned, _registration) = twins.twin(vec![viewed.clone()]).unwrap();
    let twinned = twinned.into_iter().next().unwrap();
    group.bench_function("utf8view_to_utf8_twinned", |b| {
        b.iter(|| views::expand_batch(black_box(twinned.clone()), &expanded, Some(&twins)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, ticket_decode, flight_encode, expand_views);
criterion_main!(benches);
