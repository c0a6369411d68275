//! [`HiveTable`]: one immutable snapshot of a table's validated files as a DataFusion table.
//!
//! Why not DataFusion's `ListingTable`: it lists the directory itself when it plans
//! (through a listing cache that never expires), so it would read files we have not
//! validated (a corrupt file would break every query until the next refresh), it cannot
//! type a `__HIVE_DEFAULT_PARTITION__` directory as NULL, and a refresh that widens the
//! schema would race with plans in flight. A snapshot that is swapped whole on refresh
//! has none of these problems; everything below the file list (row-group, page-index and
//! bloom-filter pruning, late materialisation) is DataFusion's Parquet scan, unchanged.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{FieldRef, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::{ColumnStatistics, DFSchema, Statistics};
use datafusion::datasource::TableType;
use datafusion::error::Result as DfResult;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_optimizer::pruning::{PruningPredicate, PruningPredicateBuilder};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::scalar::ScalarValue;
use datafusion_datasource::file_groups::FileGroup;
use datafusion_datasource::file_scan_config::FileScanConfigBuilder;
use datafusion_datasource::source::DataSourceExec;
use datafusion_datasource::{PartitionedFile, TableSchema, compute_all_files_statistics};
use datafusion_datasource_parquet::source::ParquetSource;
use datafusion_datasource_parquet::{
    ParquetAccessPlan, ParquetFileMetrics, ParquetFileReaderFactory, RowGroupAccessPlanFilter,
};
use object_store::ObjectMeta;

use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::session_state::SessionState;
use datafusion::physical_plan::collect_partitioned;

use super::PartitionPruning;
use super::memory_scan::{Bounds, ColumnBounds, memory_scan, memory_scan_passing, widen};
use super::pinned::{PinnedBatches, Selector};
use super::pruning::CachedFile;
use super::row_group_cache::{
    LOADS_PER_SCAN, Lookup, RowGroupAdmission, RowGroupCache, RowGroupCaching, RowGroupKey,
};
use crate::io::remote::Bucket;
use crate::io::{FileReaderFactory, Io, IoMode, IoOptions};
use crate::wire::frames::split;
use crate::wire::pinned::{PinnedMessages, Registration, lay_out};
use crate::wire::views::ViewTypes;

/// A scan split between the row group cache and the files (`HiveTable::take_cached`).
#[derive(Debug, Default)]
struct CacheSplit {
    /// The files to read, each skipping the row groups the cache serves.
    files: Vec<PartitionedFile>,
    /// The cached rows that may pass the scan's filters.
    cached: Vec<RecordBatch>,
    /// Their columns' bounds.
    bounds: Option<Vec<ColumnBounds>>,
    /// The filters' conjuncts every cached row passes (cut to exactly).
    passing: Vec<Expr>,
}

/// One validated data file of a table.
#[derive(Debug, Clone)]
pub(crate) struct TableFile {
    /// Location and size as listed.
    pub meta: ObjectMeta,
    /// Partition values, one per partition column, typed; NULL for the Hive default partition.
    pub partition_values: Vec<ScalarValue>,
    /// File-level statistics over the table's file schema (row count, min/max per column).
    pub statistics: Arc<Statistics>,
    /// Rows, from the Parquet footer.
    pub num_rows: u64,
    /// Uncompressed data size, from the Parquet footer.
    pub byte_size: u64,
}

/// A table over a fixed set of Parquet files with typed Hive partition columns.
#[derive(Debug)]
pub struct HiveTable {
    name: String,
    file_schema: SchemaRef,
    partition_fields: Vec<FieldRef>,
    schema: SchemaRef,
    files: Vec<TableFile>,
    /// Distinct partition value tuples, counted once per (immutable) snapshot.
    num_partitions: usize,
    /// The rows, in memory, when the table is pinned.
    pinned: Option<Arc<Pinned>>,
    /// The bucket, for a table on S3; `None` for local files.
    bucket: Option<Arc<Bucket>>,
    /// Unique to this snapshot in this process: a refresh that publishes the table makes a
    /// new snapshot with a new version (the result cache keys answers by it).
    version: u64,
}

