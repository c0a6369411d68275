//! `DoAction` and `ListActions`.

use arrow_flight::{
    Action, ActionType, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightInfo,
};
use prost::Message;

use super::ticket;
use crate::error::{Error, Result};
use crate::query::{Caller, QueryEngine};

/// Re-list every table now instead of waiting for the refresh interval.
pub(super) const REFRESH: &str = "refresh";
/// The queries waiting or running, as JSON.
pub(super) const LIST_QUERIES: &str = "list-queries";
/// Cancel one query by id (the action body).
pub(super) const CANCEL_QUERY: &str = "cancel-query";
/// The Flight protocol's own cancel, for a query started from a `GetFlightInfo` ticket.
pub(super) const CANCEL_FLIGHT_INFO: &str = "CancelFlightInfo";

/// The actions this server understands.
pub(super) fn list() -> Vec<ActionType> {
    let action = |name: &str, description: &str| ActionType {
        r#type: name.to_string(),
        description: description.to_string(),
    };
    vec![
        action(
            REFRESH,
            "Re-list every table's files now and publish new files and partitions (admins \
             only, with authentication on; concurrent calls share one refresh). Returns JSON {\"changed\": [tables], \"failed\": [[table, reason]], \"skipped_files\": n}.",
        ),
        action(
            LIST_QUERIES,
            "The queries waiting or running, as a JSON array of {id, user, started, \
             elapsed_seconds, state, rows_sent, memory_reserved_bytes, sql}. With \
             authentication on, a user sees their own queries; an admin sees all.",
        ),
        action(
            CANCEL_QUERY,
            "Cancel the query whose id is the action body (UTF-8). Its stream ends with \
             ABORTED. With authentication on, only its user or an admin may cancel it.",
        ),
        action(
            CANCEL_FLIGHT_INFO,
            "Cancel the query of a FlightInfo from GetFlightInfo (body: \
             CancelFlightInfoRequest), whether or not its ticket was redeemed yet.",
        ),
        action(
            "CreatePreparedStatement",
            "Flight SQL: prepare a query (body: ActionCreatePreparedStatementRequest); \
             returns its handle, result schema and parameter schema.",
        ),
        action(
            "ClosePreparedStatement",
            "Flight SQL: close a prepared statement (body: ActionClosePreparedStatementRequest).",
        ),
        action(
            "CancelQuery",
            "Flight SQL (deprecated, use CancelFlightInfo): cancel the query of a FlightInfo \
             (body: ActionCancelQueryRequest).",
        ),
    ]
}

/// Runs `action` for `caller`; the result is one body.
pub(super) async fn run(engine: &QueryEngine, action: &Action, caller: &Caller) -> Result<Vec<u8>> {
    match action.r#type.as_str() {
        REFRESH => {
            // Re-listing reads every table's directory and footers: with authentication
            // on, an operator's action, not every user's.
            if let (Some(name), false) = (caller.user(), caller.admin) {
                return Err(Error::PermissionDenied {
                    reason: format!(
                        "{name} may not refresh the catalog: only admin users and tokens may \
                         (admin = true in the auth file); new files appear within \
                         --refresh-interval anyway"
                    ),
                });
            }
            let summary = engine.refresh().await;
            let body = serde_json::json!({
                "changed": summary.changed,
                "failed": summary.failed,
                "skipped_files": engine.catalog().skipped_files(),
            });
            Ok(body.to_string().into_bytes())
        }
        LIST_QUERIES => {
            let queries = engine.active_queries().list(caller);
            serde_json::to_vec(&queries).map_err(|e| Error::Internal(e.to_string()))
        }
        CANCEL_QUERY => {
            let id = std::str::from_utf8(&action.body)
                .map_err(|_| Error::invalid("the cancel-query body must be a query id in UTF-8"))?
                .trim();
            if id.is_empty() {
                return Err(Error::invalid(
                    "the cancel-query body must be the id of a query (see DoAction \"list-queries\")",
                ));
            }
            engine.active_queries().cancel(id, caller)?;
            Ok(serde_json::json!({ "cancelled": id })
                .to_string()
                .into_bytes())
        }
        CANCEL_FLIGHT_INFO => {
            let request = CancelFlightInfoRequest::decode(action.body.as_ref()).map_err(|e| {
                Error::invalid(format!("the body is not a CancelFlightInfoRequest: {e}"))
            })?;
            let info = request
                .info
                .ok_or_else(|| Error::invalid("the CancelFlightInfoRequest has no FlightInfo"))?;
            let status = cancel_flight_info(engine, &info, caller)?;
            Ok(CancelFlightInfoResult::new(status).encode_to_vec())
        }
        other => Err(unknown(other)),
    }
}

/// Whether `action` is one of this module's (the rest are Flight SQL's).
pub(super) fn is_ours(action: &str) -> bool {
    [REFRESH, LIST_QUERIES, CANCEL_QUERY, CANCEL_FLIGHT_INFO].contains(&action)
}

/// Cancels the queries `info`'s tickets start: plain and Flight SQL tickets from our
/// `GetFlightInfo` name one, whether or not they were redeemed yet.
pub(super) fn cancel_flight_info(
    engine: &QueryEngine,
    info: &FlightInfo,
    caller: &Caller,
) -> Result<CancelStatus> {
    let mut status = CancelStatus::NotCancellable;
    for endpoint in &info.endpoint {
        let Some(ticket) = &endpoint.ticket else {
            continue;
        };
        if let Some(query_id) = ticket::decode(&ticket.ticket)
            .ok()
            .and_then(|c| c.query_id())
        {
            engine.active_queries().cancel_ticket(&query_id, caller)?;
            status = CancelStatus::Cancelled;
        }
    }
    Ok(status)
}

/// The error for an action nobody serves.
pub(super) fn unknown(action: &str) -> Error {
    Error::invalid(format!(
        "unknown action '{action}'; available actions: {}",
        list()
            .iter()
            .map(|a| a.r#type.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}
