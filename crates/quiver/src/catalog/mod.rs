//! The catalog: which tables exist, which files each one reads, and their schemas.
//!
//! A table is a directory (or a single file) of Parquet files. Loading or refreshing a
//! table lists its files, validates every new file by reading its footer, types the Hive
//! partition columns, merges the file schemas and publishes an immutable [`HiveTable`].
//! Queries see either the old snapshot or the new one, never a mix, and never a file that
//! has not been validated. The catalog is DataFusion's `public` schema.
//!
//! A table on S3 is listed with `ObjectStore::list` and its footers are read through
//! the object cache (see `io::remote`); a store that cannot be reached when the server
//! starts leaves the table *unavailable* (its queries fail with UNAVAILABLE naming the
//! store) until a refresh reaches it.

mod config;
mod discover;
mod memory_scan;
mod pinned;
mod pruning;
pub mod row_group_cache;
mod table;

pub use config::{
    CatalogFile, Catalogued, DEFAULT_EXTENSION, TableDefinition, TableLocation, parse_table_flag,
    tables_in_data_dir,
};
pub use discover::{HIVE_NULL_PARTITION, PartitionType};
pub(crate) use memory_scan::memory_source;
pub use pruning::PartitionPruning;
pub(crate) use pruning::PinnedScans;
pub use row_group_cache::{RowGroupAdmission, RowGroupCache, RowGroupCacheStats, RowGroupCaching};
pub use table::HiveTable;

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::Statistics;
use datafusion::common::stats::Precision;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::execution::SessionState;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion_datasource_parquet::metadata::DFParquetMetadata;
use futures::{FutureExt, StreamExt};
use object_store::ObjectMeta;
use parquet::file::metadata::ParquetMetaData;

use crate::error::{Error, Result};
use crate::io::Io;
use crate::io::reader::object_meta_in_bucket;
use crate::io::remote::{Bucket, VersionedObject};
use discover::FoundFile;
use table::TableFile;

/// Footers read at once while validating new files.
const VALIDATE_CONCURRENCY: usize = 16;

/// The registered tables, served as DataFusion's `public` schema.
#[derive(Debug)]
pub struct Catalog {
    definitions: Vec<TableDefinition>,
    /// Used for footer reads and schema inference: the same runtime (and so the same
    /// Parquet metadata cache) as queries, so validating a file warms the cache.
    session: SessionState,
    tables: RwLock<BTreeMap<String, Arc<HiveTable>>>,
    /// Tables on a store that has not answered yet, with the error to give their queries.
    unavailable: RwLock<BTreeMap<String, crate::Error>>,
    /// Per table: the files seen at the last refresh, validated or not, to skip work
    /// (and repeated warnings) when nothing changed.
    seen: Mutex<HashMap<String, TableFiles>>,
    skipped_files: AtomicU64,
    /// When the last load or refresh finished.
    refreshed_at: Mutex<SystemTime>,
}

/// What the catalog remembers of one table's files between refreshes.
#[derive(Debug, Default, Clone)]
struct TableFiles {
    /// Listing signature: name, size, mtime and ETag of every file found.
    signature: Vec<(String, u64, SystemTime, Option<String>)>,
    /// Validated files by name.
    valid: HashMap<String, Arc<ValidFile>>,
    /// Files rejected (corrupt or incompatible), with the size and mtime they were rejected at.
    rejected: HashSet<(String, u64, SystemTime)>,
}

/// A file whose footer decoded.
#[derive(Debug)]
struct ValidFile {
    found: FoundFile,
    meta: ObjectMeta,
    schema: SchemaRef,
    metadata: Arc<ParquetMetaData>,
    /// Per leaf column, the distinct values its dictionaries show (local files only:
    /// `discover::dictionary_distinct_counts`).
    distinct: Vec<Option<usize>>,
}

/// Outcome of refreshing every table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefreshSummary {
    /// Tables whose file set changed and were republished.
    pub changed: Vec<String>,
    /// Tables that could not be refreshed (they keep serving their previous files).
    pub failed: Vec<(String, String)>,
}

