//! The in-process server fixture and test data writers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightClient, Ticket};
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use futures::{StreamExt, TryStreamExt};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use prost::Message;
use quiver::catalog::TableDefinition;
use quiver::flight::{QuiverFlightService, SendOptions};
use quiver::query::{QueryEngine, QueryOptions};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub struct Fixture {
    pub dir: TempDir,
    pub channel: Channel,
    pub engine: Arc<QueryEngine>,
    shutdown: CancellationToken,
    server: tokio_util::task::AbortOnDropHandle<()>,
    _refresh: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

/// `logs`: 4 partitions (one of them the Hive NULL partition) of 3 rows each.
fn write_logs(root: &Path) {
    let parts = [
        "day=2026-01-01/service=api",
        "day=2026-01-01/service=web",
        "day=2026-01-02/service=api",
        "day=__HIVE_DEFAULT_PARTITION__/service=web",
    ];
    for (i, part) in parts.iter().enumerate() {
        let path = root.join(part).join("part-0.parquet");
        write_file(&path, i as i64 * 3, 3, false);
    }
}

/// Writes `n` rows with ids from `start`: `id`, `v = id` and `name` (NULL every third row).
/// With `extra`, adds an `extra` column, as a later schema version would.
pub fn write_file(path: &Path, start: i64, n: i64, extra: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let ids: Vec<i64> = (start..start + n).collect();
    let names: Vec<Option<String>> = ids
        .iter()
        .map(|i| (i % 3 != 2).then(|| format!("name-{i}")))
        .collect();
    let mut fields = vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids.clone())),
        Arc::new(Int64Array::from(ids.clone())),
        Arc::new(StringArray::from(names)),
    ];
    if extra {
        fields.push(Field::new("extra", DataType::Int64, true));
        columns.push(Arc::new(Int64Array::from(ids)));
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    // Publish by rename, as the server expects writers to.
    let tmp = path.with_extension("parquet.tmp");
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&tmp).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// The oracle: every Parquet file under `root` read with the parquet crate's Arrow reader.
pub fn read_parquet_dir(root: &Path) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let reader =
                    ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                        .unwrap()
                        .build()
                        .unwrap();
                out.extend(reader.map(|b| b.unwrap()));
            }
        }
    }
    out
}

/// Bytes the batches take as Flight messages, encoded the way the server sends them.
pub fn ipc_size(batches: &[RecordBatch]) -> usize {
    let schema = batches[0].schema();
    let stream = futures::stream::iter(Vec::from(batches).into_iter().map(Ok));
    let encoded = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(stream);
    futures::executor::block_on(
        encoded
            .map(|d| d.unwrap().encoded_len())
            .fold(0, |a, b| async move { a + b }),
    )
}

impl Fixture {
    pub async fn start() -> Self {
        Self::start_inner(None, false).await
    }

    pub async fn start_with_refresh(every: Duration) -> Self {
        Self::start_inner(Some(every), false).await
    }

    pub async fn start_with_wide_strings() -> Self {
        Self::start_inner(None, true).await
    }

    async fn start_inner(refresh: Option<Duration>, wide: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tables = if wide {
            // 200k rows of ~40-byte strings in one file: enough for the encoder to slice batches.
            let path = dir.path().join("wide/part-0.parquet");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let names: Vec<String> = (0..200_000)
                .map(|i| format!("a-string-that-is-longer-than-twelve-{i}"))
                .collect();
            let batch = RecordBatch::try_new(
                Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, false)])),
                vec![Arc::new(StringArray::from(names))],
            )
            .unwrap();
            let mut w =
                ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None)
                    .unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            vec![TableDefinition::new("wide", dir.path().join("wide")).unwrap()]
        } else {
            write_logs(&dir.path().join("logs"));
            vec![TableDefinition::new("logs", dir.path().join("logs")).unwrap()]
        };
        let engine = Arc::new(
            QueryEngine::new(
                tables,
                QueryOptions {
                    cpu_threads: 2,
                    ..QueryOptions::default()
                },
            )
            .await
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        // The server's own stack: the DoGet route, metrics and health, as `quiver serve`.
        let service = QuiverFlightService::new(
            Arc::clone(&engine),
            SendOptions::default(),
            quiver::flight::PreparedLimits::default(),
        )
        .unwrap();
        let rpc_metrics =
            quiver::metrics::RpcMetrics::register(&prometheus::Registry::new()).unwrap();
        let (port, _health) = quiver::flight::stack(
            Arc::new(service),
            rpc_metrics,
            quiver::flight::MessageLimits::default(),
        )
        .await;
        let token = shutdown.clone();
        let server = quiver::query::spawn(async move {
            quiver::flight::serve(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                port,
                &quiver::flight::Http2Settings::default(),
                token,
            )
            .await;
        });
        let refresh = refresh.map(|every| {
            let engine = Arc::clone(&engine);
            quiver::query::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    engine.refresh().await;
                }
            })
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        Self {
            dir,
            channel,
            engine,
            shutdown,
            server,
            _refresh: refresh,
        }
    }

    pub async fn query(
        &self,
        sql: &str,
    ) -> Result<Vec<RecordBatch>, arrow_flight::error::FlightError> {
        let mut client = self.client();
        tokio::time::timeout(Duration::from_secs(30), async move {
            client
                .do_get(Ticket::new(sql.to_string()))
                .await?
                .try_collect()
                .await
        })
        .await
        .expect("query timed out")
    }

    /// Runs a raw ticket and returns the first error status, from the call or the stream.
    pub async fn do_get_status(&self, ticket: &[u8]) -> Result<(), tonic::Status> {
        let mut raw = self.client().into_inner();
        let mut stream = raw.do_get(Ticket::new(ticket.to_vec())).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    }

    pub fn client(&self) -> FlightClient {
        FlightClient::new(self.channel.clone())
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server did not stop")
            .unwrap();
    }
}
