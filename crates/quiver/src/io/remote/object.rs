//! [`VersionedObject`]: one listed version of one remote object, as an [`ObjectStore`].
//!
//! DataFusion's footer reader and metadata cache take a store and an `ObjectMeta`, and
//! read with plain ranged GETs. Handing them this view instead of the bucket's store
//! makes every one of those reads a read of the listed version (through the block
//! cache, If-Match on a miss), so footers, page indexes and data all come from the same
//! bytes. Everything but reading is refused.

use std::fmt::{self, Debug, Display};
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::physical_plan::metrics::Count;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use super::cache::Fetch;
use super::{Bucket, ObjectVersion, RemoteError};

/// Per-scan counters of where the bytes came from.
#[derive(Debug, Clone)]
pub struct ReadCounters {
    /// Bytes fetched from the store.
    pub from_store: Count,
    /// Bytes served from the local cache.
    pub from_cache: Count,
}

/// One object version; see the module documentation.
pub struct VersionedObject {
    bucket: Arc<Bucket>,
    /// The listing's metadata: the key in the bucket, size, ETag, modification time.
    meta: ObjectMeta,
    version: ObjectVersion,
    counters: Option<ReadCounters>,
}

impl Debug for VersionedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionedObject")
            .field("url", &self.version.url)
            .field("version", &self.version.version)
            .finish_non_exhaustive()
    }
}

impl Display for VersionedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionedObject({})", self.version.url)
    }
}

impl VersionedObject {
    /// The version of `bucket`'s object that `meta` (from [`Bucket::list`]) describes.
    pub fn new(bucket: Arc<Bucket>, meta: ObjectMeta) -> Self {
        let version = ObjectVersion {
            url: format!("{}/{}", bucket.url(), meta.location),
            version: meta
                .e_tag
                .clone()
                .unwrap_or_else(|| meta.last_modified.to_rfc3339()),
            size: meta.size,
        };
        Self {
            bucket,
            meta,
            version,
            counters: None,
        }
    }

    /// Counts bytes by origin into a scan's metrics.
    pub fn with_counters(mut self, counters: ReadCounters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// `s3://bucket/key`.
    pub fn url(&self) -> &str {
        &self.version.url
    }

    /// `ranges` of this version.
    pub async fn read(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RemoteError> {
        let requested: u64 = ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum();
        let (slices, from_store) = match self.bucket.cache.clone() {
            Some(cache) => {
                let bucket = Arc::clone(&self.bucket);
                let meta = self.meta.clone();
                let fetch: Fetch = Arc::new(move |range| {
                    let bucket = Arc::clone(&bucket);
                    let meta = meta.clone();
                    async move { bucket.fetch(&meta, range).await }.boxed()
                });
                cache.read(&self.version, ranges, fetch).await?
            }
            None => {
                for range in ranges {
                    if range.end > self.meta.size || range.start > range.end {
                        return Err(RemoteError::Changed {
                            url: self.version.url.clone(),
                            reason: format!(
                                "bytes {}..{} requested of an object listed with {} bytes",
                                range.start, range.end, self.meta.size
                            ),
                        });
                    }
                }
                // No cache: each range its own GET, all at once.
                let slices = futures::future::try_join_all(ranges.iter().map(|range| async {
                    if range.start == range.end {
                        return Ok(Bytes::new());
                    }
                    self.bucket.fetch(&self.meta, range.clone()).await
                }))
                .await?;
                (slices, requested)
            }
        };
        if let Some(counters) = &self.counters {
            counters.from_store.add(from_store as usize);
            counters
                .from_cache
                .add(requested.saturating_sub(from_store) as usize);
        }
        Ok(slices)
    }

    fn refuse(&self, what: &str) -> object_store::Error {
        object_store::Error::NotSupported {
            source: format!(
                "{what} is not supported on a table's object {}",
                self.version.url
            )
            .into(),
        }
    }
}

#[async_trait]
impl ObjectStore for VersionedObject {
    async fn get_opts(
        &self,
        _location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let range = match &options.range {
            Some(range) => {
                range
                    .as_range(self.meta.size)
                    .map_err(|e| object_store::Error::Generic {
                        store: "S3",
                        source: Box::new(e),
                    })?
            }
            None => 0..self.meta.size,
        };
        let bytes = if options.head {
            Bytes::new()
        } else {
            self.read(std::slice::from_ref(&range))
                .await?
                .pop()
                .unwrap_or_default()
        };
        // One chunk: collected as is, so a range inside one block stays a slice of its mapping.
        let payload = futures::stream::once(async move { Ok(bytes) }).boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(payload),
            meta: self.meta.clone(),
            range,
            attributes: Attributes::default(),
        })
    }

    async fn get_ranges(
        &self,
        _location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        Ok(self.read(ranges).await?)
    }

    async fn put_opts(
        &self,
        _location: &Path,
        _payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        Err(self.refuse("writing"))
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(self.refuse("writing"))
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let url = self.version.url.clone();
        locations
            .map(move |_| {
                Err(object_store::Error::NotSupported {
                    source: format!("deleting is not supported on a table's object {url}").into(),
                })
            })
            .boxed()
    }

    fn list(&self, _prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        futures::stream::iter([Ok(self.meta.clone())]).boxed()
    }

    async fn list_with_delimiter(
        &self,
        _prefix: Option<&Path>,
    ) -> object_store::Result<ListResult> {
        Ok(ListResult {
            common_prefixes: vec![],
            objects: vec![self.meta.clone()],
        })
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        _to: &Path,
        _options: CopyOptions,
    ) -> object_store::Result<()> {
        Err(self.refuse("copying"))
    }
}
