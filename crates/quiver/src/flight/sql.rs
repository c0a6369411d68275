//! Flight SQL: arrow-flight's [`FlightSqlService`], behind the dispatcher in `flight`.
//!
//! The dispatcher authenticates every call, then hands this service only the requests
//! whose ticket or command is a Flight SQL `Any` (and the Flight SQL actions, and
//! `DoPut`). arrow-flight's blanket `FlightService` impl for a `FlightSqlService` unpacks
//! the command and calls the method below that serves it.
//!
//! ```text
//!  CommandStatementQuery ─ GetFlightInfo ─▶ FlightInfo(schema, TicketStatementQuery{QueryTicket})
//!  TicketStatementQuery ── DoGet ─────────▶ the same run path as a plain SQL ticket
//!  CreatePreparedStatement ─ DoAction ────▶ handle, dataset schema, parameter schema
//!  CommandPreparedStatementQuery ─ DoPut ─▶ bind one row of parameters
//!                                ─ GetFlightInfo / DoGet ─▶ run with the bound values
//!  ClosePreparedStatement ─ DoAction
//!  CommandGet{Catalogs,DbSchemas,Tables,TableTypes,SqlInfo,XdbcTypeInfo,*Keys}
//!                         ─ GetFlightInfo / DoGet ─▶ one metadata batch
//! ```
//!
//! A statement's ticket is a [`QueryTicket`] (with its query id) inside
//! `TicketStatementQuery.statement_handle`, so `CancelFlightInfo` reaches it like a plain
//! ticket. Queries share admission control, deadlines and metrics with plain tickets.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionBeginSavepointRequest, ActionBeginSavepointResult, ActionBeginTransactionRequest,
    ActionBeginTransactionResult, ActionCancelQueryRequest, ActionCancelQueryResult,
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, ActionCreatePreparedSubstraitPlanRequest,
    ActionEndSavepointRequest, ActionEndTransactionRequest, Any, CommandGetCatalogs,
    CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandPreparedStatementUpdate,
    CommandStatementIngest, CommandStatementQuery, CommandStatementSubstraitPlan,
    CommandStatementUpdate, DoPutPreparedStatementResult, Nullable, ProstMessageExt, Searchable,
    SqlInfo, SqlNullOrdering, SqlSupportedCaseSensitivity, SqlSupportedTransaction,
    TicketStatementQuery, XdbcDataType,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::ScalarValue;
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::do_get::{self, SendOptions};
use super::ticket::QueryTicket;
use super::{CallContext, actions, caller};
use crate::error::{Error, Result};
use crate::query::{QueryEngine, TableAccess, new_query_id};
use crate::wire::views;

type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// The Flight SQL half of the service.
pub(super) struct FlightSql {
    engine: Arc<QueryEngine>,
    send: SendOptions,
    statements: PreparedStatements,
    sql_info: SqlInfoData,
    type_info: XdbcTypeInfoData,
}

impl std::fmt::Debug for FlightSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSql")
            .field("prepared_statements", &self.statements.len())
            .finish_non_exhaustive()
    }
}

impl FlightSql {
    /// Serves `engine`, keeping each user's prepared statements within `prepared`.
    pub(super) fn new(
        engine: Arc<QueryEngine>,
        send: SendOptions,
        prepared: PreparedLimits,
    ) -> Result<Self> {
        Ok(Self {
            engine,
            send,
            statements: PreparedStatements::new(prepared),
            sql_info: sql_info()?,
            type_info: type_info()?,
        })
    }

