//! `DoGet`: the one place that decides how a ticket is served, then runs its query and
//! streams the result.
//!
//! ```text
//!  serve(command, caller)
//!    SQL text | QueryTicket | Flight SQL TicketStatementQuery ──▶ run(ticket, no parameters)
//!    Flight SQL CommandPreparedStatementQuery ─────────────────▶ run(its SQL, bound values)
//!    Flight SQL metadata command (GetTables, ...) ─────────────▶ one batch from the catalog
//!
//!  network runtime                          CPU runtime: one task per query
//!  ───────────────                          ───────────────────────────────
//!  run ── engine.execute_then(request)
//!         admit (slot or queue) ── spawn ──▶ plan, execute_stream()
//!  response ◀── watch (once planned) ───────┤ views as --view-types says
//!                                           │ encode: FrameEncoder (zero-copy, the default) or
//!                                           │   arrow-flight + prost (--send-path standard, compression)
//!                                           │ poll batches (Parquet decode, filters, ...)
//!  response stream ◀── bounded channel ─────┘ tx.send().await  (backpressure)
//!        then the task's error, if it stopped early
//! ```
//!
//! The task that plans the query also sends it: a query crosses to the CPU runtime once
//! and back once when planned (a round trip to plan and another spawn to send cost a
//! tenth of a millisecond of thread wake-ups per query, docs/benchmarks.md).
//!
//! Both encoders produce [`Frame`]s (a gRPC message as a chain of `Bytes`), which
//! `route::DoGetRoute` writes to the HTTP/2 stream. The send task stops at the first of:
//! the end of the result, an error, a cancel (`cancel-query`, `CancelFlightInfo`,
//! shutdown), the query or first-batch deadline, or a client that takes no message for
//! `--stream-idle-timeout`. It then ends the stream with that error after the messages
//! already queued. Dropping the response (client gone) drops the task handle; the task is
//! aborted and the plan dropped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use arrow_flight::sql;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
use futures::{FutureExt, Stream, StreamExt};
use std::panic::AssertUnwindSafe;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;

use super::sql::FlightSql;
use super::ticket::{Command, QueryTicket};
use crate::error::{Error, Result};
use crate::metrics::Outcome;
use crate::query::{
    ActiveQuery, Caller, Deadline, Execution, QueryEngine, QueryRequest, RunningQuery, ScanReport,
};
use crate::wire::frames::{self, Frame, FrameEncoder};
use datafusion::common::ScalarValue;
use std::future::Future;

/// A stream of encoded messages for the client, ending with the query's error if any.
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<Frame, Status>> + Send>>;

/// Default of `--stream-keepalive`: well inside the 60 s idle timeout common in proxies.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(20);

/// Which encoder sends query results (`--send-path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SendPath {
    /// Each message a chain of the batch's own buffers (`wire::frames`).
    #[default]
    ZeroCopy,
    /// arrow-flight's encoder, then prost into one buffer per message, as tonic's codec
    /// does: for comparison.
    Standard,
}

/// Knobs for the send path.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    /// Which encoder; compressed results always take the standard one.
    pub path: SendPath,
    /// Target size of one `FlightData` message; larger batches are split.
    pub max_flight_data_size: usize,
    /// Encoded messages buffered between the CPU runtime and the network.
    pub channel_depth: usize,
    /// IPC body compression (zstd or LZ4 frame), which pyarrow decodes transparently.
    pub compression: Option<CompressionType>,
    /// After this long without a batch, an empty one is sent to keep the stream from
    /// looking idle to proxies; zero: never.
    pub keepalive: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            path: SendPath::ZeroCopy,
            // arrow-flight's default: well under gRPC's 4 MiB default message limit.
            max_flight_data_size: 2 * 1024 * 1024,
            // Two messages in flight keep the socket busy while the next batch is computed,
            // and bound the memory a slow client can pin to a few messages per stream.
            channel_depth: 2,
            compression: None,
            keepalive: DEFAULT_KEEPALIVE,
        }
    }
}

