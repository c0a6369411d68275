//! `DoGet`: run SQL and stream the result.
//!
//! ```text
//!  network runtime                      CPU runtime
//!  ───────────────                      ───────────
//!  do_get(ticket) ── execute(sql) ────▶ plan, execute_stream()
//!                                       │ poll batches (Parquet decode, filters, ...)
//!                                       │ expand views
//!                                       │ FlightDataEncoder (schema first, split to size)
//!  response stream ◀── bounded channel ─┘ tx.send().await  (backpressure)
//! ```
//!
//! Dropping the response (client gone, deadline, cancel) drops the receiver and the
//! task handle; the task is aborted and the plan dropped, which stops the query.

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::FlightData;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::root_as_message;
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use futures::{FutureExt, Stream, StreamExt};
use std::panic::AssertUnwindSafe;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::views;
use crate::error::{Error, Result};
use crate::metrics::Outcome;
use crate::query::{Execution, QueryEngine};

/// The response stream of `DoGet`.
pub(super) type FlightDataStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send>>;

/// Knobs for the send path.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    /// Target size of one `FlightData` message; larger batches are split.
    pub max_flight_data_size: usize,
    /// Encoded messages buffered between the CPU runtime and the network.
    pub channel_depth: usize,
    /// IPC body compression (zstd or LZ4 frame), which pyarrow decodes transparently.
    pub compression: Option<CompressionType>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            // arrow-flight's default: well under gRPC's 4 MiB default message limit.
            max_flight_data_size: 2 * 1024 * 1024,
            // Two messages in flight keep the socket busy while the next batch is computed,
            // and bound the memory a slow client can pin to a few messages per stream.
            channel_depth: 2,
            compression: None,
        }
    }
}

/// Plans and runs `sql`; planning errors are returned, execution errors arrive in-band.
pub(super) async fn do_get(
    engine: &Arc<QueryEngine>,
    sql: String,
    options: SendOptions,
) -> Result<FlightDataStream> {
    let Execution {
        stream,
        report,
        mut query,
    } = engine.execute(sql).await?;
    let schema = views::expand_schema(&stream.schema());

    let (tx, rx) = mpsc::channel::<Result<FlightData, Status>>(options.channel_depth.max(1));
    let batch_schema = Arc::clone(&schema);
    let batches = stream.map(move |batch| {
        batch
            .map_err(|e| FlightError::Tonic(Box::new(Status::from(Error::from(e)))))
            .and_then(|b| views::expand_batch(b, &batch_schema).map_err(FlightError::Arrow))
    });
    let ipc = IpcWriteOptions::default().try_with_compression(options.compression)?;
    let mut encoded = FlightDataEncoderBuilder::new()
        .with_options(ipc)
        .with_schema(schema)
        .with_max_flight_data_size(options.max_flight_data_size)
        .build(batches);

    let panic_tx = tx.clone();
    let task = engine.cpu().spawn(async move {
        // Dropped with the task, however it ends: the scan summary is always recorded.
        let _report = report;
        let run = AssertUnwindSafe(async {
            while let Some(item) = encoded.next().await {
                let item = item.map_err(|e| match e {
                    FlightError::Tonic(status) => *status,
                    other => Status::from(Error::from(other)),
                });
                let sent = item
                    .as_ref()
                    .ok()
                    .map(|data| (batch_rows(data), data_bytes(data)));
                let failed = item.is_err();
                if tx.send(item).await.is_err() {
                    tracing::debug!("client went away; stopping the query");
                    query.finish(Outcome::Cancelled);
                    return;
                }
                if let Some((rows, bytes)) = sent {
                    query.sent(rows, bytes);
                }
                if failed {
                    query.finish(Outcome::Error);
                    return;
                }
            }
            query.finish(Outcome::Success);
        });
        // A panic must end the stream with an error, never as a silently short result.
        if run.catch_unwind().await.is_err() {
            query.finish(Outcome::Error);
            let status = Status::from(Error::Internal("the query panicked".into()));
            let _ = panic_tx.send(Err(status)).await;
        }
    });

    // The stream owns the task: dropping the response aborts the query.
    let out = ReceiverStream::new(rx).map(move |item| {
        let _owned = &task;
        item
    });
    Ok(Box::pin(out))
}

/// Rows of a record batch message, from its IPC header; `None` for schema and
/// dictionary messages.
fn batch_rows(data: &FlightData) -> Option<u64> {
    let message = root_as_message(&data.data_header).ok()?;
    let batch = message.header_as_record_batch()?;
    Some(batch.length().max(0) as u64)
}

/// Bytes of a Flight message's payload: IPC header, body and application metadata.
fn data_bytes(data: &FlightData) -> u64 {
    (data.data_header.len() + data.data_body.len() + data.app_metadata.len()) as u64
}