/// The version of the next snapshot made.
static NEXT_VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A pinned table's rows, with views as they are sent (`--view-types`), and the memory pool
/// reservation that accounts for them.
#[derive(Debug)]
pub(crate) struct Pinned {
    schema: SchemaRef,
    batches: PinnedBatches,
    bytes: usize,
    _reservation: MemoryReservation,
    /// Keeps the batches' messages findable by the send path while they are served.
    _messages: Option<Registration>,
}

impl HiveTable {
    pub(crate) fn new(
        name: String,
        file_schema: SchemaRef,
        partition_fields: Vec<FieldRef>,
        files: Vec<TableFile>,
        bucket: Option<Arc<Bucket>>,
    ) -> Self {
        let fields = file_schema
            .fields()
            .iter()
            .chain(partition_fields.iter())
            .cloned()
            .collect::<Vec<_>>();
        let schema = Arc::new(Schema::new(fields));
        let num_partitions = if partition_fields.is_empty() {
            0
        } else {
            files
                .iter()
                .map(|f| f.partition_values.as_slice())
                .collect::<std::collections::HashSet<&[ScalarValue]>>()
                .len()
        };
        Self {
            name,
            num_partitions,
            file_schema,
            partition_fields,
            schema,
            files,
            pinned: None,
            bucket,
            version: NEXT_VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Reads every row into memory, reserving its size from the query memory pool, and
    /// returns the table serving from there.
    pub(crate) async fn pin(mut self, session: &SessionState) -> crate::Result<Self> {
        let plan = self.scan(session, None, &[], None).await?;
        let partitions = collect_partitioned(plan, session.task_ctx()).await?;
        let view_types = session
            .config()
            .get_extension::<ViewTypes>()
            .map_or_else(ViewTypes::default, |v| *v);
        let schema = view_types.schema(&self.schema);
        // Each batch in one allocation with the message that sends it, when the engine
        // lets the send path use it (see `wire::pinned`).
        let messages = session.config().get_extension::<PinnedMessages>();
        let mut laid_out = Vec::new();
        let mut bytes = 0;
        let mut pinned_partitions = Vec::with_capacity(partitions.len());
        for batches in partitions {
            let mut partition = Vec::with_capacity(batches.len());
            for batch in batches.into_iter().filter(|b| b.num_rows() > 0) {
                let Some(messages) = &messages else {
                    let batch = view_types.batch(batch, &schema)?;
                    bytes += batch.get_array_memory_size();
                    partition.push(batch);
                    continue;
                };
                // In pieces the send path sends whole, each laid out with its message
                // (views compacted per piece: a message carries every buffer it references).
                for piece in split(&batch, messages.max_message_size())? {
                    let piece = view_types.batch(piece, &schema)?;
                    match lay_out(&piece)? {
                        Some(l) => {
                            bytes += l.allocated;
                            laid_out.push((l.batch.clone(), l.frame));
                            partition.push(l.batch);
                        }
                        None => {
                            bytes += piece.get_array_memory_size();
                            partition.push(piece);
                        }
                    }
                }
            }
            pinned_partitions.push(partition);
        }
        let batches = PinnedBatches::new(Arc::clone(&schema), pinned_partitions);
        bytes += batches.statistics_bytes();
        let reservation = MemoryConsumer::new(format!("pinned table {}", self.name))
            .register(&session.runtime_env().memory_pool);
        reservation
            .try_grow(bytes)
            .map_err(|e| crate::Error::Config {
                message: format!(
                    "pinning table '{}' needs {bytes} bytes of the query memory pool, which \
                 cannot grant them (raise --memory-limit, or unpin it): {e}",
                    self.name
                ),
            })?;
        self.pinned = Some(Arc::new(Pinned {
            schema,
            batches,
            bytes,
            _reservation: reservation,
            _messages: messages.map(|m| m.register(laid_out)),
        }));
        Ok(self)
    }

    /// This snapshot's version: unique in the process, new at every publish.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Bytes held in memory for a pinned table; 0 otherwise.
    pub fn pinned_bytes(&self) -> usize {
        self.pinned.as_ref().map_or(0, |p| p.bytes)
    }

    /// Total rows over all files, from Parquet footers.
    pub fn num_rows(&self) -> u64 {
        self.files.iter().map(|f| f.num_rows).sum()
    }

    /// Total uncompressed bytes over all files, from Parquet footers.
    pub fn byte_size(&self) -> u64 {
        self.files.iter().map(|f| f.byte_size).sum()
    }

    /// Number of data files.
    pub fn num_files(&self) -> usize {
        self.files.len()
    }

    /// Bytes of the data files on disk.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.meta.size).sum()
    }

    /// Distinct partitions (combinations of partition values) holding files; 0 when the
    /// table is not partitioned.
    pub fn num_partitions(&self) -> usize {
        self.num_partitions
    }

    /// A filter is decided by partition values alone when it names only partition
    /// columns and gives the same answer every time it is evaluated.
    fn is_partition_filter(&self, expr: &Expr) -> bool {
        let refs = expr.column_refs();
        !refs.is_empty()
            && refs
                .iter()
                .all(|c| self.partition_fields.iter().any(|f| f.name() == &c.name))
            && !expr.is_volatile()
    }

    /// Files whose partition values can satisfy every partition filter. The filters are
    /// evaluated once, vectorised, over a batch holding one row of partition values per file.
    fn prune(&self, state: &dyn Session, filters: &[Expr]) -> DfResult<Vec<(usize, &TableFile)>> {
        let partition_filters: Vec<Expr> = filters
            .iter()
            .filter(|f| self.is_partition_filter(f))
            .cloned()
            .collect();
        let Some(predicate) = conjunction(partition_filters) else {
            return Ok(self.files.iter().enumerate().collect());
        };
        if self.files.is_empty() {
            return Ok(vec![]);
        }
        let columns = (0..self.partition_fields.len())
            .map(|i| {
                ScalarValue::iter_to_array(self.files.iter().map(|f| f.partition_values[i].clone()))
            })
            .collect::<DfResult<Vec<ArrayRef>>>()?;
        let schema = Arc::new(Schema::new(self.partition_fields.clone()));
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
        let df_schema = DFSchema::try_from(schema)?;
        let physical = state.create_physical_expr(predicate, &df_schema)?;
        let mask = physical.evaluate(&batch)?.into_array(batch.num_rows())?;
        let mask = mask.as_boolean_opt().ok_or_else(|| {
            datafusion::error::DataFusionError::Plan(
                "a partition filter did not evaluate to a boolean".into(),
            )
        })?;
        Ok(self
            .files
            .iter()
            .enumerate()
            // NULL means the filter does not hold: SQL semantics.
            .filter(|(i, _)| mask.is_valid(*i) && mask.value(*i))
            .collect())
    }

    /// A [`PartitionedFile`] with statistics covering both file and partition columns.
    fn partitioned_file(&self, file: &TableFile) -> PartitionedFile {
        let mut stats = Statistics::clone(&file.statistics);
        for value in &file.partition_values {
            stats.column_statistics.push(if value.is_null() {
                ColumnStatistics {
                    null_count: stats.num_rows,
                    ..ColumnStatistics::new_unknown()
                }
            } else {
                ColumnStatistics {
                    null_count: Precision::Exact(0),
                    max_value: Precision::Exact(value.clone()),
                    min_value: Precision::Exact(value.clone()),
                    distinct_count: Precision::Exact(1),
                    ..ColumnStatistics::new_unknown()
                }
            });
        }
        let mut pf = PartitionedFile::from(file.meta.clone());
        pf.partition_values = file.partition_values.clone();
        pf.statistics = Some(Arc::new(stats));
        pf
    }
}

#[async_trait]
impl TableProvider for HiveTable {
    fn schema(&self) -> SchemaRef {
        match &self.pinned {
            Some(pinned) => Arc::clone(&pinned.schema),
            None => Arc::clone(&self.schema),
        }
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Partition filters are applied exactly by `prune`; DataFusion keeps the rest
        // above the scan and pushes them into the Parquet reader itself (statistics,
        // page index, bloom filters, row filters).
        Ok(filters
            .iter()
            .map(|f| {
                // A pinned table applies key ranges on its sorted columns exactly (no
                // filter over the slices it passes on); DataFusion filters the rest.
                let exact = match &self.pinned {
                    Some(pinned) => pinned.batches.applies_exactly(f),
                    None => self.is_partition_filter(f),
                };
                if exact {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Inexact
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let pruning = state.config().get_extension::<PartitionPruning>();
        if let Some(pinned) = &self.pinned {
            // Skip the batches whose statistics rule every filter out and cut sorted
            // columns to their key ranges; DataFusion filters the rows of the others by
            // the filters not applied exactly (`supports_filters_pushdown`).
            let selected = pinned.batches.select(state, filters);
            if let Some(pruning) = pruning {
                pruning.record_batches(&self.name, &selected);
            }
            return memory_scan(
                selected.partitions,
                &pinned.schema,
                projection,
                Some(pinned.batches.bounds()),
            );
        }
        let files = self.prune(state, filters)?;
        if let Some(pruning) = pruning {
            pruning.record(&self.name, self.files.len(), files.len());
        }
        // With `--row-group-cache-size`, the row groups of local files held decoded in
        // memory are taken from there, and the Parquet scan skips them.
        let cache = match &self.bucket {
            None => state
                .config()
                .get_extension::<RowGroupCaching>()
                .and_then(|c| c.0.clone()),
            Some(_) => None,
        };
        let split = match cache {
            Some(cache) => self.take_cached(state, &cache, files, filters).await?,
            None => CacheSplit {
                files: files
                    .into_iter()
                    .map(|(_, f)| self.partitioned_file(f))
                    .collect(),
                ..CacheSplit::default()
            },
        };
        let mut inputs = vec![];
        if !split.files.is_empty() {
            inputs.push(self.parquet_scan(state, split.files, projection, limit)?);
        }
        if !split.cached.is_empty() {
            let bounds = split.bounds.as_deref();
            let batches = split.cached;
            inputs.push(self.cached_scan(state, batches, projection, bounds, &split.passing)?);
        }
        if inputs.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => Arc::clone(&self.schema),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        UnionExec::try_new(inputs)
    }
}

impl HiveTable {
    /// DataFusion's Parquet scan of `files`.
    fn parquet_scan(
        &self,
        state: &dyn Session,
        files: Vec<PartitionedFile>,
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let group = FileGroup::new(files);
        let groups = group.split_files(state.config().target_partitions());
        let (groups, statistics) = compute_all_files_statistics(
            groups,
            Arc::clone(&self.schema),
            state.config().collect_statistics(),
            false,
        )?;

        let options = state.table_options().parquet.clone();
        let metadata_size_hint = options.global.metadata_size_hint;
        let readers = self.readers(state);
        let mut source = ParquetSource::new(
            TableSchema::builder(Arc::clone(&self.file_schema))
                .with_table_partition_cols(self.partition_fields.clone())
                .build(),
        )
        .with_table_parquet_options(options)
        .with_parquet_file_reader_factory(Arc::new(readers));
        if let Some(hint) = metadata_size_hint {
            source = source.with_metadata_size_hint(hint);
        }
        let store_url = match &self.bucket {
            Some(bucket) => ObjectStoreUrl::parse(bucket.url())?,
            None => ObjectStoreUrl::local_filesystem(),
        };
        let config = FileScanConfigBuilder::new(store_url, Arc::new(source))
            .with_file_groups(groups)
            .with_statistics(statistics)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }

    /// The readers of this table's files: the engine's I/O (mmap or pread); a session
    /// without one (a test building its own) reads through pread.
    fn readers(&self, state: &dyn Session) -> FileReaderFactory {
        let cache = state.runtime_env().cache_manager.get_file_metadata_cache();
        let io = state.config().get_extension::<Io>().unwrap_or_else(|| {
            Arc::new(Io::new(
                IoOptions {
                    mode: IoMode::Pread,
                    ..IoOptions::default()
                },
                None,
            ))
        });
        io.reader_factory(cache, self.bucket.clone())
    }

    /// Splits a scan of `files` between `cache` and the files: returns the files to read
    /// (each skipping the row groups the cache holds) and the cached rows that may pass
    /// `filters` (batches skipped by their statistics, sorted columns cut to a key
    /// range), with their columns' bounds. A row group read for the second time is
    /// decoded into the cache (`RowGroupCache::load`). Files the cache does not admit the scan for (not a
    /// lookup, `RowGroupAdmission`) are read whole, as without the cache.
    async fn take_cached(
        &self,
        state: &dyn Session,
        cache: &Arc<RowGroupCache>,
        files: Vec<(usize, &TableFile)>,
        filters: &[Expr],
    ) -> DfResult<CacheSplit> {
        let pruning = state.config().get_extension::<PartitionPruning>();
        let predicate = self.file_predicate(state, filters);
        let admission = cache.admission();
        if predicate.is_none() && admission == RowGroupAdmission::Lookups {
            // Nothing prunes row groups: no file is looked up.
            let scans = files.into_iter().map(|(_, f)| self.partitioned_file(f));
            return Ok(CacheSplit {
                files: scans.collect(),
                ..CacheSplit::default()
            });
        }
        // The filters' conjuncts, and whether every cached row group taken so far
        // applies each exactly.
        let conjuncts: Vec<&Expr> = filters.iter().flat_map(split_conjunction).collect();
        let mut exact = vec![true; conjuncts.len()];
        // Cached row groups have the table's schema: one selector for all of them, made
        // at the first one (a scan that finds none in the cache plans no selection).
        let mut selector = None;
        let readers = self.readers(state);
        let hint = state.table_options().parquet.global.metadata_size_hint;
        let mut scans = Vec::with_capacity(files.len());
        let mut cached = vec![];
        let mut bounds: Option<Vec<ColumnBounds>> = None;
        let mut loads = 0;
        for (index, file) in files {
            let mut partitioned = self.partitioned_file(file);
            let metrics = ExecutionPlanMetricsSet::new();
            // A footer that cannot be read here is reported by the Parquet scan, as
            // without the cache.
            let metadata = match readers.create_reader(0, partitioned.clone(), hint, &metrics) {
                Ok(mut reader) => reader.get_metadata(None).await.ok(),
                Err(_) => None,
            };
            let Some(metadata) = metadata else {
                scans.push(partitioned);
                continue;
            };
            let groups = metadata.row_groups();
            // The row groups the scan would read: those the filters leave.
            let mut read = RowGroupAccessPlanFilter::new(ParquetAccessPlan::new_all(groups.len()));
            if let Some(predicate) = &predicate {
                let name = partitioned.object_meta.location.to_string();
                read.prune_by_statistics(
                    &self.file_schema,
                    metadata.file_metadata().schema_descr(),
                    groups,
                    predicate,
                    &ParquetFileMetrics::new(0, &name, &metrics),
                );
            }
            let wanted = read.row_group_indexes().collect::<Vec<_>>();
            if !admission.admits(wanted.len(), groups.len()) {
                // Not a lookup: read as without the cache.
                scans.push(partitioned);
                continue;
            }
            let pruned = groups.len() - wanted.len();
            // What is left to read from the file: neither pruned nor cached.
            let mut access = read.build();
            let mut from_cache = 0;
            for row_group in wanted {
                let key = RowGroupKey {
                    version: self.version,
                    file: index,
                    row_group,
                };
                let group = match cache.lookup(key) {
                    Lookup::Hit(group) => group,
                    Lookup::Miss => continue,
                    Lookup::Load if loads == LOADS_PER_SCAN => {
                        // Seen again by a later scan.
                        cache.abandon(key);
                        continue;
                    }
                    Lookup::Load => {
                        loads += 1;
                        // The footer's size is the file's word: checked before decoding,
                        // and the decoded size again before keeping.
                        let claimed = u64::try_from(groups[row_group].total_byte_size());
                        if claimed.is_ok_and(|c| c > cache.entry_limit()) {
                            cache.refuse(key);
                            continue;
                        }
                        let decode = match self.row_group_decoder(
                            state,
                            &partitioned,
                            groups.len(),
                            row_group,
                        ) {
                            Ok(decode) => decode,
                            Err(e) => {
                                tracing::debug!(error = %e, "row group not cached");
                                cache.refuse(key);
                                continue;
                            }
                        };
                        // Decoded in the background (this scan reads the row group from
                        // the file), or here when the cache has no loader.
                        match cache.load(key, Arc::clone(&self.schema), decode).await {
                            Some((group, bytes)) => {
                                if let Some(pruning) = &pruning {
                                    pruning.record_loaded(bytes);
                                }
                                group
                            }
                            None => continue,
                        }
                    }
                };
                let selector =
                    selector.get_or_insert_with(|| Selector::new(state, filters, &self.schema));
                cached.extend(group.select(selector).partitions.into_iter().flatten());
                for (exact, conjunct) in exact.iter_mut().zip(&conjuncts) {
                    *exact = *exact && group.applies_exactly(conjunct);
                }
                match &mut bounds {
                    Some(bounds) => widen(bounds, group.bounds()),
                    None => bounds = Some(group.bounds().to_vec()),
                }
                access.skip(row_group);
                from_cache += 1;
            }
            if from_cache == 0 {
                // As without the cache (DataFusion prunes, and counts what it pruned).
                scans.push(partitioned);
                continue;
            }
            let to_read = access.row_group_index_iter().count();
            if let Some(pruning) = &pruning {
                pruning.record_cached(CachedFile {
                    no_file_scan: to_read == 0,
                    row_groups: groups.len() - to_read,
                    pruned,
                    from_cache,
                });
            }
            if to_read == 0 {
                continue;
            }
            // The file's statistics count the rows the cache now serves too.
            partitioned.statistics = partitioned
                .statistics
                .map(|s| Arc::new(Statistics::clone(&s).to_inexact()));
            partitioned.extensions.insert(access);
            scans.push(partitioned);
        }
        let passing = conjuncts
            .into_iter()
            .zip(exact)
            .filter(|(_, exact)| *exact)
            .map(|(conjunct, _)| conjunct.clone())
            .collect();
        Ok(CacheSplit {
            files: scans,
            cached,
            bounds,
            passing,
        })
    }

    /// The filters that name only file columns, as a predicate over row-group
    /// statistics; `None` when none can be used.
    fn file_predicate(
        &self,
        state: &dyn Session,
        filters: &[Expr],
    ) -> Option<Arc<PruningPredicate>> {
        let usable = filters
            .iter()
            .flat_map(|f| split_conjunction(f))
            .filter(|f| {
                !f.is_volatile()
                    && f.column_refs()
                        .iter()
                        .all(|c| self.file_schema.index_of(&c.name).is_ok())
            })
            .cloned()
            .collect::<Vec<_>>();
        let predicate = conjunction(usable)?;
        let df_schema = DFSchema::try_from(Arc::clone(&self.file_schema)).ok()?;
        let physical = state.create_physical_expr(predicate, &df_schema).ok()?;
        PruningPredicateBuilder::new()
            .with_file_schema(Arc::clone(&self.file_schema))
            .build(physical)
    }

    /// The decode of row group `row_group` of `file` (of `row_groups`): every row, by
    /// DataFusion's Parquet scan, with the table's schema (partition columns included),
    /// and the bytes the scan read from the file.
    fn row_group_decoder(
        &self,
        state: &dyn Session,
        file: &PartitionedFile,
        row_groups: usize,
        row_group: usize,
    ) -> DfResult<impl Future<Output = DfResult<(Vec<RecordBatch>, usize)>> + Send + 'static> {
        let mut access = ParquetAccessPlan::new_none(row_groups);
        access.scan(row_group);
        let mut file = file.clone();
        file.range = None;
        file.statistics = None;
        file.extensions.insert(access);
        let plan = self.parquet_scan(state, vec![file], None, None)?;
        let task = state.task_ctx();
        Ok(async move {
            let batches = collect(Arc::clone(&plan), task).await?;
            let bytes = plan
                .metrics()
                .and_then(|m| m.sum_by_name("bytes_scanned"))
                .map_or(0, |v| v.as_usize());
            Ok((batches, bytes))
        })
    }

    /// A scan of rows taken from the row group cache, whose columns have `bounds`, all
    /// passing the filters `passing`.
    fn cached_scan(
        &self,
        state: &dyn Session,
        batches: Vec<RecordBatch>,
        projection: Option<&Vec<usize>>,
        bounds: Option<&Bounds>,
        passing: &[Expr],
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let count = state.config().target_partitions().clamp(1, batches.len());
        let mut partitions = vec![Vec::new(); count];
        for (i, batch) in batches.into_iter().enumerate() {
            partitions[i % count].push(batch);
        }
        memory_scan_passing(partitions, &self.schema, projection, bounds, passing)
    }
}
