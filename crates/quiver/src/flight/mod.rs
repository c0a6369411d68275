//! The Arrow Flight service: one dispatcher for every ticket and descriptor.
//!
//! ```text
//!  HTTP/2 request ── RpcMetricsLayer ── route::DoGetRoute ─┬─ DoGet ──▶ QuiverFlightService::do_get_frames
//!                                                          │            caller ─▶ ticket::decode ─▶ do_get::serve
//!                                                          └─ every other RPC ──▶ tonic ──▶ the FlightService impl below
//! ```
//!
//! [`stack`] builds that whole stack and [`serve`] serves it over HTTP/2; the server and
//! the integration tests both use the two.
//! Every RPC starts the same way: authenticate the call into a [`Caller`] (the one value
//! that says who is calling), then decode its ticket or command once ([`ticket::decode`]).
//! `DoGet` is served in one place, [`do_get::serve`], for plain SQL, Quiver tickets and
//! Flight SQL tickets alike. For the other RPCs, arrow-flight's `FlightSqlService`
//! ([`sql::FlightSql`]) serves Flight SQL commands, actions and `DoPut`; it finds the
//! caller this dispatcher put in the request, and refuses a request without one.

mod actions;
pub mod auth;
pub mod body;
mod do_get;
mod flight_info;
pub mod http2;
mod login;
pub mod route;
mod sql;
mod stack;
pub mod ticket;

pub use datafusion::arrow::ipc::CompressionType;
pub use do_get::{SendOptions, SendPath};
pub use http2::{Http2Settings, serve};
pub use sql::{PreparedLimits, bound_parameters};
pub use stack::{FlightPort, MessageLimits, stack};

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::Command as FlightSqlCommand;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::{AuthRecord, Origin};
use crate::error::{Error, Result};
use crate::query::{Caller, QueryEngine};
use auth::{Authenticator, PeerInfo};
use do_get::MessageStream;
use ticket::{Command, QueryTicket};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Default of `--max-prepared-statements`.
pub const DEFAULT_MAX_PREPARED_STATEMENTS: usize = 1024;

/// Quiver's Flight service.
#[derive(Debug, Clone)]
pub struct QuiverFlightService {
    engine: Arc<QueryEngine>,
    send: SendOptions,
    auth: Option<Arc<Authenticator>>,
    flight_sql: Arc<sql::FlightSql>,
}

impl QuiverFlightService {
    /// A service over `engine`, open to every client, keeping each user's Flight SQL
    /// prepared statements within `prepared`.
    pub fn new(
        engine: Arc<QueryEngine>,
        send: SendOptions,
        prepared: PreparedLimits,
    ) -> Result<Self> {
        Ok(Self {
            flight_sql: Arc::new(sql::FlightSql::new(Arc::clone(&engine), prepared)?),
            engine,
            send,
            auth: None,
        })
    }

    /// Requires every call but `Handshake` to carry a bearer token `auth` accepts.
    pub fn with_auth(mut self, auth: Arc<Authenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Who is calling: runs first in every RPC. With authentication off, everyone is the
    /// same anonymous caller; a caller turned away is written to the audit log.
    fn caller<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<Caller, Status> {
        if let Some(subject) = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.client_subject.as_deref())
        {
            tracing::Span::current().record("client", subject);
        }
        let origin = origin(request, rpc);
        let mut caller = match &self.auth {
            None => Caller::default(),
            Some(auth) => auth.authenticate(request.metadata()).inspect_err(|e| {
                if let Some(log) = self.engine.audit() {
                    log.auth(&AuthRecord {
                        origin: &origin,
                        user: None,
                        success: false,
                        reason: &e.to_string(),
                        code: e.code(),
                    });
                }
            })?,
        };
        if let Some(user) = caller.user() {
            tracing::Span::current().record("user", user);
        }
        caller.origin = origin;
        caller.client_timeout = client_timeout(request.metadata());
        Ok(caller)
    }

    /// [`Self::caller`], also put in the request for the Flight SQL service.
    fn caller_in<T>(&self, request: &mut Request<T>, rpc: &'static str) -> Result<Caller, Status> {
        let caller = self.caller(request, rpc)?;
        request.extensions_mut().insert(caller.clone());
        Ok(caller)
    }

