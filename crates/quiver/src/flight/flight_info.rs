//! `GetFlightInfo`, `GetSchema` and `ListFlights`: describing results without running them.

use std::sync::Arc;

use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, SchemaAsIpc, SchemaResult, Ticket,
};
use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::catalog::TableProvider;

use super::ticket::{self, Command, QueryTicket};
use crate::error::{Error, Result};
use crate::query::{Caller, Described, MAX_SLICES, QueryEngine, TableAccess, new_query_id};

/// What a descriptor stands for: a CMD holds SQL, a Quiver ticket or a Flight SQL
/// command; a PATH `[table]` means every row of that table.
pub(super) fn descriptor_command(
    engine: &QueryEngine,
    descriptor: &FlightDescriptor,
    access: &TableAccess,
) -> Result<Command> {
    match DescriptorType::try_from(descriptor.r#type) {
        Ok(DescriptorType::Cmd) => ticket::decode(&descriptor.cmd),
        Ok(DescriptorType::Path) => match descriptor.path.as_slice() {
            [table] => {
                // A table the caller may not read is missing for them.
                if !engine.catalog().knows(table) || !access.allows(table) {
                    return Err(Error::TableNotFound {
                        name: table.clone(),
                        available: access.visible(engine.catalog().table_names()),
                    });
                }
                Ok(Command::Sql(ticket::select_all(table)))
            }
            other => Err(Error::invalid(format!(
                "a PATH descriptor must hold exactly one element, a table name; got {} elements",
                other.len()
            ))),
        },
        Ok(DescriptorType::Unknown) | Err(_) => Err(Error::invalid(
            "the descriptor type must be CMD (SQL) or PATH ([table])",
        )),
    }
}

/// The schema and the endpoints whose tickets run `ticket` (keeping its timeout and
/// compression): one, or one per slice of the result (`--endpoints-per-query`).
pub(super) async fn flight_info(
    engine: &Arc<QueryEngine>,
    descriptor: FlightDescriptor,
    ticket: QueryTicket,
    caller: &Caller,
) -> Result<FlightInfo> {
    let described = engine
        .describe(ticket.sql.clone(), ticket.bound_parameters()?, caller)
        .await?;
    let schema = engine.view_types().schema(&described.schema);
    let endpoints = endpoints(
        ticket,
        &described,
        &engine.slice_locations(),
        QueryTicket::encode_any,
    );
    Ok(info_for(descriptor, &schema, endpoints, None)?.with_ordered(described.ordered))
}

/// One endpoint whose ticket runs `ticket`, or one per slice when the result splits,
/// located at `locations` in turn (`None`: this server); each ticket encoded by `encode`.
/// Every ticket names the query it will start, so `CancelFlightInfo` can reach it.
pub(super) fn endpoints(
    ticket: QueryTicket,
    described: &Described,
    locations: &[Option<String>],
    encode: impl Fn(&QueryTicket) -> Bytes,
) -> Vec<FlightEndpoint> {
    let endpoint = |ticket: QueryTicket| {
        FlightEndpoint::new()
            .with_ticket(Ticket::new(encode(&ticket.with_query_id(new_query_id()))))
    };
    // A ticket a client made for one slice stays one.
    match described.slices {
        Some(slices) if ticket.slice_count.is_none() => {
            let count = u32::try_from(slices.count).unwrap_or(MAX_SLICES);
            (0..count)
                .map(|index| {
                    let slice = ticket.clone().with_slice(index, count, slices.fingerprint);
                    let at = locations.get(index as usize % locations.len().max(1));
                    match at.cloned().flatten() {
                        Some(url) => endpoint(slice).with_location(url),
                        None => endpoint(slice),
                    }
                })
                .collect()
        }
        _ => vec![endpoint(ticket)],
    }
}
/// The IPC-encoded schema of `sql`.
pub(super) async fn schema(
    engine: &Arc<QueryEngine>,
    sql: String,
    caller: &Caller,
) -> Result<SchemaResult> {
    let schema = engine
        .view_types()
        .schema(&engine.schema(sql, vec![], caller).await?);
    Ok(SchemaAsIpc::new(&schema, &IpcWriteOptions::default()).try_into()?)
}

/// One `FlightInfo` per table the caller may read, with row count and size from
/// Parquet footers.
pub(super) fn list_flights(engine: &QueryEngine, access: &TableAccess) -> Result<Vec<FlightInfo>> {
    let catalog = engine.catalog();
    access
        .visible(catalog.table_names())
        .into_iter()
        .filter_map(|name| catalog.get(&name).map(|t| (name, t)))
        .map(|(name, table)| {
            let schema = engine.view_types().schema(&table.schema());
            info_for(
                FlightDescriptor::new_path(vec![name.clone()]),
                &schema,
                vec![FlightEndpoint::new().with_ticket(Ticket::new(
                    QueryTicket::new(ticket::select_all(&name)).encode_any(),
                ))],
                Some((table.num_rows(), table.byte_size())),
            )
        })
        .collect()
}

fn info_for(
    descriptor: FlightDescriptor,
    schema: &SchemaRef,
    endpoints: Vec<FlightEndpoint>,
    size: Option<(u64, u64)>,
) -> Result<FlightInfo> {
    let (records, bytes) = size.map_or((-1, -1), |(r, b)| {
        (
            i64::try_from(r).unwrap_or(i64::MAX),
            i64::try_from(b).unwrap_or(i64::MAX),
        )
    });
    let info = FlightInfo::new()
        .try_with_schema(schema)?
        .with_descriptor(descriptor);
    Ok(endpoints
        .into_iter()
        .fold(info, FlightInfo::with_endpoint)
        .with_total_records(records)
        .with_total_bytes(bytes))
}
