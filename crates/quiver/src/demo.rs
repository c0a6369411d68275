//! A realistic demo dataset: a week of service request logs, Hive-partitioned by day and
//! service, plus a small `services` dimension table to join against.
//!
//! ```text
//! <out>/requests/day=2026-01-01/service=api/part-0.parquet
//! <out>/services/services.parquet
//! ```
//!
//! Deterministic for a given row count (seeded), so tests and benchmarks can rely on it.
//! Files are written under a temporary name and renamed into place, the same way a
//! production writer should publish them.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Decimal128Builder, Float64Builder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Days of data.
pub const DAYS: u32 = 7;
/// Services, with their share of traffic in percent.
pub const SERVICES: [(&str, u32, &str, &str); 5] = [
    ("api", 40, "platform", "critical"),
    ("web", 25, "frontend", "critical"),
    ("search", 15, "discovery", "high"),
    ("auth", 12, "identity", "critical"),
    ("billing", 8, "payments", "high"),
];
const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];
const REGIONS: [&str; 4] = ["us-east-1", "us-west-2", "eu-west-1", "ap-south-1"];
const ROUTES: [&str; 6] = ["users", "orders", "items", "sessions", "invoices", "search"];
/// 2026-01-01T00:00:00Z in microseconds.
const START_MICROS: i64 = 1_767_225_600_000_000;
const DAY_MICROS: i64 = 86_400_000_000;
const ROWS_PER_BATCH: usize = 16_384;

/// Schema of the `requests` table's files (partition columns come from the paths).
pub fn requests_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("request_id", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("status", DataType::Int32, false),
        Field::new("latency_ms", DataType::Float64, false),
        Field::new("response_bytes", DataType::Int64, false),
        Field::new("cost_usd", DataType::Decimal128(12, 6), false),
        Field::new("region", DataType::Utf8, false),
        Field::new("user_id", DataType::Int64, true),
        Field::new("error", DataType::Utf8, true),
    ]))
}

/// Writes the dataset under `out` with about `rows` request rows, calling `progress`
/// with the number of rows written after each file.
pub fn generate(out: &Path, rows: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let total_share: u32 = SERVICES.iter().map(|s| s.1).sum();
    let mut partition = 0u64;
    for day in 0..DAYS {
        let date = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).expect("valid date")
            + chrono::Days::new(u64::from(day));
        for (service, share, ..) in SERVICES {
            let n = rows * u64::from(share) / u64::from(total_share) / u64::from(DAYS);
            let dir = out
                .join("requests")
                .join(format!("day={date}"))
                .join(format!("service={service}"));
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let mut rng = StdRng::seed_from_u64(0x5eed_0000 + partition);
            let day_start = START_MICROS + i64::from(day) * DAY_MICROS;
            write_parquet(&dir.join("part-0.parquet"), requests_schema(), |schema| {
                request_batches(schema, &mut rng, n as usize, day_start, partition)
            })?;
            progress(n);
            partition += 1;
        }
    }
    let dir = out.join("services");
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("service", DataType::Utf8, false),
        Field::new("team", DataType::Utf8, false),
        Field::new("tier", DataType::Utf8, false),
        Field::new("traffic_share", DataType::Int32, false),
    ]));
    write_parquet(
        &dir.join("services.parquet"),
        Arc::clone(&schema),
        |schema| {
            let col = |i: usize| -> ArrayRef {
                Arc::new(datafusion::arrow::array::StringArray::from_iter_values(
                    SERVICES.iter().map(|s| match i {
                        0 => s.0,
                        2 => s.2,
                        _ => s.3,
                    }),
                ))
            };
            let share: ArrayRef = Arc::new(datafusion::arrow::array::Int32Array::from_iter_values(
                SERVICES.iter().map(|s| s.1 as i32),
            ));
            Ok(vec![RecordBatch::try_new(
                schema,
                vec![col(0), col(2), col(3), share],
            )?])
        },
    )?;
    Ok(())
}