impl Catalog {
    /// Loads every table. Fails if a table cannot be read as one schema, or if its path
    /// is missing: a server that silently serves fewer tables than asked is worse than
    /// one that does not start.
    pub async fn load(definitions: Vec<TableDefinition>, session: SessionState) -> Result<Self> {
        let mut names = HashSet::new();
        for def in &definitions {
            if !names.insert(def.name.clone()) {
                return Err(Error::Config {
                    message: format!("table '{}' is defined twice", def.name),
                });
            }
        }
        let catalog = Self {
            definitions,
            session,
            tables: RwLock::default(),
            unavailable: RwLock::default(),
            seen: Mutex::default(),
            skipped_files: AtomicU64::new(0),
            refreshed_at: Mutex::new(SystemTime::now()),
        };
        for def in &catalog.definitions {
            match catalog.refresh_table(def, true).await {
                Ok(_) => {}
                // A store that does not answer must not keep the other tables from
                // being served: this one waits for a refresh that reaches it.
                Err(e @ Error::ObjectStore { .. }) => {
                    tracing::warn!(table = %def.name, error = %e, "table unavailable until its store answers");
                    catalog.unavailable.write().insert(def.name.clone(), e);
                }
                Err(e) => return Err(e),
            }
        }
        *catalog.refreshed_at.lock() = SystemTime::now();
        Ok(catalog)
    }

    /// Re-lists every table and republishes those whose files changed. Problems with new
    /// files are logged and the files skipped; a table that cannot be listed keeps its
    /// previous snapshot.
    pub async fn refresh(&self) -> RefreshSummary {
        let mut summary = RefreshSummary::default();
        for def in &self.definitions {
            match self.refresh_table(def, false).await {
                Ok(true) => summary.changed.push(def.name.clone()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(table = %def.name, error = %e, "refresh failed; serving the previous files");
                    summary.failed.push((def.name.clone(), e.to_string()));
                }
            }
        }
        *self.refreshed_at.lock() = SystemTime::now();
        summary
    }

    /// When the last load or refresh of every table finished.
    pub fn refreshed_at(&self) -> SystemTime {
        *self.refreshed_at.lock()
    }

    /// Registered table names, sorted: the tables served and those waiting for their store.
    pub fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tables.read().keys().cloned().collect();
        names.extend(self.unavailable.read().keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Each table's name and root (its directory or one file; `bucket/prefix` on S3).
    pub fn roots(&self) -> Vec<(String, PathBuf)> {
        self.definitions
            .iter()
            .map(|d| (d.name.clone(), PathBuf::from(d.location.root())))
            .collect()
    }

    /// The buckets the tables read.
    pub fn buckets(&self) -> Vec<String> {
        let mut buckets: Vec<String> = self
            .definitions
            .iter()
            .filter_map(|d| match &d.location {
                TableLocation::S3 { bucket, .. } => Some(bucket.clone()),
                TableLocation::Local(_) => None,
            })
            .collect();
        buckets.sort();
        buckets.dedup();
        buckets
    }

    /// Whether `name` is a table: served, or waiting for its store (its queries then fail
    /// saying why, see the `SchemaProvider` impl).
    pub fn knows(&self, name: &str) -> bool {
        self.tables.read().contains_key(name) || self.unavailable.read().contains_key(name)
    }

    /// The current snapshot of a table.
    pub fn get(&self, name: &str) -> Option<Arc<HiveTable>> {
        self.tables.read().get(name).cloned()
    }

    /// How this node listed each of `wanted` (by object location): size, modification
    /// time and ETag as of its last refresh. A file this node has not listed is absent.
    /// Lets a cluster worker check that it reads the files a coordinator planned on.
    pub fn listed(
        &self,
        wanted: &HashSet<&object_store::path::Path>,
    ) -> HashMap<object_store::path::Path, ObjectMeta> {
        let seen = self.seen.lock();
        seen.values()
            .flat_map(|table| table.valid.values())
            .filter(|v| wanted.contains(&v.meta.location))
            .map(|v| (v.meta.location.clone(), v.meta.clone()))
            .collect()
    }

    /// Files skipped since start-up because they were corrupt or did not fit the table.
    pub fn skipped_files(&self) -> u64 {
        self.skipped_files.load(Ordering::Relaxed)
    }

    /// Lists, validates and publishes one table. Returns whether the snapshot changed.
    /// `strict` (at start-up) turns problems that refresh would skip into errors.
    async fn refresh_table(&self, def: &TableDefinition, strict: bool) -> Result<bool> {
        let extension = def.extension.clone();
        let (found, bucket) = match &def.location {
            TableLocation::Local(root) => {
                let root = root.clone();
                let found =
                    tokio::task::spawn_blocking(move || discover::list_files(&root, &extension))
                        .await
                        .map_err(|e| Error::Internal(format!("listing task failed: {e}")))??;
                (found, None)
            }
            TableLocation::S3 { bucket, prefix } => {
                let store = self.bucket(bucket)?;
                let listed = store.list(prefix).await?;
                let found = discover::remote_files(bucket, prefix, listed, &extension);
                (found, Some(store))
            }
        };
        let signature: Vec<_> = found
            .iter()
            .map(|f| (f.name.clone(), f.size, f.modified, f.e_tag.clone()))
            .collect();

        let previous = self.seen.lock().get(&def.name).cloned().unwrap_or_default();
        if previous.signature == signature && self.get(&def.name).is_some() {
            return Ok(false);
        }

        let mut next = TableFiles {
            signature,
            ..TableFiles::default()
        };
        let local = self
            .session
            .runtime_env()
            .object_store(ObjectStoreUrl::local_filesystem())?;
        let format =
            ParquetFormat::default().with_options(self.session.table_options().parquet.clone());

        // Validate what is new or changed; reuse the rest.
        let validated: Vec<(FoundFile, Result<Arc<ValidFile>>)> = futures::stream::iter(found)
            .map(|file| {
                let previous = previous.valid.get(&file.name).cloned();
                // A remote file is read as the version listed, through the object cache.
                let store: Arc<dyn object_store::ObjectStore> = match &bucket {
                    Some(bucket) => Arc::new(VersionedObject::new(
                        Arc::clone(bucket),
                        object_meta_in_bucket(&file.object_meta()),
                    )),
                    None => Arc::clone(&local),
                };
                let format = &format;
                let local = bucket.is_none();
                async move {
                    if let Some(prev) = previous
                        && prev.found.size == file.size
                        && prev.found.modified == file.modified
                        && prev.found.e_tag == file.e_tag
                    {
                        return (file, Ok(prev));
                    }
                    // The Parquet footer decoder can panic on crafted input: a bad file
                    // must cost a warning, never the server.
                    let result = AssertUnwindSafe(self.validate(&store, format, &file, local))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            Err(Error::invalid(
                                "the Parquet footer is malformed (the decoder panicked)",
                            ))
                        });
                    (file, result)
                }
            })
            .buffered(VALIDATE_CONCURRENCY)
            .collect()
            .await;