    /// The schema and the one endpoint whose ticket is `ticket`.
    fn info(
        schema: &Schema,
        ticket: impl Into<Bytes>,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(Error::from)?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// A metadata command's `FlightInfo`: its result schema, and the command itself as
    /// the ticket.
    async fn metadata_info(
        &self,
        command: impl ProstMessageExt + Into<Metadata>,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = command.as_any().encode_to_vec();
        let batch = self
            .metadata(command.into(), &context(&request).tables())
            .await?;
        Self::info(&batch.schema(), ticket, request.into_inner())
    }

    /// A metadata command's result, as one batch.
    async fn metadata_stream<T>(
        &self,
        command: Metadata,
        request: &Request<T>,
    ) -> Result<Response<DoGetStream>, Status> {
        let batch = self.metadata(command, &context(request).tables()).await?;
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(batch.schema())
            .build(futures::stream::once(async move { Ok(batch) }))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    /// Answers a metadata command from the engine's catalog, as far as the caller may
    /// see it (`access`).
    async fn metadata(&self, command: Metadata, access: &TableAccess) -> Result<RecordBatch> {
        let batch = match command {
            Metadata::Catalogs(c) => {
                let mut builder = c.into_builder();
                let mut catalogs: Vec<_> = self
                    .schemas(access)
                    .await?
                    .into_iter()
                    .map(|p| p.0)
                    .collect();
                catalogs.dedup();
                for catalog in catalogs {
                    builder.append(catalog);
                }
                builder.build()
            }
            Metadata::DbSchemas(c) => {
                let mut builder = c.into_builder();
                for (catalog, schema) in self.schemas(access).await? {
                    builder.append(catalog, schema);
                }
                builder.build()
            }
            Metadata::Tables(c) => {
                let mut builder = c.into_builder();
                for table in self.engine.list_tables(access).await? {
                    builder.append(
                        &table.catalog,
                        &table.schema,
                        &table.name,
                        table.table_type,
                        &self.engine.view_types().schema(&table.arrow_schema),
                    )?;
                }
                builder.build()
            }
            Metadata::TableTypes(c) => {
                let mut builder = c.into_builder();
                builder.append("TABLE");
                builder.append("VIEW");
                builder.build()
            }
            Metadata::SqlInfo(c) => c.into_builder(&self.sql_info).build(),
            Metadata::XdbcTypeInfo(c) => c.into_builder(&self.type_info).build(),
            // No table has keys: Parquet files declare none.
            Metadata::Keys => Ok(RecordBatch::new_empty(keys_schema())),
            Metadata::PrimaryKeys => Ok(RecordBatch::new_empty(primary_keys_schema())),
        };
        Ok(batch?)
    }

    /// Distinct (catalog, schema) pairs, sorted.
    async fn schemas(&self, access: &TableAccess) -> Result<Vec<(String, String)>> {
        let mut pairs: Vec<_> = self
            .engine
            .list_tables(access)
            .await?
            .into_iter()
            .map(|t| (t.catalog, t.schema))
            .collect();
        pairs.dedup();
        Ok(pairs)
    }
}

/// The metadata commands, answered by [`FlightSql::metadata`].
pub(super) enum Metadata {
    Catalogs(CommandGetCatalogs),
    DbSchemas(CommandGetDbSchemas),
    Tables(CommandGetTables),
    TableTypes(CommandGetTableTypes),
    SqlInfo(CommandGetSqlInfo),
    XdbcTypeInfo(CommandGetXdbcTypeInfo),
    PrimaryKeys,
    /// Exported, imported or cross-reference keys (one schema).
    Keys,
}

macro_rules! metadata_from {
    ($($command:ty => $variant:expr),* $(,)?) => {
        $(impl From<$command> for Metadata {
            #[allow(clippy::redundant_closure_call)]
            fn from(c: $command) -> Self {
                $variant(c)
            }
        })*
    };
}

metadata_from!(
    CommandGetCatalogs => Metadata::Catalogs,
    CommandGetDbSchemas => Metadata::DbSchemas,
    CommandGetTables => Metadata::Tables,
    CommandGetTableTypes => Metadata::TableTypes,
    CommandGetSqlInfo => Metadata::SqlInfo,
    CommandGetXdbcTypeInfo => Metadata::XdbcTypeInfo,
    CommandGetPrimaryKeys => |_| Metadata::PrimaryKeys,
    CommandGetExportedKeys => |_| Metadata::Keys,
    CommandGetImportedKeys => |_| Metadata::Keys,
    CommandGetCrossReference => |_| Metadata::Keys,
);

/// The caller the dispatcher authenticated.
fn context<T>(request: &Request<T>) -> CallContext {
    request
        .extensions()
        .get::<CallContext>()
        .cloned()
        .unwrap_or_default()
}

fn user_of(context: &CallContext) -> Option<Arc<str>> {
    context.identity.as_ref().map(|i| Arc::clone(&i.name))
}

fn read_only(what: &str) -> Status {
    Error::NotReadOnly {
        what: what.to_string(),
        hint: "run queries with CommandStatementQuery or a prepared statement".into(),
    }
    .into()
}

fn no_transactions() -> Status {
    Status::unimplemented(
        "Quiver is read-only and has no transactions or savepoints; run each query on its own",
    )
}

fn no_substrait() -> Status {
    Status::unimplemented("Substrait plans are not supported: send SQL (CommandStatementQuery)")
}

/// An IPC-encapsulated schema, as prepared statement results carry them.
fn schema_bytes(schema: &Schema) -> Result<Bytes> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default()).try_into()?;
    Ok(bytes)
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    // The dispatcher serves Handshake for both protocols; it never calls this.
    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        Err(Status::internal("Handshake is served by the dispatcher"))
    }

    // Statements.

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        if query.transaction_id.is_some() {
            return Err(no_transactions());
        }
        let schema = self
            .engine
            .schema(
                query.query.clone(),
                vec![],
                context(&request).tables(),
                context(&request).client_timeout,
            )
            .await?;
        // The ticket names the query it will start, so CancelFlightInfo can reach it.
        let ticket = TicketStatementQuery {
            statement_handle: QueryTicket::new(query.query)
                .with_query_id(new_query_id())
                .encode_to_vec()
                .into(),
        };
        Self::info(
            &self.engine.view_types().schema(&schema),
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let query = QueryTicket::decode_checked(&ticket.statement_handle)?;
        let context = context(&request);
        let stream = do_get::run_ticket(&self.engine, query, vec![], &context, self.send).await?;
        Ok(Response::new(stream))
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(no_substrait())
    }

    // Prepared statements.

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        if query.transaction_id.is_some() {
            return Err(no_transactions());
        }
        let prepared = self
            .engine
            .prepare(
                query.query.clone(),
                context(&request).tables(),
                context(&request).client_timeout,
            )
            .await?;
        let parameter_schema = Schema::new(
            prepared
                .params
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    Field::new(
                        format!("${}", i + 1),
                        t.clone().unwrap_or(DataType::Null),
                        true,
                    )
                })
                .collect::<Vec<_>>(),
        );
        let parameter_schema = views::expand_schema(&Arc::new(parameter_schema));
        let dataset_schema = self.engine.view_types().schema(&prepared.schema);
        let handle = self.statements.insert(PreparedStatement {
            sql: query.query,
            user: user_of(&context(&request)),
            params: prepared.params,
            bound: None,
            last_used: Instant::now(),
        })?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle,
            dataset_schema: schema_bytes(&dataset_schema)?,
            parameter_schema: schema_bytes(&parameter_schema)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let context = context(&request);
        let statement = self
            .statements
            .get(&query.prepared_statement_handle, &context)?;
        let values = bound_parameters(request.into_inner(), &statement.params).await?;
        self.statements
            .bind(&query.prepared_statement_handle, &context, values)?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let statement = self
            .statements
            .get(&query.prepared_statement_handle, &context(&request))?;
        let params = statement.values()?;
        let caller = context(&request);
        let schema = self
            .engine
            .schema(
                statement.sql,
                params,
                caller.tables(),
                caller.client_timeout,
            )
            .await?;
        Self::info(
            &self.engine.view_types().schema(&schema),
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let context = context(&request);
        let statement = self
            .statements
            .get(&query.prepared_statement_handle, &context)?;
        let params = statement.values()?;
        let ticket = QueryTicket::new(statement.sql);
        let stream = do_get::run_ticket(&self.engine, ticket, params, &context, self.send).await?;
        Ok(Response::new(stream))
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.statements
            .remove(&query.prepared_statement_handle, &context(&request));
        Ok(())
    }

    async fn do_action_create_prepared_substrait_plan(
        &self,
        _query: ActionCreatePreparedSubstraitPlanRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        Err(no_substrait())
    }

    // Metadata.

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn do_get_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.metadata_stream(query.into(), &request).await
    }

    // Everything else: refused with a reason.

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<DoGetStream>, Status> {
        Err(Error::invalid(format!(
            "the Flight SQL message {} is not a ticket this server issues; \
             call GetFlightInfo and redeem the ticket it returns",
            message.type_url
        ))
        .into())
    }

    async fn do_put_statement_update(
        &self,
        _ticket: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("an update statement (CommandStatementUpdate)"))
    }

    async fn do_put_statement_ingest(
        &self,
        _ticket: CommandStatementIngest,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("bulk ingestion (CommandStatementIngest)"))
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only(
            "a prepared update (CommandPreparedStatementUpdate)",
        ))
    }

    async fn do_put_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(no_substrait())
    }

    async fn do_put_fallback(
        &self,
        _request: Request<PeekableFlightDataStream>,
        message: Any,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoPutStream>,
        Status,
    > {
        Err(read_only(&format!("DoPut ({})", display_type(&message))))
    }

    async fn do_action_begin_transaction(
        &self,
        _query: ActionBeginTransactionRequest,
        _request: Request<Action>,
    ) -> Result<ActionBeginTransactionResult, Status> {
        Err(no_transactions())
    }

    async fn do_action_end_transaction(
        &self,
        _query: ActionEndTransactionRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Err(no_transactions())
    }

    async fn do_action_begin_savepoint(
        &self,
        _query: ActionBeginSavepointRequest,
        _request: Request<Action>,
    ) -> Result<ActionBeginSavepointResult, Status> {
        Err(no_transactions())
    }

    async fn do_action_end_savepoint(
        &self,
        _query: ActionEndSavepointRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Err(no_transactions())
    }

    /// The deprecated Flight SQL cancel: the same as `CancelFlightInfo`.
    async fn do_action_cancel_query(
        &self,
        query: ActionCancelQueryRequest,
        request: Request<Action>,
    ) -> Result<ActionCancelQueryResult, Status> {
        let info = FlightInfo::decode(query.info)
            .map_err(|e| Error::invalid(format!("the request's info is not a FlightInfo: {e}")))?;
        let context = context(&request);
        let status = actions::cancel_flight_info(&self.engine, &info, caller(&context.identity))?;
        // ActionCancelQueryResult.CancelResult (not re-exported by arrow-flight) numbers
        // its values as CancelStatus does: CANCELLED = 1, NOT_CANCELLABLE = 3.
        Ok(ActionCancelQueryResult {
            result: status as i32,
        })
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoActionStream>,
        Status,
    > {
        Err(actions::unknown(&request.get_ref().r#type).into())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// A parameter stream that does not decode is the client's error, not ours.
/// The one row of parameter values a `DoPut` binds, cast to `types` (`None`: no row).
/// Read batch by batch: a client that streams more than one row is stopped at the first
/// extra row, not buffered. Decodes client bytes, so it is fuzzed (`fuzz/`): arrow-ipc
/// can panic on some malformed messages (fuzz/corpus/fuzz_do_put/crash-boolean-length),
/// and a panic here is the client's error, not the server's.
pub async fn bound_parameters(
    data: impl Stream<Item = Result<FlightData, Status>> + Send + 'static,
    types: &[Option<DataType>],
) -> Result<Option<Vec<ScalarValue>>, Status> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(decode_parameters(data, types))
        .catch_unwind()
        .await
        .unwrap_or_else(|_panic| {
            Err(Error::invalid(
                "the bound parameters are not a valid Arrow IPC stream (the decoder rejected \
                 a malformed message)",
            )
            .into())
        })
}

async fn decode_parameters(
    data: impl Stream<Item = Result<FlightData, Status>> + Send + 'static,
    types: &[Option<DataType>],
) -> Result<Option<Vec<ScalarValue>>, Status> {
    let data = data.map_err(|s| FlightError::Tonic(Box::new(s)));
    let mut batches = FlightRecordBatchStream::new_from_flight_data(data);
    let mut row: Option<RecordBatch> = None;
    while let Some(batch) = batches.try_next().await.map_err(bind_error)? {
        let rows = batch.num_rows() + row.as_ref().map_or(0, RecordBatch::num_rows);
        if rows > 1 {
            return Err(Error::invalid(
                "more than one row of parameters was bound; a query runs with one row \
                 (execute it once per row)",
            )
            .into());
        }
        if batch.num_rows() == 1 {
            row = Some(batch);
        }
    }
    let Some(batch) = row else {
        return Ok(None);
    };
    let values = batch
        .columns()
        .iter()
        .map(|column| ScalarValue::try_from_array(column, 0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)?;
    // Cast now: a value that cannot take its parameter's type fails at bind time, not
    // at the first execution.
    Ok(Some(crate::query::cast_params(values, types)?))
}

fn bind_error(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(status) => *status,
        other => Error::invalid(format!(
            "the bound parameters are not an Arrow IPC stream of one row: {other}"
        ))
        .into(),
    }
}

fn display_type(message: &Any) -> &str {
    if message.type_url.is_empty() {
        "a descriptor without a Flight SQL command"
    } else {
        &message.type_url
    }
}

/// A statement created by `CreatePreparedStatement`, and the values bound to it.
#[derive(Debug, Clone)]
struct PreparedStatement {
    sql: String,
    /// Who created it; only they may use it.
    user: Option<Arc<str>>,
    /// Parameter types, `$1` first.
    params: Vec<Option<DataType>>,
    /// The last row bound with `DoPut`.
    bound: Option<Vec<ScalarValue>>,
    last_used: Instant,
}

impl PreparedStatement {
    /// The values to run with; every parameter must be bound.
    fn values(&self) -> Result<Vec<ScalarValue>> {
        match &self.bound {
            Some(values) => Ok(values.clone()),
            None if self.params.is_empty() => Ok(vec![]),
            None => Err(Error::invalid(format!(
                "the prepared statement has {} parameter(s) and none are bound: bind them \
                 with DoPut(CommandPreparedStatementQuery) first",
                self.params.len()
            ))),
        }
    }

    /// Bytes the statement keeps: its text, parameter types and bound values.
    fn size(&self) -> usize {
        size_of::<Self>()
            + self.sql.len()
            + self.params.len() * size_of::<Option<DataType>>()
            + self
                .bound
                .as_ref()
                .map_or(0, |values| values.iter().map(ScalarValue::size).sum())
    }
}

/// What one user may keep open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedLimits {
    /// Statements per user (`--max-prepared-statements`).
    pub max_statements: usize,
    /// Bytes of statements and bound values per user (`--max-prepared-statement-bytes`).
    pub max_bytes: usize,
}

impl Default for PreparedLimits {
    fn default() -> Self {
        Self {
            max_statements: super::DEFAULT_MAX_PREPARED_STATEMENTS,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Open prepared statements by handle. Each user has a budget of statements and bytes;
/// when creating or binding would pass it, the user's own least recently used statements
/// are closed (clients that never close theirs cannot exhaust the server, and cannot
/// close anyone else's).
#[derive(Debug)]
struct PreparedStatements {
    limits: PreparedLimits,
    map: Mutex<HashMap<Bytes, PreparedStatement>>,
}

impl PreparedStatements {
    fn new(limits: PreparedLimits) -> Self {
        Self {
            limits: PreparedLimits {
                max_statements: limits.max_statements.max(1),
                max_bytes: limits.max_bytes,
            },
            map: Mutex::default(),
        }
    }

    fn len(&self) -> usize {
        self.map.lock().len()
    }

    fn insert(&self, statement: PreparedStatement) -> Result<Bytes> {
        let handle = Bytes::from(format!("ps-{}{}", new_query_id(), new_query_id()));
        let user = statement.user.clone();
        let mut map = self.map.lock();
        self.check_alone(&statement)?;
        map.insert(handle.clone(), statement);
        self.evict(&mut map, &user, &handle);
        Ok(handle)
    }

    /// A statement larger than the whole budget is refused outright.
    fn check_alone(&self, statement: &PreparedStatement) -> Result<()> {
        if statement.size() > self.limits.max_bytes {
            return Err(Error::invalid(format!(
                "the prepared statement and its bound values take {} bytes, over the {} \
                 bytes each user may keep (--max-prepared-statement-bytes)",
                statement.size(),
                self.limits.max_bytes
            )));
        }
        Ok(())
    }

    /// Closes `user`'s least recently used statements, other than `keep`, until the user
    /// is within budget.
    fn evict(
        &self,
        map: &mut HashMap<Bytes, PreparedStatement>,
        user: &Option<Arc<str>>,
        keep: &Bytes,
    ) {
        loop {
            let (count, bytes, oldest) = map.iter().filter(|(_, s)| &s.user == user).fold(
                (0, 0, None),
                |(count, bytes, oldest), (h, s)| {
                    let older = match oldest {
                        Some((_, t)) if t <= s.last_used => oldest,
                        _ if h == keep => oldest,
                        _ => Some((h, s.last_used)),
                    };
                    (count + 1, bytes + s.size(), older)
                },
            );
            let over = count > self.limits.max_statements || bytes > self.limits.max_bytes;
            let Some((oldest, _)) = oldest.filter(|_| over) else {
                break;
            };
            let oldest = oldest.clone();
            tracing::debug!("closing the least recently used prepared statement");
            map.remove(&oldest);
        }
    }

    /// The statement, if `context`'s caller created it.
    fn get(&self, handle: &Bytes, context: &CallContext) -> Result<PreparedStatement> {
        self.with(handle, context, |s| {
            s.last_used = Instant::now();
            s.clone()
        })
    }

    fn bind(
        &self,
        handle: &Bytes,
        context: &CallContext,
        values: Option<Vec<ScalarValue>>,
    ) -> Result<()> {
        let mut map = self.map.lock();
        let statement = Self::owned(&mut map, handle, context)?;
        let mut bound = statement.clone();
        bound.bound = values;
        self.check_alone(&bound)?;
        *statement = bound;
        self.evict(&mut map, &user_of(context), handle);
        Ok(())
    }

    /// Closes the statement. Closing one already closed (or evicted, or unknown) is not
    /// an error: clients close their statements when they are done, whatever happened
    /// to them meanwhile. Another user's statement is left alone, silently.
    fn remove(&self, handle: &Bytes, context: &CallContext) {
        let mut map = self.map.lock();
        if Self::owned(&mut map, handle, context).is_ok() {
            map.remove(handle);
        }
    }

    fn with<T>(
        &self,
        handle: &Bytes,
        context: &CallContext,
        f: impl FnOnce(&mut PreparedStatement) -> T,
    ) -> Result<T> {
        let mut map = self.map.lock();
        Ok(f(Self::owned(&mut map, handle, context)?))
    }

    /// The statement under `handle`, if `context`'s caller created it.
    fn owned<'a>(
        map: &'a mut HashMap<Bytes, PreparedStatement>,
        handle: &Bytes,
        context: &CallContext,
    ) -> Result<&'a mut PreparedStatement> {
        match map.get_mut(handle) {
            Some(statement) if statement.user == user_of(context) => Ok(statement),
            _ => {
                let shown: String = String::from_utf8_lossy(handle).chars().take(64).collect();
                Err(Error::invalid(format!(
                    "no open prepared statement has the handle {shown:?}: it was closed, \
                     replaced after newer ones filled your --max-prepared-statements or \
                     --max-prepared-statement-bytes, or belongs to another user; prepare it again"
                )))
            }
        }
    }
}

/// `GetPrimaryKeys`' result schema (Flight SQL spec).
fn primary_keys_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ]))
}