/// Serves a `DoGet` for `caller`: every kind of ticket comes here, decoded once.
pub(super) async fn serve(
    engine: &Arc<QueryEngine>,
    flight_sql: &FlightSql,
    command: Command,
    caller: Caller,
    options: SendOptions,
) -> Result<MessageStream, Status> {
    let (ticket, params) = match command {
        Command::Sql(sql) => (QueryTicket::new(sql), vec![]),
        Command::Query(ticket) => {
            let params = ticket.bound_parameters()?;
            (ticket, params)
        }
        Command::FlightSql(sql::Command::TicketStatementQuery(statement)) => (
            QueryTicket::decode_checked(&statement.statement_handle)?,
            vec![],
        ),
        Command::FlightSql(sql::Command::CommandPreparedStatementQuery(prepared)) => {
            flight_sql.prepared_query(&prepared.prepared_statement_handle, &caller)?
        }
        Command::FlightSql(command) => {
            let batch = flight_sql.metadata(command, &caller.tables).await?;
            return Ok(one_batch(batch, options)?);
        }
    };
    Ok(run(engine, ticket, params, caller, options).await?)
}

/// Runs a ticket's query with `params` bound, on behalf of `caller`: the ticket's
/// timeout and compression apply on top of the server's.
async fn run(
    engine: &Arc<QueryEngine>,
    ticket: QueryTicket,
    params: Vec<ScalarValue>,
    caller: Caller,
    mut options: SendOptions,
) -> Result<MessageStream> {
    if let Some(compression) = ticket.result_compression()? {
        options.compression = compression;
    }
    let request = QueryRequest {
        ticket_timeout: ticket.timeout(),
        distribution: ticket.requested_distribution()?,
        slice: ticket.requested_slice()?,
        sql: ticket.sql,
        id: ticket.query_id,
        caller,
        params,
        no_result_cache: ticket.no_result_cache.unwrap_or(false),
    };
    // Compression makes new buffers: nothing is left to share.
    let zero_copy = options.path == SendPath::ZeroCopy && options.compression.is_none();
    tracing::debug!(sql = %request.sql, zero_copy, "query");
    let (tx, rx) = mpsc::channel::<Result<Frame, Status>>(options.channel_depth.max(1));
    let sender = Arc::clone(engine);
    // Planned, encoded and sent by one task on the CPU runtime; this side gets what it
    // watches the stream with once the query is planned.
    let (watch, task) = engine
        .execute_then(request, move |execution, planned| async move {
            let started = start(&sender, execution);
            let encoded = match zero_copy {
                true => zero_copy_frames(&sender, started, options),
                false => standard_frames(started, options),
            };
            match encoded {
                Ok((execution, encoded, keepalive)) => {
                    let (watch, sending) = sending(&sender, execution, encoded, keepalive, tx);
                    planned.ready(watch);
                    sending.await
                }
                Err(e) => {
                    planned.fail(e);
                    None
                }
            }
        })
        .await?;
    Ok(respond(rx, task, watch))
}

/// A result that is one batch already computed (Flight SQL metadata), as frames.
fn one_batch(batch: RecordBatch, options: SendOptions) -> Result<MessageStream> {
    let encoder = FrameEncoder::try_new(
        &batch.schema(),
        IpcWriteOptions::default(),
        options.max_flight_data_size,
    )?;
    let batches: BatchStream = Box::pin(futures::stream::iter([Ok(batch)]));
    Ok(Box::pin(
        encode_frames(encoder, batches).map(|frame| frame.map_err(flight_status)),
    ))
}

/// The status a Flight error stands for.
fn flight_status(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(status) => *status,
        other => Status::from(Error::from(other)),
    }
}

/// Encoded messages, errors as Flight errors.
type EncodedStream =
    Pin<Box<dyn Stream<Item = std::result::Result<Frame, FlightError>> + Send + 'static>>;

/// The zero-copy send path: each message a chain of the batch's own buffers
/// (`wire::frames`), pinned tables' batches sent as the messages they were laid out as.
fn zero_copy_frames(
    engine: &Arc<QueryEngine>,
    started: Started,
    options: SendOptions,
) -> Result<(Running, EncodedStream, Option<Keepalive>)> {
    let keepalive = Keepalive::new(&started.schema, IpcWriteOptions::default(), options);
    let encoder = FrameEncoder::try_new(
        &started.schema,
        IpcWriteOptions::default(),
        options.max_flight_data_size,
    )?
    .with_pinned_messages(Arc::clone(engine.pinned_messages()) as _);
    let encoded = Box::pin(encode_frames(encoder, started.batches));
    Ok((started.execution, encoded, keepalive))
}

