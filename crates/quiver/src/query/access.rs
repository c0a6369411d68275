//! Which tables a caller may read (`tables = [...]` in the auth file).
//!
//! A table a caller may not read does not exist for them: planning sees a catalog
//! without it (so `information_schema`, `SHOW TABLES` and name resolution inside CTEs
//! and subqueries all agree), naming it gives the same `NOT_FOUND` as a missing table,
//! and listings leave it out. Answering `PERMISSION_DENIED` instead would tell a caller
//! which names exist. A check of every scan in the finished plan backs this up.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    SchemaProvider, TableProvider,
};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;

use crate::catalog::Catalog;
use crate::error::{Error, Result};

/// The tables one caller may read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TableAccess {
    /// Every table (no `tables` list, or authentication off).
    #[default]
    All,
    /// Tables whose names match one of these patterns (`*`, `?` and `[...]` as in
    /// shell globs).
    Only(Vec<glob::Pattern>),
}

impl TableAccess {
    /// Access from the auth file's `tables` list; `None` means every table.
    pub fn from_patterns(patterns: Option<&[String]>) -> Result<Self, String> {
        let Some(patterns) = patterns else {
            return Ok(Self::All);
        };
        patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p)
                    .map_err(|e| format!("table pattern '{p}' is not a valid glob: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::Only)
    }

    /// May the caller read `table`?
    pub fn allows(&self, table: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(patterns) => patterns.iter().any(|p| p.matches(table)),
        }
    }

    /// The names in `names` the caller may read, in order.
    pub fn visible(&self, mut names: Vec<String>) -> Vec<String> {
        names.retain(|n| self.allows(n));
        names
    }

    /// The caller's table access as a string, equal for equal access (a cache key).
    pub(crate) fn fingerprint(&self) -> String {
        match self {
            Self::All => "all".to_string(),
            Self::Only(patterns) => {
                format!(
                    "{:?}",
                    patterns.iter().map(|p| p.as_str()).collect::<Vec<_>>()
                )
            }
        }
    }

    /// Is every table readable?
    pub fn is_all(&self) -> bool {
        matches!(self, Self::All)
    }

    /// Gives `state` a catalog holding only the tables the caller may read.
    pub(crate) fn restrict(&self, state: &mut SessionState) -> Result<()> {
        if self.is_all() {
            return Ok(());
        }
        let access = Arc::new(self.clone());
        let visible = MemoryCatalogProviderList::new();
        let all = state.catalog_list();
        for catalog_name in all.catalog_names() {
            let Some(catalog) = all.catalog(&catalog_name) else {
                continue;
            };
            let filtered = MemoryCatalogProvider::new();
            for schema_name in catalog.schema_names() {
                if let Some(schema) = catalog.schema(&schema_name) {
                    let schema = Arc::new(Visible {
                        inner: schema,
                        access: Arc::clone(&access),
                    });
                    filtered.register_schema(&schema_name, schema)?;
                }
            }
            visible.register_catalog(catalog_name, Arc::new(filtered));
        }
        state.register_catalog_list(Arc::new(visible));
        Ok(())
    }

    /// Fails if `plan` scans a table the caller may not read (the restricted catalog
    /// should have made that impossible; this holds even if it did not).
    pub(crate) fn check_plan(&self, plan: &LogicalPlan, catalog: &Catalog) -> Result<()> {
        if self.is_all() {
            return Ok(());
        }
        // The system views are computed from the restricted catalog, so they are open.
        let denied = tables_read(plan).into_iter().find(|name| {
            !name.starts_with(&format!("{INFORMATION_SCHEMA}.")) && !self.allows(name)
        });
        match denied {
            Some(name) => Err(Error::TableNotFound {
                name,
                available: self.visible(catalog.table_names()),
            }),
            None => Ok(()),
        }
    }
}

/// The schema of the system views.
const INFORMATION_SCHEMA: &str = "information_schema";

/// The tables `plan` scans (through subqueries too), sorted, once each; system views as
/// `information_schema.NAME`.
pub(crate) fn tables_read(plan: &LogicalPlan) -> Vec<String> {
    let mut tables = vec![];
    // The closure never fails.
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let table = scan.table_name.table();
            tables.push(match scan.table_name.schema() {
                Some(INFORMATION_SCHEMA) => format!("{INFORMATION_SCHEMA}.{table}"),
                _ => table.to_string(),
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    tables.sort();
    tables.dedup();
    tables
}

/// A schema showing only the tables a caller may read.
#[derive(Debug)]
struct Visible {
    inner: Arc<dyn SchemaProvider>,
    access: Arc<TableAccess>,
}

#[async_trait]
impl SchemaProvider for Visible {
    fn table_names(&self) -> Vec<String> {
        self.access.visible(self.inner.table_names())
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if !self.access.allows(name) {
            return Ok(None);
        }
        self.inner.table(name).await
    }

    fn table_exist(&self, name: &str) -> bool {
        self.access.allows(name) && self.inner.table_exist(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(patterns: &[&str]) -> TableAccess {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        TableAccess::from_patterns(Some(&patterns)).unwrap()
    }

    #[test]
    fn patterns_match_whole_names() {
        let access = only(&["events", "logs_*"]);
        assert!(access.allows("events"));
        assert!(access.allows("logs_api"));
        assert!(access.allows("logs_"));
        assert!(!access.allows("events2"));
        assert!(!access.allows("my_events"));
        assert!(!access.allows("logs"));
        assert!(TableAccess::All.allows("anything"));
        assert!(!only(&[]).allows("events"), "an empty list allows nothing");
    }

    #[test]
    fn bad_patterns_are_refused_with_the_pattern() {
        let err = TableAccess::from_patterns(Some(&["logs_[".to_string()])).unwrap_err();
        assert!(err.contains("logs_["), "{err}");
    }
}