    /// The `FlightInfo` of a Flight SQL command, decoded already: straight to the
    /// `FlightSqlService` method that serves it (arrow-flight's blanket impl would decode
    /// the descriptor again).
    async fn flight_sql_info(
        &self,
        command: FlightSqlCommand,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let s = &*self.flight_sql;
        match command {
            FlightSqlCommand::CommandStatementQuery(c) => {
                s.get_flight_info_statement(c, request).await
            }
            FlightSqlCommand::CommandPreparedStatementQuery(c) => {
                s.get_flight_info_prepared_statement(c, request).await
            }
            FlightSqlCommand::CommandStatementSubstraitPlan(c) => {
                s.get_flight_info_substrait_plan(c, request).await
            }
            FlightSqlCommand::CommandGetCatalogs(c) => s.get_flight_info_catalogs(c, request).await,
            FlightSqlCommand::CommandGetDbSchemas(c) => s.get_flight_info_schemas(c, request).await,
            FlightSqlCommand::CommandGetTables(c) => s.get_flight_info_tables(c, request).await,
            FlightSqlCommand::CommandGetTableTypes(c) => {
                s.get_flight_info_table_types(c, request).await
            }
            FlightSqlCommand::CommandGetSqlInfo(c) => s.get_flight_info_sql_info(c, request).await,
            FlightSqlCommand::CommandGetPrimaryKeys(c) => {
                s.get_flight_info_primary_keys(c, request).await
            }
            FlightSqlCommand::CommandGetExportedKeys(c) => {
                s.get_flight_info_exported_keys(c, request).await
            }
            FlightSqlCommand::CommandGetImportedKeys(c) => {
                s.get_flight_info_imported_keys(c, request).await
            }
            FlightSqlCommand::CommandGetCrossReference(c) => {
                s.get_flight_info_cross_reference(c, request).await
            }
            FlightSqlCommand::CommandGetXdbcTypeInfo(c) => {
                s.get_flight_info_xdbc_type_info(c, request).await
            }
            other => Err(Error::Unsupported {
                what: format!("GetFlightInfo of {}", other.type_url()),
                hint: "describe a CommandStatementQuery, a prepared statement or a metadata \
                       command"
                    .into(),
            }
            .into()),
        }
    }

    /// `DoGet`, whatever the ticket: the one entry, which [`route::DoGetRoute`] calls
    /// with the `Ticket` it read from the HTTP/2 request.
    #[tracing::instrument(skip_all, name = "DoGet", fields(user, client))]
    pub async fn do_get_frames(&self, request: Request<Ticket>) -> Result<MessageStream, Status> {
        let caller = self.caller(&request, "DoGet")?;
        let command = ticket::decode(&request.get_ref().ticket)?;
        do_get::serve(&self.engine, &self.flight_sql, command, caller, self.send).await
    }
}

/// The RPC and where `request` came from.
fn origin<T>(request: &Request<T>, rpc: &'static str) -> Origin {
    let peer = request.extensions().get::<PeerInfo>();
    Origin {
        rpc,
        peer: peer
            .and_then(|p| p.remote_addr)
            .or_else(|| request.remote_addr()),
        client_subject: peer.and_then(|p| p.client_subject.clone()),
    }
}

/// The client's deadline from the `grpc-timeout` header: up to 8 digits and a unit
/// (H, M, S, m, u, n) per the gRPC HTTP/2 protocol.
fn client_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn unsupported<T>(what: &str) -> Result<T, Status> {
    // DoExchange only.
    Err(Error::Unsupported {
        what: what.to_string(),
        hint: "run queries with DoGet".into(),
    }
    .into())
}

