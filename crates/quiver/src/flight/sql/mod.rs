//! Flight SQL: arrow-flight's [`FlightSqlService`], behind the dispatcher in `flight`.
//!
//! The dispatcher authenticates every call and decodes its command once. It calls the
//! `get_flight_info_*` methods below itself with the decoded command; the Flight SQL
//! actions and `DoPut` go through arrow-flight's blanket `FlightService` impl for a
//! `FlightSqlService`, which unpacks the action or the first message's descriptor. `DoGet` of every ticket is `flight::do_get`'s, which calls
//! [`FlightSql::prepared_query`] and [`FlightSql::metadata`] for Flight SQL tickets.
//! The prepared-statement store is in `prepared`, the metadata answers in `metadata`.
//!
//! ```text
//!  CommandStatementQuery ─ GetFlightInfo ─▶ FlightInfo(schema, TicketStatementQuery{QueryTicket})
//!  TicketStatementQuery ── DoGet ─────────▶ flight::do_get, as a plain SQL ticket
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
//! ticket; a result that splits (`--endpoints-per-query`) has one such ticket per slice.
//! Queries share admission control, deadlines and metrics with plain tickets.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arrow_flight::sql::metadata::{SqlInfoData, XdbcTypeInfoData};
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
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use bytes::Bytes;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::ScalarValue;
use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::ticket::QueryTicket;
use super::{actions, flight_info};
use crate::error::{Error, Result};
use crate::query::{Caller, QueryEngine};
use crate::wire::views;
use metadata::{Metadata, sql_info, type_info};
use prepared::{PreparedStatement, PreparedStatements};

mod metadata;
mod prepared;

pub use prepared::{PreparedLimits, bound_parameters};

/// The Flight SQL half of the service.
pub(in crate::flight) struct FlightSql {
    engine: Arc<QueryEngine>,
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
    pub(in crate::flight) fn new(
        engine: Arc<QueryEngine>,
        prepared: PreparedLimits,
    ) -> Result<Self> {
        Ok(Self {
            engine,
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
            .metadata_of(command.into(), &caller(&request)?.tables)
            .await?;
        Self::info(&batch.schema(), ticket, request.into_inner())
    }

    /// The values a prepared statement's `DoGet` runs with, if `caller` created it.
    pub(in crate::flight) fn prepared_query(
        &self,
        handle: &Bytes,
        caller: &Caller,
    ) -> Result<(QueryTicket, Vec<ScalarValue>)> {
        let statement = self.statements.get(handle, caller)?;
        let params = statement.values()?;
        Ok((QueryTicket::new(statement.sql), params))
    }
}

/// The caller the dispatcher authenticated. A request without one did not come
/// through the dispatcher: refused, never served as an anonymous caller.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            Error::Internal("a Flight SQL call arrived without an authenticated caller".into())
                .into()
        })
}

fn read_only(what: &str) -> Status {
    Error::NotReadOnly {
        what: what.to_string(),
        hint: "run queries with CommandStatementQuery or a prepared statement".into(),
    }
    .into()
}

fn no_transactions() -> Status {
    Error::Unsupported {
        what: "Transactions and savepoints".into(),
        hint: "Quiver is read-only and has no transactions or savepoints; run each query on \
               its own"
            .into(),
    }
    .into()
}

fn no_substrait() -> Status {
    Error::Unsupported {
        what: "Substrait plans".into(),
        hint: "send SQL (CommandStatementQuery)".into(),
    }
    .into()
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
        Err(Error::Internal("Handshake is served by the dispatcher".into()).into())
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
        let described = self
            .engine
            .describe(query.query.clone(), vec![], &caller(&request)?)
            .await?;
        let locations = self.engine.slice_locations();
        let endpoints =
            flight_info::endpoints(QueryTicket::new(query.query), &described, &locations, |t| {
                let ticket = TicketStatementQuery {
                    statement_handle: t.encode_to_vec().into(),
                };
                ticket.as_any().encode_to_vec().into()
            });
        let info = FlightInfo::new()
            .try_with_schema(&self.engine.view_types().schema(&described.schema))
            .map_err(Error::from)?
            .with_descriptor(request.into_inner())
            .with_ordered(described.ordered);
        Ok(Response::new(
            endpoints.into_iter().fold(info, FlightInfo::with_endpoint),
        ))
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
            .prepare(query.query.clone(), &caller(&request)?)
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
            owner: caller(&request)?.user,
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
        let caller = caller(&request)?;
        let statement = self
            .statements
            .get(&query.prepared_statement_handle, &caller)?;
        let values = bound_parameters(request.into_inner(), &statement.params).await?;
        self.statements
            .bind(&query.prepared_statement_handle, &caller, values)?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = caller(&request)?;
        let statement = self
            .statements
            .get(&query.prepared_statement_handle, &caller)?;
        let params = statement.values()?;
        let described = self
            .engine
            .describe(statement.sql.clone(), params.clone(), &caller)
            .await?;
        let info = FlightInfo::new()
            .try_with_schema(&self.engine.view_types().schema(&described.schema))
            .map_err(Error::from)?
            .with_descriptor(request.into_inner())
            .with_ordered(described.ordered);
        // One endpoint: the statement itself, run with whatever is bound when it is
        // fetched. Split: each slice a self-contained ticket carrying the values bound now,
        // so that any node can serve it.
        if described.slices.is_none() {
            let ticket = Ticket::new(query.as_any().encode_to_vec());
            return Ok(Response::new(
                info.with_endpoint(FlightEndpoint::new().with_ticket(ticket)),
            ));
        }
        let ticket = QueryTicket::new(statement.sql).with_parameters(&params)?;
        let locations = self.engine.slice_locations();
        let endpoints =
            flight_info::endpoints(ticket, &described, &locations, QueryTicket::encode_any);
        Ok(Response::new(
            endpoints.into_iter().fold(info, FlightInfo::with_endpoint),
        ))
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.statements
            .remove(&query.prepared_statement_handle, &caller(&request)?);
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

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, request).await
    }

    // Everything else: refused with a reason.

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
        let status = actions::cancel_flight_info(&self.engine, &info, &caller(&request)?)?;
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

fn display_type(message: &Any) -> &str {
    if message.type_url.is_empty() {
        "a descriptor without a Flight SQL command"
    } else {
        &message.type_url
    }
}
