//! Integration tests: an in-process Flight server on 127.0.0.1:0 and arrow-flight's client.
//!
//! The oracle for query results is the `parquet` crate's own Arrow reader over the same
//! files (see `common::read_parquet_dir`), never Quiver's output.

// The fixture owns its server task and joins it in `stop`.
#![allow(clippy::disallowed_methods)]

mod common;
mod flight_sql;

use std::time::Duration;

use arrow_flight::{Action, FlightDescriptor, Ticket};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use futures::TryStreamExt;
use prost::Message;
use tonic::Code;

use common::{Fixture, write_file};

#[tokio::test]
async fn hive_partitions_are_typed_and_pruned() {
    let fx = Fixture::start().await;
    let batches = fx
        .query("SELECT day, service, COUNT(*) AS n, SUM(v) AS s FROM logs GROUP BY day, service ORDER BY day NULLS LAST, service")
        .await
        .unwrap();
    datafusion::assert_batches_eq!(
        [
            "+------------+---------+---+----+",
            "| day        | service | n | s  |",
            "+------------+---------+---+----+",
            "| 2026-01-01 | api     | 3 | 3  |",
            "| 2026-01-01 | web     | 3 | 12 |",
            "| 2026-01-02 | api     | 3 | 21 |",
            "|            | web     | 3 | 30 |",
            "+------------+---------+---+----+",
        ],
        &batches
    );
    let schema = batches[0].schema();
    assert_eq!(
        schema.field_with_name("day").unwrap().data_type(),
        &DataType::Date32
    );

    // A filter on the partition column is answered from the directory names.
    let explain = fx
        .query("EXPLAIN SELECT v FROM logs WHERE day = DATE '2026-01-02'")
        .await
        .unwrap();
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&explain)
        .unwrap()
        .to_string();
    assert!(
        text.contains("file_groups={1 group") || text.contains("1 file"),
        "{text}"
    );

    let rows = fx
        .query("SELECT v FROM logs WHERE day IS NULL ORDER BY v")
        .await
        .unwrap();
    let v: Vec<i64> = rows
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
        .collect();
    assert_eq!(v, vec![9, 10, 11]);
    fx.stop().await;
}

#[tokio::test]
async fn results_match_the_parquet_reader() {
    let fx = Fixture::start().await;
    let ours = fx.query("SELECT id, v, name FROM logs").await.unwrap();
    let oracle = common::read_parquet_dir(&fx.dir.path().join("logs"));
    let sort = |batches: &[RecordBatch]| {
        let mut rows: Vec<(i64, i64, Option<String>)> = Vec::new();
        for b in batches {
            let id = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
            let v = b.column_by_name("v").unwrap().as_primitive::<Int64Type>();
            let name = datafusion::arrow::compute::cast(
                b.column_by_name("name").unwrap(),
                &DataType::Utf8,
            )
            .unwrap();
            let name = name.as_string::<i32>();
            for i in 0..b.num_rows() {
                rows.push((
                    id.value(i),
                    v.value(i),
                    name.is_valid(i).then(|| name.value(i).to_string()),
                ));
            }
        }
        rows.sort();
        rows
    };
    assert_eq!(sort(&ours), sort(&oracle));
    // Strings arrive as plain Utf8, not views.
    assert_eq!(
        ours[0]
            .schema()
            .field_with_name("name")
            .unwrap()
            .data_type(),
        &DataType::Utf8
    );
    fx.stop().await;
}

#[tokio::test]
async fn errors_have_the_right_status_and_the_server_keeps_serving() {
    let fx = Fixture::start().await;
    let cases: Vec<(&[u8], Code, &str)> = vec![
        (
            b"SELECT * FROM nope",
            Code::NotFound,
            "available tables: logs",
        ),
        (b"SELEC 1", Code::InvalidArgument, ""),
        (
            b"INSERT INTO logs VALUES (1)",
            Code::InvalidArgument,
            "INSERT INTO is not allowed",
        ),
        (
            b"CREATE TABLE t AS SELECT 1",
            Code::InvalidArgument,
            "CREATE TABLE is not allowed",
        ),
        (
            b"SET datafusion.execution.batch_size = 1",
            Code::InvalidArgument,
            "SET is not allowed",
        ),
        (
            b"COPY (SELECT 1) TO '/tmp/quiver-x.parquet'",
            Code::InvalidArgument,
            "COPY is not allowed",
        ),
        (
            b"SELECT * FROM '/etc/passwd'",
            Code::InvalidArgument,
            "path",
        ),
        (b"\xff\xfe garbage", Code::InvalidArgument, "UTF-8"),
        (b"", Code::InvalidArgument, "empty"),
        (b"SELECT 1; SELECT 2", Code::InvalidArgument, ""),
    ];
    for (ticket, code, needle) in cases {
        let status = fx.do_get_status(ticket).await.expect_err("should fail");
        assert_eq!(
            status.code(),
            code,
            "{:?}: {status}",
            String::from_utf8_lossy(ticket)
        );
        assert!(status.message().contains(needle), "{status}");
    }
    // Megabytes of garbage exceed the transport's decoding limit.
    let big = vec![b'x'; 5 * 1024 * 1024];
    let status = fx.do_get_status(&big).await.expect_err("too big");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status}"
    );
    // Still serving.
    let ok = fx.query("SELECT COUNT(*) FROM logs").await.unwrap();
    assert_eq!(ok[0].column(0).as_primitive::<Int64Type>().value(0), 12);
    fx.stop().await;
}