        let mut valid = Vec::new();
        for (file, result) in validated {
            match result {
                Ok(v) => valid.push(v),
                // The store failing is not the file's fault: fail the refresh (the table
                // keeps its previous files) instead of dropping every file it could not read.
                Err(e) if e.object_store_outage().is_some() => {
                    return Err(e.object_store_outage().unwrap_or(e));
                }
                Err(e) => self.reject(&def.name, &previous, &mut next, &file, &e.to_string()),
            }
        }

        let (table, rejected) = self.build_table(def, &valid, strict, bucket)?;
        // A pinned table is read into memory before it is published: queries keep the
        // previous snapshot (and its memory) until the new one is loaded.
        let table = if def.pinned {
            table.pin(&self.session).await?
        } else {
            table
        };
        for (file, reason) in rejected {
            self.reject(&def.name, &previous, &mut next, &file, &reason);
        }
        let rejected_names: HashSet<_> = next.rejected.iter().map(|(p, ..)| p.clone()).collect();
        next.valid = valid
            .into_iter()
            .filter(|v| !rejected_names.contains(&v.found.name))
            .map(|v| (v.found.name.clone(), v))
            .collect();

        tracing::info!(
            table = %def.name,
            files = table.num_files(),
            rows = table.num_rows(),
            columns = table.schema().fields().len(),
            pinned_bytes = table.pinned_bytes(),
            "table published"
        );
        self.tables
            .write()
            .insert(def.name.clone(), Arc::new(table));
        self.unavailable.write().remove(&def.name);
        self.seen.lock().insert(def.name.clone(), next);
        Ok(true)
    }

    /// The store of an S3 table's bucket.
    fn bucket(&self, bucket: &str) -> Result<Arc<Bucket>> {
        let io = self
            .session
            .config()
            .get_extension::<Io>()
            .ok_or_else(|| Error::Internal("the session has no I/O settings".into()))?;
        let remote = io.remote().ok_or_else(|| Error::Config {
            message: format!("s3://{bucket}: object stores are not configured in this engine"),
        })?;
        Ok(remote.bucket(bucket)?)
    }

    /// Reads one file's footer and schema; an error means the file is not usable Parquet.
    async fn validate(
        &self,
        store: &Arc<dyn object_store::ObjectStore>,
        format: &ParquetFormat,
        file: &FoundFile,
        local: bool,
    ) -> Result<Arc<ValidFile>> {
        let meta = file.object_meta();
        let cache = self
            .session
            .runtime_env()
            .cache_manager
            .get_file_metadata_cache();
        let metadata = DFParquetMetadata::new(store.as_ref(), &meta)
            .with_file_metadata_cache(Some(Arc::clone(&cache)))
            .fetch_metadata()
            .await?;
        let schema = format
            .infer_schema(
                &self.session as &dyn Session,
                store,
                std::slice::from_ref(&meta),
            )
            .await?;
        // A few small reads per column (its dictionary pages), once per file version; not
        // on S3, where each would be a request.
        let distinct = match local {
            true => {
                let (path, footer) = (PathBuf::from(&file.name), Arc::clone(&metadata));
                tokio::task::spawn_blocking(move || {
                    discover::dictionary_distinct_counts(&path, &footer)
                })
                .await
                .map_err(|e| Error::Internal(format!("dictionary task failed: {e}")))?
            }
            false => vec![],
        };
        Ok(Arc::new(ValidFile {
            found: file.clone(),
            meta,
            schema,
            metadata,
            distinct,
        }))
    }

    /// Records a rejected file, warning once per version of the file.
    fn reject(
        &self,
        table: &str,
        previous: &TableFiles,
        next: &mut TableFiles,
        file: &FoundFile,
        reason: &str,
    ) {
        let key = (file.name.clone(), file.size, file.modified);
        if !previous.rejected.contains(&key) {
            self.skipped_files.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(table, file = %file.name, reason, "skipping file");
        }
        next.rejected.insert(key);
    }

    /// Types the partition columns, merges file schemas and assembles the table. Returns
    /// the files left out (only when not `strict`) with the reason.
    fn build_table(
        &self,
        def: &TableDefinition,
        valid: &[Arc<ValidFile>],
        strict: bool,
        bucket: Option<Arc<Bucket>>,
    ) -> Result<(HiveTable, Vec<(FoundFile, String)>)> {
        let mut rejected = Vec::new();
        let fail = |message: String| Error::Schema {
            table: def.name.clone(),
            message,
        };

        // Partition keys: the layout of the first file is the layout of the table.
        let keys: Vec<String> = valid
            .first()
            .map(|v| v.found.partitions.iter().map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        let mut files: Vec<&Arc<ValidFile>> = Vec::new();
        for v in valid {
            let these: Vec<&String> = v.found.partitions.iter().map(|(k, _)| k).collect();
            if these.iter().copied().ne(keys.iter()) {
                let message = format!(
                    "partition directories differ: {} has keys [{}] but {} has [{}]",
                    valid[0].found.name,
                    keys.join(", "),
                    v.found.name,
                    these
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if strict {
                    return Err(fail(message));
                }
                rejected.push((v.found.clone(), message));
            } else {
                files.push(v);
            }
        }

        let types: Vec<PartitionType> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                def.partition_types.get(key).copied().unwrap_or_else(|| {
                    PartitionType::infer(
                        files
                            .iter()
                            .filter_map(|f| f.found.partitions[i].1.as_deref()),
                    )
                })
            })
            .collect();
        for key in def.partition_types.keys() {
            if !keys.contains(key) {
                tracing::warn!(table = %def.name, column = %key, "a partition type is configured for a key that no directory uses");
            }
        }

        // Merge schemas in path order, remembering where each column was first seen so a
        // conflict names both files.
        let mut merged = Schema::empty();
        let mut first_seen: HashMap<String, (String, Field)> = HashMap::new();
        let mut kept: Vec<&Arc<ValidFile>> = Vec::new();
        'files: for v in files {
            for field in v.schema.fields() {
                if keys.contains(field.name()) {
                    let message = format!(
                        "column '{}' of {} is also a partition key in its path; rename one of them",
                        field.name(),
                        v.found.name
                    );
                    if strict {
                        return Err(fail(message));
                    }
                    rejected.push((v.found.clone(), message));
                    continue 'files;
                }
            }
            match Schema::try_merge([merged.clone(), Schema::clone(&v.schema)]) {
                Ok(m) => merged = m,
                Err(e) => {
                    let conflict = v.schema.fields().iter().find_map(|f| {
                        first_seen
                            .get(f.name())
                            .filter(|(_, seen)| seen.data_type() != f.data_type())
                            .map(|(path, seen)| {
                                format!(
                                    "column '{}' is {} in {} but {} in {}",
                                    f.name(),
                                    seen.data_type(),
                                    path,
                                    f.data_type(),
                                    v.found.name
                                )
                            })
                    });
                    let message = conflict.unwrap_or_else(|| {
                        format!("{} does not fit the table's schema: {e}", v.found.name)
                    });
                    if strict {
                        return Err(fail(format!("incompatible schemas: {message}")));
                    }
                    rejected.push((v.found.clone(), message));
                    continue 'files;
                }
            }
            for f in v.schema.fields() {
                first_seen
                    .entry(f.name().clone())
                    .or_insert_with(|| (v.found.name.clone(), Field::clone(f)));
            }
            kept.push(v);
        }
        let file_schema = Arc::new(merged);
        let partition_fields: Vec<FieldRef> = keys
            .iter()
            .zip(&types)
            .map(|(k, t)| Arc::new(Field::new(k, t.data_type(), true)))
            .collect();

        let mut table_files = Vec::with_capacity(kept.len());
        for v in kept {
            let mut partition_values = Vec::with_capacity(types.len());
            let mut bad = None;
            for ((key, value), ty) in v.found.partitions.iter().zip(&types) {
                match ty.parse(value.as_deref()) {
                    Ok(s) => partition_values.push(s),
                    Err(e) => {
                        bad = Some(format!(
                            "partition '{key}' of {}: {e} (configured type {ty:?})",
                            v.found.name
                        ));
                        break;
                    }
                }
            }
            if let Some(message) = bad {
                if strict {
                    return Err(fail(message));
                }
                rejected.push((v.found.clone(), message));
                continue;
            }
            let mut statistics =
                DFParquetMetadata::statistics_from_parquet_metadata(&v.metadata, &file_schema)?;
            with_distinct_counts(&mut statistics, &file_schema, v);
            let byte_size = v
                .metadata
                .row_groups()
                .iter()
                .map(|rg| rg.total_byte_size().max(0) as u64)
                .sum();
            table_files.push(TableFile {
                meta: v.meta.clone(),
                partition_values,
                statistics: Arc::new(statistics),
                num_rows: v.metadata.file_metadata().num_rows().max(0) as u64,
                byte_size,
            });
        }
        Ok((
            HiveTable::new(
                def.name.clone(),
                file_schema,
                partition_fields,
                table_files,
                bucket,
            ),
            rejected,
        ))
    }
}

