//! Reading Parquet files for queries.
//!
//! [`NamedFileReaderFactory`] wraps DataFusion's caching reader factory so that every
//! read or footer error names the file it came from: DataFusion's own errors do not, and
//! "a file is damaged" is not actionable without knowing which one.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion_datasource::PartitionedFile;
use datafusion_datasource_parquet::ParquetFileReaderFactory;
use futures::FutureExt;
use futures::future::BoxFuture;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;

/// Creates readers whose errors carry the file's path.
#[derive(Debug)]
pub struct NamedFileReaderFactory {
    inner: Arc<dyn ParquetFileReaderFactory>,
}

impl NamedFileReaderFactory {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ParquetFileReaderFactory>) -> Self {
        Self { inner }
    }
}

impl ParquetFileReaderFactory for NamedFileReaderFactory {
    fn create_reader(
        &self,
        partition_index: usize,
        partitioned_file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> datafusion::error::Result<Box<dyn AsyncFileReader + Send>> {
        let path = Arc::<str>::from(format!("/{}", partitioned_file.object_meta.location));
        let inner = self.inner.create_reader(
            partition_index,
            partitioned_file,
            metadata_size_hint,
            metrics,
        )?;
        Ok(Box::new(NamedFileReader { inner, path }))
    }
}

struct NamedFileReader {
    inner: Box<dyn AsyncFileReader + Send>,
    path: Arc<str>,
}

impl NamedFileReader {
    fn name(path: &str, e: ParquetError) -> ParquetError {
        ParquetError::General(format!("reading {path}: {e}"))
    }
}

impl AsyncFileReader for NamedFileReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
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
        self.inner
            .get_metadata(options)
            .map(move |r| r.map_err(|e| Self::name(&path, e)))
            .boxed()
    }
}
