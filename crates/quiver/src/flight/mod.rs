//! The Arrow Flight service: one dispatcher for every ticket and descriptor.
//!
//! arrow-flight's `FlightSqlService` cannot be the service itself (its `DoGet` rejects
//! any ticket that is not a protobuf `Any`, so plain SQL tickets would never arrive), so
//! this hand-written [`FlightService`] decodes each request once ([`ticket::decode`]) and
//! routes it. Each RPC lives in its own module; the trait impl below only delegates.

mod actions;
mod do_get;
mod flight_info;
pub mod ticket;
pub mod views;

pub use do_get::SendOptions;

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{Error, Result};
use crate::query::QueryEngine;
use ticket::Command;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Quiver's Flight service.
#[derive(Debug, Clone)]
pub struct QuiverFlightService {
    engine: Arc<QueryEngine>,
    send: SendOptions,
}

impl QuiverFlightService {
    /// A service over `engine`.
    pub fn new(engine: Arc<QueryEngine>, send: SendOptions) -> Self {
        Self { engine, send }
    }

    /// The SQL a command stands for; Flight SQL is not served yet.
    fn sql(command: Command) -> Result<String> {
        match command {
            Command::Sql(sql) => Ok(sql),
            Command::FlightSql(any) => Err(Error::Unsupported {
                what: format!("Flight SQL ({})", any.type_url),
            }),
        }
    }
}

fn unsupported<T>(what: &str) -> Result<T, Status> {
    Err(Error::Unsupported {
        what: what.to_string(),
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

    #[tracing::instrument(skip_all, name = "Handshake")]
    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        // No authentication is configured: the handshake succeeds with nothing to exchange.
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }

    #[tracing::instrument(skip_all, name = "ListFlights")]
    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let infos = flight_info::list_flights(&self.engine)?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            infos.into_iter().map(Ok),
        ))))
    }

    #[tracing::instrument(skip_all, name = "GetFlightInfo")]
    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let descriptor = request.into_inner();
        let sql = Self::sql(flight_info::descriptor_sql(&self.engine, &descriptor)?)?;
        let info = flight_info::flight_info(&self.engine, descriptor, sql).await?;
        Ok(Response::new(info))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unsupported("PollFlightInfo (use GetFlightInfo: results stream as they are computed)")
    }

    #[tracing::instrument(skip_all, name = "GetSchema")]
    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let descriptor = request.into_inner();
        let sql = Self::sql(flight_info::descriptor_sql(&self.engine, &descriptor)?)?;
        Ok(Response::new(flight_info::schema(&self.engine, sql).await?))
    }

    #[tracing::instrument(skip_all, name = "DoGet")]
    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let sql = Self::sql(ticket::decode(&request.into_inner().ticket)?)?;
        tracing::debug!(%sql, "query");
        let stream = do_get::do_get(&self.engine, sql, self.send).await?;
        Ok(Response::new(stream))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unsupported("DoPut (Quiver serves read-only tables from Parquet files)")
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("DoExchange")
    }

    #[tracing::instrument(skip_all, name = "DoAction")]
    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let body = actions::run(&self.engine, &action.r#type).await?;
        let result = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(result)
        }))))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::iter(
            actions::list().into_iter().map(Ok),
        ))))
    }
}