/// Frames for `batches`: the schema at once (the client's `do_get` returns when it
/// arrives, not when the first batch is computed), then each batch.
fn encode_frames(
    mut encoder: FrameEncoder,
    batches: BatchStream,
) -> impl Stream<Item = std::result::Result<Frame, FlightError>> + Send + Unpin + 'static {
    /// The encoder until the batches end, and frames encoded but not yet sent (one
    /// queue for the whole stream).
    struct Encoding {
        encoder: Option<FrameEncoder>,
        batches: BatchStream,
        frames: VecDeque<Frame>,
    }
    let mut frames = VecDeque::new();
    encoder.ready_into(&mut frames);
    let state = Encoding {
        encoder: Some(encoder),
        batches,
        frames,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(frame) = state.frames.pop_front() {
                return Some((Ok(frame), state));
            }
            let encoder = state.encoder.as_mut()?;
            let encoded = match state.batches.next().await {
                Some(Ok(batch)) => encoder.encode_into(&batch, &mut state.frames),
                Some(Err(e)) => {
                    state.encoder = None;
                    return Some((Err(e), state));
                }
                None => state
                    .encoder
                    .take()
                    .expect("encoding")
                    .finish()
                    .map(|frames| state.frames.extend(frames)),
            };
            if let Err(e) = encoded {
                state.encoder = None;
                state.frames.clear();
                return Some((Err(FlightError::Arrow(e)), state));
            }
        }
    }))
}

/// Result batches with views expanded, errors as Flight errors.
type BatchStream =
    Pin<Box<dyn Stream<Item = std::result::Result<RecordBatch, FlightError>> + Send + 'static>>;

/// A query admitted and executing, and its batches.
struct Started {
    execution: Running,
    schema: SchemaRef,
    batches: BatchStream,
}

/// What a running query keeps until its stream ends.
struct Running {
    report: ScanReport,
    query: RunningQuery,
    deadline: Deadline,
}

/// A planned query's batches with views as they are sent (`--view-types`).
fn start(engine: &Arc<QueryEngine>, execution: Execution) -> Started {
    let Execution {
        stream,
        report,
        query,
        deadline,
    } = execution;
    let view_types = engine.view_types();
    let twins = engine.view_twins().cloned();
    let schema = view_types.schema(&stream.schema());
    let batch_schema = Arc::clone(&schema);
    let batches = stream.map(move |batch| {
        batch
            .map_err(|e| FlightError::Tonic(Box::new(Status::from(Error::from(e)))))
            .and_then(|b| {
                view_types
                    .batch_with_twins(b, &batch_schema, twins.as_deref())
                    .map_err(FlightError::Arrow)
            })
    });
    Started {
        execution: Running {
            report,
            query,
            deadline,
        },
        schema,
        batches: Box::pin(batches),
    }
}

/// The keep-alive message: a record batch of no rows, which clients read as an empty
/// batch (arrow-flight's encoder drops empty batches, so it is encoded here). Encoded
/// when a stream has been quiet for `--stream-keepalive`, which most never are. `None`
/// when keep-alives are off, or the result has dictionary columns: their batches need
/// the dictionaries sent with the rows, and an empty one would replace them.
struct Keepalive {
    every: Duration,
    schema: SchemaRef,
    ipc: IpcWriteOptions,
}

impl Keepalive {
    fn new(schema: &SchemaRef, ipc: IpcWriteOptions, options: SendOptions) -> Option<Self> {
        let dictionaries = schema
            .flattened_fields()
            .iter()
            .any(|f| matches!(f.data_type(), DataType::Dictionary(..)));
        (!options.keepalive.is_zero() && !dictionaries).then(|| Self {
            every: options.keepalive,
            schema: Arc::clone(schema),
            ipc,
        })
    }

    /// The message, framed as the standard path frames one.
    fn message(&self) -> std::result::Result<Frame, FlightError> {
        let (_, batch) = IpcDataGenerator::default().encode(
            &RecordBatch::new_empty(Arc::clone(&self.schema)),
            &mut DictionaryTracker::new(false),
            &self.ipc,
            &mut Default::default(),
        )?;
        Ok(Frame::from_flight_data(&batch.into()))
    }
}

