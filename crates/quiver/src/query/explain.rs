//! `EXPLAIN` output names files relative to their table: `requests/day=2026-01-01/...`,
//! not the server's absolute paths, which tell a client how the host is laid out and
//! change from one deployment to the next.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::Result as DfResult;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

/// Rewrites of absolute path prefixes to table names, longest root first (a table
/// inside another's directory keeps its own name).
#[derive(Debug, Clone)]
pub(crate) struct RelativePaths {
    rewrites: Vec<(String, String)>,
}

impl RelativePaths {
    /// From each table's name and root (a directory, or a single file).
    pub(crate) fn new(roots: Vec<(String, PathBuf)>) -> Self {
        let mut rewrites = vec![];
        for (name, root) in roots {
            let root = root.to_string_lossy().trim_end_matches('/').to_string();
            if root.is_empty() {
                continue;
            }
            // Object store paths have no leading slash; messages and some displays do.
            let bare = root.trim_start_matches('/').to_string();
            for prefix in [root.clone(), bare] {
                rewrites.push((prefix, name.clone()));
            }
        }
        rewrites.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        rewrites.dedup();
        Self { rewrites }
    }

    /// `text` with every table root replaced by its table's name.
    pub(crate) fn apply(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while !rest.is_empty() {
            for (prefix, name) in &self.rewrites {
                if let Some(after) = rest.strip_prefix(prefix.as_str()) {
                    // Only whole path components: `/data/req` is not a root of
                    // `/data/requests`.
                    let continues_name =
                        |c: char| c.is_alphanumeric() || matches!(c, '_' | '-' | '.');
                    if !after.starts_with(continues_name) {
                        out.push_str(name);
                        rest = after;
                        continue 'scan;
                    }
                }
            }
            let mut chars = rest.chars();
            out.extend(chars.next());
            rest = chars.as_str();
        }
        out
    }

    /// `stream` with its string columns rewritten.
    pub(crate) fn wrap(self, stream: SendableRecordBatchStream) -> SendableRecordBatchStream {
        let schema = stream.schema();
        let mapped = stream.map(move |batch| batch.and_then(|b| self.batch(b)));
        Box::pin(RecordBatchStreamAdapter::new(schema, mapped))
    }

    fn batch(&self, batch: RecordBatch) -> DfResult<RecordBatch> {
        let columns = batch
            .columns()
            .iter()
            .map(|column| -> ArrayRef {
                match (
                    column.data_type(),
                    column.as_any().downcast_ref::<StringArray>(),
                ) {
                    (DataType::Utf8, Some(strings)) => Arc::new(
                        strings
                            .iter()
                            .map(|s| s.map(|s| self.apply(s)))
                            .collect::<StringArray>(),
                    ),
                    _ => Arc::clone(column),
                }
            })
            .collect();
        Ok(RecordBatch::try_new(batch.schema(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_become_table_names_in_either_form() {
        let paths = RelativePaths::new(vec![
            ("requests".into(), PathBuf::from("/srv/data/requests")),
            ("services".into(), PathBuf::from("/srv/data/services/")),
            ("one".into(), PathBuf::from("/srv/one.parquet")),
        ]);
        assert_eq!(
            paths.apply("file_groups={2 groups: [[srv/data/requests/day=1/a.parquet], [srv/data/services/s.parquet]]}"),
            "file_groups={2 groups: [[requests/day=1/a.parquet], [services/s.parquet]]}"
        );
        assert_eq!(paths.apply("/srv/data/requests/x"), "requests/x");
        assert_eq!(paths.apply("[srv/one.parquet]"), "[one]");
        // Not a component boundary: left alone.
        assert_eq!(paths.apply("srv/data/requestsX/y"), "srv/data/requestsX/y");
        assert_eq!(
            paths.apply("srv/data/requests_v2/y"),
            "srv/data/requests_v2/y"
        );
        assert_eq!(paths.apply("no paths here"), "no paths here");
    }
}