/// `GetExportedKeys`', `GetImportedKeys`' and `GetCrossReference`'s result schema.
fn keys_schema() -> SchemaRef {
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("pk_catalog_name", true),
        text("pk_db_schema_name", true),
        text("pk_table_name", false),
        text("pk_column_name", false),
        text("fk_catalog_name", true),
        text("fk_db_schema_name", true),
        text("fk_table_name", false),
        text("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        text("fk_key_name", true),
        text("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ]))
}

/// What `GetSqlInfo` reports.
fn sql_info() -> Result<SqlInfoData> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Quiver");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    // The Arrow columnar format version (IPC metadata V5).
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.5.0");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, true);
    b.append(SqlInfo::FlightSqlServerBulkIngestion, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    // Unquoted names fold to lower case; quoted names keep their case.
    b.append(
        SqlInfo::SqlIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
    );
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(
        SqlInfo::SqlQuotedIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityCaseInsensitive as i32,
    );
    b.append(SqlInfo::SqlAllTablesAreSelectable, true);
    b.append(
        SqlInfo::SqlNullOrdering,
        SqlNullOrdering::SqlNullsSortedHigh as i32,
    );
    b.append(SqlInfo::SqlSearchStringEscape, "\\");
    b.append(SqlInfo::SqlSupportsColumnAliasing, true);
    b.append(SqlInfo::SqlNullPlusNullIsNull, true);
    b.append(SqlInfo::SqlSupportsTableCorrelationNames, true);
    b.append(SqlInfo::SqlSupportsExpressionsInOrderBy, true);
    b.append(SqlInfo::SqlSupportsOrderByUnrelated, true);
    b.append(SqlInfo::SqlSupportsLikeEscapeClause, true);
    // Bitmasks of SupportedSqlGrammar / SupportedAnsi92SqlGrammarLevel: minimum and core
    // grammar, ANSI-92 entry level.
    b.append(SqlInfo::SqlSupportedGrammar, 0b11_i32);
    b.append(SqlInfo::SqlAnsi92SupportedLevel, 0b1_i32);
    b.append(SqlInfo::SqlSchemaTerm, "schema");
    b.append(SqlInfo::SqlCatalogTerm, "catalog");
    b.append(SqlInfo::SqlCatalogAtStart, true);
    b.append(SqlInfo::SqlSelectForUpdateSupported, false);
    b.append(SqlInfo::SqlStoredProceduresSupported, false);
    b.append(SqlInfo::SqlCorrelatedSubqueriesSupported, true);
    b.append(SqlInfo::SqlTransactionsSupported, false);
    b.append(SqlInfo::SqlBatchUpdatesSupported, false);
    b.append(SqlInfo::SqlSavepointsSupported, false);
    Ok(b.build()?)
}

/// What `GetXdbcTypeInfo` reports: the SQL types a query can name.
fn type_info() -> Result<XdbcTypeInfoData> {
    let mut b = XdbcTypeInfoDataBuilder::new();
    let mut add = |name: &str, data_type: XdbcDataType, size: Option<i32>, quoted: bool| {
        let numeric = matches!(
            data_type,
            XdbcDataType::XdbcTinyint
                | XdbcDataType::XdbcSmallint
                | XdbcDataType::XdbcInteger
                | XdbcDataType::XdbcBigint
                | XdbcDataType::XdbcReal
                | XdbcDataType::XdbcDouble
                | XdbcDataType::XdbcDecimal
        );
        b.append(XdbcTypeInfo {
            type_name: name.to_string(),
            data_type,
            column_size: size,
            literal_prefix: quoted.then(|| "'".to_string()),
            literal_suffix: quoted.then(|| "'".to_string()),
            create_params: (data_type == XdbcDataType::XdbcDecimal)
                .then(|| vec!["precision".to_string(), "scale".to_string()]),
            nullable: Nullable::NullabilityNullable,
            case_sensitive: data_type == XdbcDataType::XdbcVarchar,
            searchable: if data_type == XdbcDataType::XdbcVarchar {
                Searchable::Full
            } else {
                Searchable::Basic
            },
            unsigned_attribute: numeric.then_some(false),
            fixed_prec_scale: false,
            auto_increment: Some(false),
            local_type_name: Some(name.to_string()),
            minimum_scale: (data_type == XdbcDataType::XdbcDecimal).then_some(0),
            maximum_scale: (data_type == XdbcDataType::XdbcDecimal).then_some(38),
            sql_data_type: data_type,
            datetime_subcode: None,
            num_prec_radix: numeric.then_some(10),
            interval_precision: None,
        });
    };
    add("BOOLEAN", XdbcDataType::XdbcBit, Some(1), false);
    add("TINYINT", XdbcDataType::XdbcTinyint, Some(3), false);
    add("SMALLINT", XdbcDataType::XdbcSmallint, Some(5), false);
    add("INTEGER", XdbcDataType::XdbcInteger, Some(10), false);
    add("BIGINT", XdbcDataType::XdbcBigint, Some(19), false);
    add("REAL", XdbcDataType::XdbcReal, Some(7), false);
    add("DOUBLE", XdbcDataType::XdbcDouble, Some(15), false);
    add("DECIMAL", XdbcDataType::XdbcDecimal, Some(38), false);
    add("VARCHAR", XdbcDataType::XdbcVarchar, None, true);
    add("BYTEA", XdbcDataType::XdbcVarbinary, None, true);
    add("DATE", XdbcDataType::XdbcDate, Some(10), true);
    add("TIME", XdbcDataType::XdbcTime, Some(18), true);
    add("TIMESTAMP", XdbcDataType::XdbcTimestamp, Some(29), true);
    Ok(b.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_tables_build() {
        assert!(sql_info().is_ok());
        let types = type_info().unwrap();
        assert_eq!(types.record_batch(None).unwrap().num_rows(), 13);
        assert_eq!(
            types
                .record_batch(XdbcDataType::XdbcBigint as i32)
                .unwrap()
                .num_rows(),
            1
        );
    }

    #[test]
    fn prepared_statements_evict_the_least_recently_used() {
        let statements = PreparedStatements::new(PreparedLimits {
            max_statements: 2,
            max_bytes: 1 << 20,
        });
        let statement = || PreparedStatement {
            sql: "SELECT 1".into(),
            user: None,
            params: vec![],
            bound: None,
            last_used: Instant::now(),
        };
        let anyone = CallContext::default();
        let a = statements.insert(statement()).unwrap();
        let b = statements.insert(statement()).unwrap();
        statements.get(&a, &anyone).unwrap();
        let c = statements.insert(statement()).unwrap();
        assert!(statements.get(&a, &anyone).is_ok());
        assert!(
            statements.get(&b, &anyone).is_err(),
            "b was least recently used"
        );
        assert!(statements.get(&c, &anyone).is_ok());
        // Another user's handle is as good as unknown.
        let bob = CallContext {
            identity: Some(super::super::auth::Identity {
                name: "bob".into(),
                admin: false,
                tables: Default::default(),
            }),
            ..CallContext::default()
        };
        assert!(statements.get(&a, &bob).is_err());
        // Another user's close does nothing; the owner's closes it, twice is fine.
        statements.remove(&a, &bob);
        assert!(statements.get(&a, &anyone).is_ok());
        statements.remove(&a, &anyone);
        statements.remove(&a, &anyone);
        assert!(statements.get(&a, &anyone).is_err());
    }

    #[test]
    fn budgets_are_per_user_and_in_bytes() {
        let statements = PreparedStatements::new(PreparedLimits {
            max_statements: 2,
            max_bytes: 4096,
        });
        let as_user = |name: &str| CallContext {
            identity: Some(super::super::auth::Identity {
                name: name.into(),
                admin: false,
                tables: Default::default(),
            }),
            ..CallContext::default()
        };
        let statement = |user: &str, sql_len: usize| PreparedStatement {
            sql: "x".repeat(sql_len),
            user: Some(user.into()),
            params: vec![],
            bound: None,
            last_used: Instant::now(),
        };
        let (alice, bob) = (as_user("alice"), as_user("bob"));
        let a1 = statements.insert(statement("alice", 10)).unwrap();
        let a2 = statements.insert(statement("alice", 10)).unwrap();
        // Bob's statements never close Alice's.
        for _ in 0..5 {
            statements.insert(statement("bob", 10)).unwrap();
        }
        assert!(statements.get(&a1, &alice).is_ok());
        assert!(statements.get(&a2, &alice).is_ok());
        assert_eq!(statements.len(), 4);
        // Bytes: a big statement pushes out the user's older ones, and one over the
        // whole budget is refused.
        let big = statements.insert(statement("alice", 3000)).unwrap();
        assert!(statements.get(&a1, &alice).is_err());
        assert!(statements.get(&big, &alice).is_ok());
        let err = statements.insert(statement("alice", 5000)).unwrap_err();
        assert!(
            err.to_string().contains("--max-prepared-statement-bytes"),
            "{err}"
        );
        // Binding a large value counts too.
        let b = statements.insert(statement("bob", 10)).unwrap();
        let err = statements
            .bind(
                &b,
                &bob,
                Some(vec![ScalarValue::from("v".repeat(5000).as_str())]),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("--max-prepared-statement-bytes"),
            "{err}"
        );
    }
}