/// The standard send path: arrow-flight's encoder, each message then encoded by prost
/// into one buffer as tonic's codec does (`--send-path standard`, and compressed results).
fn standard_frames(
    started: Started,
    options: SendOptions,
) -> Result<(Running, EncodedStream, Option<Keepalive>)> {
    let ipc = IpcWriteOptions::default().try_with_compression(options.compression)?;
    let keepalive = Keepalive::new(&started.schema, ipc.clone(), options);
    // Split here, by the bytes the rows reference: arrow-flight splits by the capacity of
    // the buffers, which for a pinned table's batches (slices of one allocation, see
    // `wire::pinned`) is the whole allocation per column, and would cut each batch
    // into a dozen small messages.
    let max = options.max_flight_data_size;
    let pieces = started.batches.flat_map(move |batch| {
        let pieces = match batch.and_then(|b| frames::split(&b, max).map_err(FlightError::Arrow)) {
            Ok(pieces) => pieces.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(pieces)
    });
    // Dictionaries go out as dictionaries, as the FlightInfo schema and the zero-copy
    // path have them (arrow-flight's default would hydrate them into their values).
    let encoded = FlightDataEncoderBuilder::new()
        .with_options(ipc)
        .with_dictionary_handling(DictionaryHandling::Resend)
        .with_schema(started.schema)
        .with_max_flight_data_size(usize::MAX)
        .build(pieces)
        .map(|message| message.map(|m| Frame::from_flight_data(&m)));
    Ok((started.execution, Box::pin(encoded), keepalive))
}

/// The send loop, to run on the CPU runtime (in the task that planned the query): it
/// hands `encoded` messages to the response through `tx`, a bounded channel, and the
/// keep-alive whenever `--stream-keepalive` passes without one. Returns what the network
/// side watches the stream with, and the loop, whose output is the error that ended the
/// stream early, if any.
fn sending(
    engine: &Arc<QueryEngine>,
    execution: Running,
    encoded: EncodedStream,
    keepalive: Option<Keepalive>,
    tx: mpsc::Sender<Result<Frame, Status>>,
) -> (Watch, impl Future<Output = Option<Status>> + Send + 'static) {
    let Running {
        report,
        query,
        deadline,
    } = execution;
    let first_batch = deadline.clone().earliest(Deadline::after(
        tokio::time::Instant::from_std(query.started()),
        engine.limits().first_batch_timeout,
        "--first-batch-timeout",
    ));
    let watch = Watch {
        first_batch: first_batch.clone(),
        query: deadline.clone(),
        active: Arc::clone(query.active()),
    };
    let limits = Limits {
        first_batch,
        query: deadline,
        idle: engine.limits().stream_idle_timeout,
        keepalive,
    };
    let sending = async move {
        // `report` is dropped however this ends, so the scan summary is always recorded;
        // `encoded` (the plan's stream, and its memory) with `send`.
        let mut query = query;
        let sent = AssertUnwindSafe(send(encoded, &tx, &mut query, &limits))
            .catch_unwind()
            .await
            .unwrap_or_else(|_panic| {
                Err((
                    Outcome::Error,
                    Status::from(Error::Internal("the query panicked".into())),
                ))
            });
        // Scan totals before the outcome: a query counted as ended has its scan counted.
        drop(report);
        match sent {
            Ok(()) => {
                query.finish(Outcome::Success);
                None
            }
            Err((outcome, status)) => {
                query.active().set_code(status.code());
                query.finish(outcome);
                Some(status)
            }
        }
    };
    (watch, sending)
}

/// The response: the messages from `rx`, then the error that ended the query's `task`
/// early, if any.
fn respond(
    rx: mpsc::Receiver<Result<Frame, Status>>,
    task: AbortOnDropHandle<Option<Option<Status>>>,
    watch: Watch,
) -> MessageStream {
    // The stream owns the task: dropping the response aborts the query. After the last
    // message, a query that failed ends the stream with its error: in the trailers,
    // never as a silently short result.
    let last = futures::stream::once(async move {
        match task.await {
            Ok(failed) => failed.flatten().map(Err),
            Err(join) => Some(Err(Status::from(Error::Internal(format!(
                "the query task failed: {join}"
            ))))),
        }
    })
    .filter_map(futures::future::ready);
    let body = ReceiverStream::new(rx).chain(Box::pin(last));
    Box::pin(watch_from_outside(body, watch))
}

/// What the network side watches while the CPU runtime runs a query.
struct Watch {
    first_batch: Deadline,
    query: Deadline,
    active: Arc<ActiveQuery>,
}

/// Ends `body` with the deadline's or the cancel's error when the task on the CPU
/// runtime cannot: an operator that computes for minutes without yielding never lets
/// the send loop's own checks run. Ending the stream drops the task's handle, which
/// aborts the task at its next yield; until then the query keeps its listing, slot and
/// memory, and it records the outcome given here.
fn watch_from_outside(
    body: impl Stream<Item = Result<Frame, Status>> + Send + Unpin + 'static,
    watch: Watch,
) -> impl Stream<Item = Result<Frame, Status>> + Send + 'static {
    struct State<B> {
        body: B,
        watch: Watch,
        sent_first_batch: bool,
        done: bool,
    }
    let state = State {
        body,
        watch,
        sent_first_batch: false,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let (deadline, stage) = if state.sent_first_batch {
            (&state.watch.query, "the query")
        } else {
            (&state.watch.first_batch, "the first batch")
        };
        let cancel = state.watch.active.cancelled().clone();
        let stopped = tokio::select! {
            biased;
            item = state.body.next() => {
                let item = item?;
                if matches!(&item, Ok(m) if m.rows().is_some_and(|rows| rows > 0)) {
                    state.sent_first_batch = true;
                }
                return Some((item, state));
            }
            () = cancel.cancelled() => state.watch.active.cancel_error(),
            () = deadline.expired() => deadline.error(stage),
        };
        state.watch.active.set_outcome(stopped.outcome());
        state.watch.active.set_code(stopped.code());
        state.done = true;
        Some((Err(Status::from(stopped)), state))
    })
}

