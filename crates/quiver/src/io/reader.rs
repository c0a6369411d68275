//! Opening Parquet files for a query.
//!
//! [`FileReaderFactory`] wraps DataFusion's caching reader factory (footers read once
//! per file version) and adds what Quiver needs on top:
//! - the file is checked against the catalog's listing when opened: one that changed or
//!   vanished since fails with a retryable error naming it, instead of decoding a
//!   different file with the old footer;
//! - in `mmap` mode the reader pins the file's mapping for the whole scan and serves
//!   every range as a slice of it, so a file replaced mid-query is read consistently
//!   (the old version) and no range costs a system call;
//! - every error names the file: DataFusion's own do not;
//! - an object of an S3 table is read as the version the catalog listed
//!   ([`VersionedObject`]): footer, page index and data through the block cache, and the
//!   scan's metrics count bytes from the store apart from bytes from the cache.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::execution::cache::cache_manager::FileMetadataCache;
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder};
use datafusion_datasource::PartitionedFile;
use datafusion_datasource_parquet::{CachedParquetFileReaderFactory, ParquetFileReaderFactory};
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;

use super::chunk_cache::{CachedFile, ChunkCache};
use super::mmap::{FileIdentity, MappedFile, MmapError, MmapStore, check_listed};
use super::remote::object::ReadCounters;
use super::remote::{Bucket, VersionedObject};
use crate::error::Error;

/// Creates the readers of a scan; see the module documentation.
#[derive(Debug)]
pub struct FileReaderFactory {
    inner: CachedParquetFileReaderFactory,
    mmap: Option<Arc<MmapStore>>,
    /// Only for turning object paths back into file system paths.
    local: LocalFileSystem,
    metadata_cache: Arc<FileMetadataCache>,
    /// The bucket, for a table on S3.
    bucket: Option<Arc<Bucket>>,
    /// Decompressed chunks of local files (mmap mode), when on.
    chunk_cache: Option<Arc<ChunkCache>>,
}

impl FileReaderFactory {
    /// Readers over `store` (metadata through `metadata_cache`), serving data from
    /// `mmap` (and chunks from `chunk_cache`) when given; or over the objects of `bucket`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        metadata_cache: Arc<FileMetadataCache>,
        mmap: Option<Arc<MmapStore>>,
        bucket: Option<Arc<Bucket>>,
        chunk_cache: Option<Arc<ChunkCache>>,
    ) -> Self {
        Self {
            inner: CachedParquetFileReaderFactory::new(store, Arc::clone(&metadata_cache)),
            mmap,
            local: LocalFileSystem::new(),
            metadata_cache,
            bucket,
            chunk_cache,
        }
    }

    /// A reader of the object version the catalog listed.
    fn create_remote_reader(
        &self,
        bucket: &Arc<Bucket>,
        partition_index: usize,
        partitioned_file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> datafusion::error::Result<Box<dyn AsyncFileReader + Send>> {
        let counter = |name: &str| {
            MetricBuilder::new(metrics)
                .with_new_label(
                    "filename",
                    partitioned_file.object_meta.location.to_string(),
                )
                .counter(name.to_owned(), partition_index)
        };
        let counters = ReadCounters {
            from_store: counter("bytes_from_store"),
            from_cache: counter("bytes_from_cache"),
        };
        let object = VersionedObject::new(
            Arc::clone(bucket),
            object_meta_in_bucket(&partitioned_file.object_meta),
        )
        .with_counters(counters);
        let path = Arc::<str>::from(object.url());
        let inner =
            CachedParquetFileReaderFactory::new(Arc::new(object), Arc::clone(&self.metadata_cache))
                .create_reader(
                    partition_index,
                    partitioned_file,
                    metadata_size_hint,
                    metrics,
                )?;
        Ok(Box::new(FileReader {
            inner,
            path,
            mapped: None,
            bytes_scanned: None,
            cached: None,
        }))
    }
}

/// The catalog names a remote object `bucket/key` (so that DataFusion's metadata cache,
/// keyed by location, cannot confuse two buckets); the bucket wants the key.
pub fn object_meta_in_bucket(listed: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        location: ObjectPath::from_iter(listed.location.parts().skip(1)),
        ..listed.clone()
    }
}

/// A file that is not the version the catalog listed is [`Error::FileChanged`]
/// (retryable); anything else keeps its storage error kind.
fn open_error(path: &str, e: MmapError) -> Error {
    match e {
        MmapError::Changed { reason, .. } => Error::FileChanged {
            path: path.to_owned(),
            reason,
        },
        other => Error::file_read(path.to_owned(), other.into()),
    }
}