#[tokio::test]
async fn flight_info_schema_and_list_flights() {
    let fx = Fixture::start().await;
    let info = fx
        .client()
        .get_flight_info(FlightDescriptor::new_cmd(
            "SELECT id, name FROM logs WHERE v > 100",
        ))
        .await
        .unwrap();
    let schema = info.clone().try_decode_schema().unwrap();
    assert_eq!(schema.fields().len(), 2);
    assert_eq!(schema.field(1).data_type(), &DataType::Utf8);
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<RecordBatch> = fx
        .client()
        .do_get(ticket)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);

    let schema = fx
        .client()
        .get_schema(FlightDescriptor::new_path(vec!["logs".into()]))
        .await
        .unwrap();
    assert!(schema.field_with_name("day").is_ok());
    let missing = fx
        .client()
        .get_schema(FlightDescriptor::new_path(vec!["nope".into()]))
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("NotFound") || missing.to_string().contains("not found"));

    let flights: Vec<_> = fx
        .client()
        .list_flights("")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(flights.len(), 1);
    assert_eq!(flights[0].total_records, 12);
    assert_eq!(
        flights[0].flight_descriptor.as_ref().unwrap().path,
        vec!["logs"]
    );
    fx.stop().await;
}

#[tokio::test]
async fn new_partitions_corrupt_files_and_refresh() {
    let fx = Fixture::start().await;
    let root = fx.dir.path().join("logs");
    // A half-written file and a corrupt file must never break the table.
    std::fs::create_dir_all(root.join("day=2026-01-03/service=api")).unwrap();
    std::fs::write(
        root.join("day=2026-01-03/service=api/part-9.parquet.tmp"),
        b"partial",
    )
    .unwrap();
    std::fs::write(
        root.join("day=2026-01-03/service=api/bad.parquet"),
        b"not parquet at all",
    )
    .unwrap();
    write_file(
        &root.join("day=2026-01-03/service=api/part-0.parquet"),
        100,
        2,
        true,
    );

    let body: Vec<_> = fx
        .client()
        .do_action(Action::new("refresh", ""))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&body[0]).unwrap();
    assert_eq!(summary["changed"], serde_json::json!(["logs"]));
    assert_eq!(summary["skipped_files"], 1);

    let batches = fx
        .query("SELECT COUNT(*), MAX(extra) FROM logs WHERE day = DATE '2026-01-03'")
        .await
        .unwrap();
    assert_eq!(batches[0].column(0).as_primitive::<Int64Type>().value(0), 2);
    // The evolved column reads as NULL in older files.
    let nulls = fx
        .query("SELECT COUNT(*) FROM logs WHERE extra IS NULL")
        .await
        .unwrap();
    assert_eq!(nulls[0].column(0).as_primitive::<Int64Type>().value(0), 12);

    let unknown = fx
        .client()
        .do_action(Action::new("explode", ""))
        .await
        .err()
        .unwrap();
    assert!(
        unknown.to_string().contains("available actions: refresh"),
        "{unknown}"
    );
    fx.stop().await;
}

#[tokio::test]
async fn periodic_refresh_picks_up_new_files() {
    let fx = Fixture::start_with_refresh(Duration::from_millis(200)).await;
    let root = fx.dir.path().join("logs");
    write_file(
        &root.join("day=2026-01-05/service=api/part-0.parquet"),
        500,
        4,
        false,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = fx.query("SELECT COUNT(*) FROM logs").await.unwrap();
        if n[0].column(0).as_primitive::<Int64Type>().value(0) == 16 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new partition never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fx.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_query() {
    let fx = Fixture::start().await;
    // A query that would run for a very long time: a five-way cross join of 12 rows
    // (about 250k rows) repeated through generate_series.
    let sql =
        "SELECT a.id FROM logs a, logs b, logs c, logs d, logs e, generate_series(1, 1000000) g";
    let mut raw = fx.client().into_inner();
    let mut stream = raw.do_get(Ticket::new(sql)).await.unwrap().into_inner();
    let _schema = stream.message().await.unwrap().expect("schema message");
    let _batch = stream.message().await.unwrap().expect("first batch");
    assert_eq!(fx.engine.running_queries(), 1);
    drop(stream);
    drop(raw);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fx.engine.running_queries() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the query kept running after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fx.stop().await;
}

#[tokio::test]
async fn views_do_not_inflate_the_wire() {
    let fx = Fixture::start_with_wide_strings().await;
    // Bytes on the wire, counted from the raw FlightData messages.
    let mut raw = fx.client().into_inner();
    let mut stream = raw
        .do_get(Ticket::new("SELECT name FROM wide"))
        .await
        .unwrap()
        .into_inner();
    let mut wire = 0usize;
    while let Some(msg) = stream.message().await.unwrap() {
        wire += msg.encoded_len();
    }
    // Baseline: the same column as plain Utf8, IPC-encoded in the same-size messages.
    let oracle = common::read_parquet_dir(&fx.dir.path().join("wide"));
    let baseline = common::ipc_size(&oracle);
    let ratio = wire as f64 / baseline as f64;
    assert!(
        ratio < 1.1,
        "wire {wire} bytes vs plain {baseline} bytes: {ratio:.3}x"
    );
    fx.stop().await;
}