/// Sets the distinct count of each top-level column of `schema` whose leaf column in `file`
/// has one: DataFusion then estimates `column = literal` to pass 1 / distinct values, which
/// `query::pushdown` uses to evaluate a selective string equality inside the decoder.
fn with_distinct_counts(statistics: &mut Statistics, schema: &Schema, file: &ValidFile) {
    let leaves = file.metadata.file_metadata().schema_descr();
    for (field, column) in schema
        .fields()
        .iter()
        .zip(&mut statistics.column_statistics)
    {
        let leaf = (0..leaves.num_columns()).find(|&i| {
            let column = leaves.column(i);
            let path = column.path().parts();
            path.len() == 1 && path[0] == *field.name()
        });
        if let Some(Some(distinct)) = leaf.and_then(|i| file.distinct.get(i)) {
            column.distinct_count = Precision::Inexact(*distinct);
        }
    }
}

#[async_trait]
impl SchemaProvider for Catalog {
    fn table_names(&self) -> Vec<String> {
        Catalog::table_names(self)
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        if let Some(table) = self.get(name) {
            return Ok(Some(table as Arc<dyn TableProvider>));
        }
        // Known but not reachable yet: say why, rather than that it does not exist.
        if let Some(Error::ObjectStore { store, message }) = self.unavailable.read().get(name) {
            return Err(Error::ObjectStore {
                store: store.clone(),
                message: format!("table '{name}' is not available yet: {message}"),
            }
            .into());
        }
        Ok(None)
    }

    fn table_exist(&self, name: &str) -> bool {
        self.knows(name)
    }
}

#[cfg(test)]
mod tests;