impl ParquetFileReaderFactory for FileReaderFactory {
    fn create_reader(
        &self,
        partition_index: usize,
        partitioned_file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> datafusion::error::Result<Box<dyn AsyncFileReader + Send>> {
        if let Some(bucket) = &self.bucket {
            return self.create_remote_reader(
                bucket,
                partition_index,
                partitioned_file,
                metadata_size_hint,
                metrics,
            );
        }
        let location = &partitioned_file.object_meta.location;
        let fs_path = self
            .local
            .path_to_filesystem(location)
            .map_err(|e| Error::file_read(format!("/{location}"), e))?;
        let path = Arc::<str>::from(fs_path.display().to_string());

        let listed = &partitioned_file.object_meta;
        let (mapped, bytes_scanned) = match &self.mmap {
            Some(store) => {
                let mapped = store
                    .open_listed(listed)
                    .map_err(|e| open_error(&path, e))?;
                // The same counter DataFusion's reader keeps, which it cannot see here
                // because data reads bypass it.
                let bytes_scanned = MetricBuilder::new(metrics)
                    .with_new_label("filename", location.to_string())
                    .counter("bytes_scanned", partition_index);
                (Some(mapped), Some(bytes_scanned))
            }
            None => {
                let metadata = std::fs::metadata(&fs_path).map_err(|source| {
                    let e = MmapError::Io {
                        path: fs_path.clone(),
                        source,
                    };
                    open_error(&path, e)
                })?;
                check_listed(&fs_path, &FileIdentity::of(&metadata), Some(listed))
                    .map_err(|e| open_error(&path, e))?;
                (None, None)
            }
        };

        let inner = self.inner.create_reader(
            partition_index,
            partitioned_file,
            metadata_size_hint,
            metrics,
        )?;
        let cached = match (&self.chunk_cache, &mapped) {
            (Some(cache), Some(file)) => Some(CachedFile::new(Arc::clone(cache), file.clone())),
            _ => None,
        };
        Ok(Box::new(FileReader {
            inner,
            path,
            mapped,
            bytes_scanned,
            cached,
        }))
    }
}

struct FileReader {
    /// DataFusion's reader: metadata (through the cache) and, in pread mode, data.
    inner: Box<dyn AsyncFileReader + Send>,
    path: Arc<str>,
    /// The pinned mapping, in mmap mode.
    mapped: Option<MappedFile>,
    bytes_scanned: Option<Count>,
    /// Decompressed chunks, with `--chunk-cache-size` (mmap mode).
    cached: Option<CachedFile>,
}

impl FileReader {
    /// Puts the file's path on an error. Errors of the storage layer become
    /// [`Error::FileRead`] so that they keep their gRPC code; the rest (decoding
    /// errors: damaged data) keep their kind.
    fn name(path: &str, e: ParquetError) -> ParquetError {
        match e {
            ParquetError::External(source) => match source.downcast::<object_store::Error>() {
                Ok(store_error) => {
                    ParquetError::External(Box::new(Error::file_read(path.into(), *store_error)))
                }
                Err(other) => ParquetError::External(format!("reading {path}: {other}").into()),
            },
            other => ParquetError::General(format!("reading {path}: {other}")),
        }
    }
}

/// Slices of the pinned mapping (or of cached chunks), counted as scanned.
fn slices(
    mapped: &MappedFile,
    cached: Option<&mut CachedFile>,
    path: &str,
    bytes_scanned: Option<&Count>,
    ranges: &[Range<u64>],
) -> parquet::errors::Result<Vec<Bytes>> {
    let mut slices = Vec::with_capacity(ranges.len());
    let mut cached = cached;
    for range in ranges {
        if let Some(cached) = cached.as_deref_mut()
            && let Some(bytes) = cached.read(range).map_err(|e| FileReader::name(path, e))?
        {
            slices.push(bytes);
            continue;
        }
        let slice = mapped.slice(range.clone()).map_err(|e| {
            ParquetError::External(Box::new(Error::file_read(path.into(), e.into())))
        })?;
        slices.push(slice);
    }
    if let Some(counter) = bytes_scanned {
        counter.add(slices.iter().map(Bytes::len).sum());
    }
    Ok(slices)
}

impl AsyncFileReader for FileReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        if self.mapped.is_some() {
            return self
                .get_byte_ranges(vec![range])
                .map(|r| r.map(|mut v| v.remove(0)))
                .boxed();
        }
        let path = Arc::clone(&self.path);
        self.inner
            .get_bytes(range)
            .map(move |r| r.map_err(|e| Self::name(&path, e)))
            .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        if self.mapped.is_some() {
            let Self {
                inner,
                path,
                mapped: Some(mapped),
                bytes_scanned,
                cached,
            } = self
            else {
                let e = ParquetError::General("the mapping is gone".into());
                return futures::future::ready(Err(e)).boxed();
            };
            if !cached.as_ref().is_some_and(CachedFile::needs_original) {
                let result = slices(
                    mapped,
                    cached.as_mut(),
                    path,
                    bytes_scanned.as_ref(),
                    &ranges,
                );
                return futures::future::ready(result).boxed();
            }
            // A reader DataFusion made for decoding only (after another read the
            // metadata): the chunk cache needs the file's own metadata to place chunks.
            return async move {
                let original = inner
                    .get_metadata(None)
                    .await
                    .map_err(|e| Self::name(path, e))?;
                if let Some(cached) = cached.as_mut() {
                    cached.set_original(original);
                }
                slices(
                    mapped,
                    cached.as_mut(),
                    path,
                    bytes_scanned.as_ref(),
                    &ranges,
                )
            }
            .boxed();
        }
        let path = Arc::clone(&self.path);
        self.inner
            .get_byte_ranges(ranges)
            .map(move |r| r.map_err(|e| Self::name(&path, e)))
            .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let path = Arc::clone(&self.path);
        async move {
            let metadata = self
                .inner
                .get_metadata(options)
                .await
                .map_err(|e| Self::name(&path, e))?;
            match &mut self.cached {
                Some(cached) => cached.metadata(metadata).map_err(|e| Self::name(&path, e)),
                None => Ok(metadata),
            }
        }
        .boxed()
    }
}
