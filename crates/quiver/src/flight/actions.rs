//! `DoAction` and `ListActions`.

use arrow_flight::ActionType;

use crate::error::{Error, Result};
use crate::query::QueryEngine;

/// Re-list every table now instead of waiting for the refresh interval.
pub(super) const REFRESH: &str = "refresh";

/// The actions this server understands.
pub(super) fn list() -> Vec<ActionType> {
    vec![ActionType {
        r#type: REFRESH.to_string(),
        description: "Re-list every table's files now and publish new files and partitions. \
                      Returns JSON {\"changed\": [tables], \"failed\": [[table, reason]], \"skipped_files\": n}."
            .to_string(),
    }]
}

/// Runs `action`; the result is one JSON body.
pub(super) async fn run(engine: &QueryEngine, action: &str) -> Result<Vec<u8>> {
    match action {
        REFRESH => {
            let summary = engine.refresh().await;
            let body = serde_json::json!({
                "changed": summary.changed,
                "failed": summary.failed,
                "skipped_files": engine.catalog().skipped_files(),
            });
            Ok(body.to_string().into_bytes())
        }
        other => Err(Error::invalid(format!(
            "unknown action '{other}'; available actions: {}",
            list()
                .iter()
                .map(|a| a.r#type.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