fn write_parquet(
    path: &Path,
    schema: SchemaRef,
    batches: impl FnOnce(SchemaRef) -> Result<Vec<RecordBatch>>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("valid level"),
        ))
        // Page-level statistics give the page index that page pruning uses.
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(128 * 1024))
        .set_data_page_row_count_limit(16 * 1024)
        // Point lookups by request id are the bloom filter's job.
        .set_column_bloom_filter_enabled(ColumnPath::from("request_id"), true)
        .build();
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).map_err(io)?;
    let mut writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(props))
        .map_err(|e| Error::Internal(format!("parquet writer: {e}")))?;
    for batch in batches(schema)? {
        writer
            .write(&batch)
            .map_err(|e| Error::Internal(format!("parquet write: {e}")))?;
    }
    writer
        .close()
        .map_err(|e| Error::Internal(format!("parquet close: {e}")))?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn request_batches(
    schema: SchemaRef,
    rng: &mut StdRng,
    rows: usize,
    day_start: i64,
    partition: u64,
) -> Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    // Timestamps ascend through the day, so row groups and pages have tight ts ranges.
    let step = DAY_MICROS / (rows.max(1) as i64);
    let mut written = 0usize;
    while written < rows {
        let n = ROWS_PER_BATCH.min(rows - written);
        let mut ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut request_id = StringBuilder::with_capacity(n, n * 20);
        let mut method = StringBuilder::with_capacity(n, n * 4);
        let mut path = StringBuilder::with_capacity(n, n * 20);
        let mut status = Int32Builder::with_capacity(n);
        let mut latency = Float64Builder::with_capacity(n);
        let mut bytes = Int64Builder::with_capacity(n);
        let mut cost = Decimal128Builder::with_capacity(n).with_precision_and_scale(12, 6)?;
        let mut region = StringBuilder::with_capacity(n, n * 10);
        let mut user = Int64Builder::with_capacity(n);
        let mut error = StringBuilder::new();
        for i in 0..n {
            let row = (written + i) as i64;
            ts.append_value(day_start + row * step + rng.random_range(0..step.max(1)));
            request_id.append_value(format!("req-{partition:02}-{row:010}"));
            method.append_value(METHODS[weighted(rng, &[70, 20, 7, 3])]);
            let route = ROUTES[rng.random_range(0..ROUTES.len())];
            path.append_value(format!("/v1/{route}/{}", rng.random_range(1..5000)));
            let code = [200, 201, 204, 301, 400, 404, 429, 500, 503]
                [weighted(rng, &[80, 5, 3, 1, 3, 4, 1, 2, 1])];
            status.append_value(code);
            // Long-tailed latency: mostly fast, sometimes very slow.
            let base: f64 = rng.random_range(1.0..40.0);
            let tail = if rng.random_ratio(1, 50) {
                rng.random_range(100.0..3000.0)
            } else {
                0.0
            };
            latency.append_value(((base + tail) * 100.0).round() / 100.0);
            bytes.append_value(rng.random_range(0..200_000));
            cost.append_value(rng.random_range(0..5_000i128));
            region.append_value(REGIONS[weighted(rng, &[45, 20, 25, 10])]);
            if rng.random_ratio(1, 10) {
                user.append_null();
            } else {
                user.append_value(rng.random_range(1..100_000));
            }
            match code {
                500 => error.append_value("internal: upstream returned an invalid response"),
                503 => error.append_value("unavailable: connection pool exhausted"),
                429 => error.append_value("rate limited"),
                _ => error.append_null(),
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(ts.finish()),
            Arc::new(request_id.finish()),
            Arc::new(method.finish()),
            Arc::new(path.finish()),
            Arc::new(status.finish()),
            Arc::new(latency.finish()),
            Arc::new(bytes.finish()),
            Arc::new(cost.finish()),
            Arc::new(region.finish()),
            Arc::new(user.finish()),
            Arc::new(error.finish()),
        ];
        batches.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
        written += n;
    }
    Ok(batches)
}

fn weighted(rng: &mut StdRng, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut pick = rng.random_range(0..total);
    for (i, w) in weights.iter().enumerate() {
        if pick < *w {
            return i;
        }
        pick -= w;
    }
    weights.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_partitioned_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut total = 0;
        generate(dir.path(), 3500, &mut |n| total += n).unwrap();
        assert!(total > 3000 && total <= 3500, "{total}");
        let file = dir
            .path()
            .join("requests/day=2026-01-03/service=api/part-0.parquet");
        let reader =
            parquet::file::reader::SerializedFileReader::new(File::open(file).unwrap()).unwrap();
        use parquet::file::reader::FileReader;
        assert_eq!(
            reader.metadata().file_metadata().num_rows(),
            3500 * 40 / 100 / 7
        );
        assert!(dir.path().join("services/services.parquet").exists());
    }
}