#[tonic::async_trait]
impl FlightService for QuiverFlightService {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    #[tracing::instrument(skip_all, name = "Handshake", fields(user, client))]
    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let Some(auth) = &self.auth else {
            // No authentication configured: nothing to exchange.
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        };
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr)
            .or_else(|| request.remote_addr())
            .map(|a| a.ip());
        let handshake = auth.handshake(request.metadata(), peer).await;
        if let Some(log) = self.engine.audit() {
            let claimed = auth::claimed_user(request.metadata());
            let (reason, code) = match &handshake {
                Ok(_) => ("password".to_string(), tonic::Code::Ok),
                Err(e) => (e.to_string(), e.code()),
            };
            log.auth(&AuthRecord {
                origin: &origin(&request, "Handshake"),
                user: claimed.as_deref(),
                success: handshake.is_ok(),
                reason: &reason,
                code,
            });
        }
        let (identity, token) = handshake?;
        if let Some(user) = identity.user() {
            tracing::Span::current().record("user", user);
        }
        tracing::info!("session started");
        // pyarrow reads the token from this header; other clients from the payload.
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Internal("the session token is not a valid header".into()))?;
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.into(),
        };
        let mut response =
            Response::new(Box::pin(futures::stream::iter([Ok(reply)])) as Self::HandshakeStream);
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    #[tracing::instrument(skip_all, name = "ListFlights", fields(user, client))]
    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let caller = self.caller(&request, "ListFlights")?;
        let infos = flight_info::list_flights(&self.engine, &caller.tables)?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            infos.into_iter().map(Ok),
        ))))
    }

    #[tracing::instrument(skip_all, name = "GetFlightInfo", fields(user, client))]
    async fn get_flight_info(
        &self,
        mut request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller_in(&mut request, "GetFlightInfo")?;
        let command =
            flight_info::descriptor_command(&self.engine, request.get_ref(), &caller.tables)?;
        let ticket = match command {
            Command::Sql(sql) => QueryTicket::new(sql),
            Command::Query(ticket) => ticket,
            Command::FlightSql(command) => return self.flight_sql_info(command, request).await,
        };
        let info =
            flight_info::flight_info(&self.engine, request.into_inner(), ticket, &caller).await?;
        Ok(Response::new(info))
    }

    /// Results stream as they are computed, so a query's `FlightInfo` is complete at
    /// once: the answer is the `GetFlightInfo` one, marked done (no descriptor to poll).
    #[tracing::instrument(skip_all, name = "PollFlightInfo", fields(user, client))]
    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        let info = self.get_flight_info(request).await?.into_inner();
        Ok(Response::new(PollInfo {
            info: Some(info),
            flight_descriptor: None,
            progress: Some(1.0),
            expiration_time: None,
        }))
    }

    #[tracing::instrument(skip_all, name = "GetSchema", fields(user, client))]
    async fn get_schema(
        &self,
        mut request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let caller = self.caller_in(&mut request, "GetSchema")?;
        let command =
            flight_info::descriptor_command(&self.engine, request.get_ref(), &caller.tables)?;
        let ticket = match command {
            Command::Sql(sql) => QueryTicket::new(sql),
            Command::Query(ticket) => ticket,
            Command::FlightSql(command) => {
                // Flight SQL has no GetSchema of its own: the FlightInfo's schema is it.
                let info = self.flight_sql_info(command, request).await?;
                return Ok(Response::new(SchemaResult {
                    schema: info.into_inner().schema,
                }));
            }
        };
        Ok(Response::new(
            flight_info::schema(&self.engine, ticket.sql, &caller).await?,
        ))
    }

    /// Never reached: [`route::DoGetRoute`], in front of tonic in the [`stack`], serves
    /// every `DoGet` ([`Self::do_get_frames`]). A server built without it fails closed.
    async fn do_get(
        &self,
        _request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        Err(Error::Internal(
            "DoGet reached tonic's route: serve the service through flight::stack".into(),
        )
        .into())
    }

    /// Only Flight SQL uses `DoPut` here (binding prepared statement parameters); it
    /// refuses updates and ingestion as read-only.
    #[tracing::instrument(skip_all, name = "DoPut", fields(user, client))]
    async fn do_put(
        &self,
        mut request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        self.caller_in(&mut request, "DoPut")?;
        FlightService::do_put(&*self.flight_sql, request).await
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.caller(&request, "DoExchange")?;
        unsupported("DoExchange")
    }

    #[tracing::instrument(skip_all, name = "DoAction", fields(user, client))]
    async fn do_action(
        &self,
        mut request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let caller = self.caller_in(&mut request, "DoAction")?;
        if !actions::is_ours(&request.get_ref().r#type) {
            return FlightService::do_action(&*self.flight_sql, request).await;
        }
        let action = request.into_inner();
        let body = actions::run(&self.engine, &action, &caller).await?;
        let result = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(result)
        }))))
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.caller(&request, "ListActions")?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            actions::list().into_iter().map(Ok),
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        let parse = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            client_timeout(&m)
        };
        assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse("123456789S"), None, "at most 8 digits");
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(client_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