/// The limits a stream runs under.
struct Limits {
    /// Until the first record batch is sent.
    first_batch: Deadline,
    /// The whole query.
    query: Deadline,
    /// Longest wait for the client to take the next message.
    idle: Duration,
    /// How long the query may compute without a message, and the message sent then.
    keepalive: Option<Keepalive>,
}

/// How a query's stream ended early: its outcome and the status the client gets.
type Stop = (Outcome, Status);

/// Moves encoded messages to the network until the result ends, the query fails, is
/// cancelled, runs out of time, or the client goes away or stops reading.
async fn send(
    mut encoded: impl Stream<Item = std::result::Result<Frame, FlightError>> + Unpin,
    tx: &mpsc::Sender<Result<Frame, Status>>,
    query: &mut RunningQuery,
    limits: &Limits,
) -> Result<(), Stop> {
    let active = Arc::clone(query.active());
    let cancel = active.cancelled().clone();
    let stop = |e: Error| (e.outcome(), Status::from(e));
    // Cancelled, whoever asked (a client, an operator, shutdown).
    let cancelled = || (Outcome::Cancelled, Status::from(active.cancel_error()));
    loop {
        let (deadline, stage) = if query.sent_first_batch() {
            (&limits.query, "the query")
        } else {
            (&limits.first_batch, "the first batch")
        };
        // Quiet for too long (computing an aggregate, a sort): keep the stream alive.
        // `next()` is cancel-safe: dropping it loses nothing.
        let quiet = async {
            match &limits.keepalive {
                Some(keepalive) => tokio::time::sleep(keepalive.every).await,
                None => std::future::pending::<()>().await,
            }
        };
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(cancelled()),
            () = deadline.expired() => return Err(stop(deadline.error(stage))),
            next = encoded.next() => next,
            () = quiet => limits.keepalive.as_ref().map(Keepalive::message),
        };
        let data = match next {
            None => return Ok(()),
            Some(Ok(data)) => data,
            Some(Err(FlightError::Tonic(status))) => return Err((Outcome::Error, *status)),
            Some(Err(other)) => return Err(stop(Error::from(other))),
        };
        let (rows, bytes) = (data.rows(), data.payload_len() as u64);
        let idle = async {
            if limits.idle.is_zero() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(limits.idle).await;
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(cancelled()),
            () = deadline.expired() => return Err(stop(deadline.error(stage))),
            () = idle => {
                return Err(stop(Error::DeadlineExceeded {
                    stage: "the client reading the stream",
                    limit: limits.idle,
                    source_of_limit: "--stream-idle-timeout".into(),
                }));
            }
            sent = tx.send(Ok(data)) => {
                if sent.is_err() {
                    tracing::debug!("client went away; stopping the query");
                    return Err((Outcome::Cancelled, Status::from(Error::ClientGone)));
                }
            }
        }
        query.sent(rows, bytes);
    }
}
