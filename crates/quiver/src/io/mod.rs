//! How table files are read: local files through memory maps (default) or `pread`;
//! objects on S3 through a memory-mapped block cache ([`remote`]).
//!
//! ```text
//!  ParquetSource ── FileReaderFactory ── open: check against the listing, pin mapping
//!                        │                          │
//!                        │ metadata (cached)        │ data ranges: slices of the mapping,
//!                        │                          │ or of decompressed chunks (ChunkCache)
//!                        ▼                          ▼
//!              ObjectStore for file://  ──  MmapStore (mapping cache)  |  LocalFileSystem
//!
//!  s3:// tables: ── VersionedObject (the listed version) ── BlockCache ── Bucket (GET If-Match)
//! ```
//!
//! [`Io`] is built once per engine, registers the store for `file://` and travels to
//! table scans as a session config extension.

pub mod chunk_cache;
mod mmap;
pub(crate) mod reader;
pub mod remote;

pub use chunk_cache::{ChunkCache, ChunkCacheStats};
pub use mmap::{FileIdentity, MappedFile, MmapError, MmapLimits, MmapStats, MmapStore};
pub use reader::FileReaderFactory;

use std::fmt::{self, Display};
use std::str::FromStr;
use std::sync::Arc;

use datafusion::execution::cache::cache_manager::FileMetadataCache;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

use remote::{Bucket, RemoteStores};

/// How file bytes reach the Parquet decoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IoMode {
    /// Slices of a memory map: no copy, no system call per read once mapped.
    #[default]
    Mmap,
    /// object_store's LocalFileSystem: `pread` into a new buffer on a blocking thread.
    /// For NFS, FUSE and other file systems where files may change under a mapping.
    Pread,
}

impl FromStr for IoMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mmap" => Ok(Self::Mmap),
            "pread" => Ok(Self::Pread),
            other => Err(format!("unknown I/O mode '{other}': use mmap or pread")),
        }
    }
}

impl Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mmap => "mmap",
            Self::Pread => "pread",
        })
    }
}

/// Removes entries of `cache` until at least `bytes` of them (each weighed by `size`) are
/// gone, or it is empty; returns the bytes removed. For the caches that hold memory of the
/// query pool: their eviction listeners give it back (see `MeteredPool::add_reclaimer`).
pub(crate) fn remove_until<K, V>(
    cache: &moka::sync::Cache<K, V>,
    bytes: usize,
    size: impl Fn(&V) -> usize,
) -> usize
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let mut freed = 0;
    for (key, value) in cache.iter() {
        if freed >= bytes {
            break;
        }
        if cache.remove(&*key).is_some() {
            freed += size(&value);
        }
    }
    cache.run_pending_tasks();
    freed
}

/// I/O settings of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoOptions {
    /// mmap or pread.
    pub mode: IoMode,
    /// Bounds of the mapping cache (mmap mode).
    pub mmap: MmapLimits,
    /// Bytes of decompressed column chunks kept (mmap mode; `0` off); see [`ChunkCache`].
    pub chunk_cache_size: u64,
}

/// The file system as the engine reads it.
#[derive(Debug)]
pub struct Io {
    store: Arc<dyn ObjectStore>,
    mmap: Option<Arc<MmapStore>>,
    remote: Option<Arc<RemoteStores>>,
    chunk_cache: Option<Arc<ChunkCache>>,
}

impl Io {
    /// The store for `options.mode`; S3 tables read through `remote`.
    pub fn new(options: IoOptions, remote: Option<Arc<RemoteStores>>) -> Self {
        let (store, mmap): (Arc<dyn ObjectStore>, _) = match options.mode {
            IoMode::Mmap => {
                let mmap = Arc::new(MmapStore::new(options.mmap));
                (Arc::clone(&mmap) as _, Some(mmap))
            }
            IoMode::Pread => (Arc::new(LocalFileSystem::new()), None),
        };
        Self {
            store,
            mmap,
            remote,
            chunk_cache: None,
        }
    }

    /// Keeps decompressed column chunks of local files in `cache` (mmap mode only: in
    /// pread mode files are read as they are now, see [`IoMode::Pread`]).
    pub fn with_chunk_cache(mut self, cache: Arc<ChunkCache>) -> Self {
        if self.mmap.is_some() {
            self.chunk_cache = Some(cache);
        }
        self
    }

    /// The chunk cache's counters, when it is on.
    pub fn chunk_cache_stats(&self) -> Option<Arc<ChunkCacheStats>> {
        self.chunk_cache.as_ref().map(|c| Arc::clone(c.stats()))
    }

    /// The object stores of S3 tables, when any are configured.
    pub fn remote(&self) -> Option<&Arc<RemoteStores>> {
        self.remote.as_ref()
    }

    /// The store to register for `file://`.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// Mapping counters, in mmap mode.
    pub fn mmap_stats(&self) -> Option<Arc<MmapStats>> {
        self.mmap.as_ref().map(|m| Arc::clone(m.stats()))
    }

    /// The reader factory for a scan of local files, or of objects in `bucket`.
    pub fn reader_factory(
        &self,
        metadata_cache: Arc<FileMetadataCache>,
        bucket: Option<Arc<Bucket>>,
    ) -> FileReaderFactory {
        FileReaderFactory::new(
            self.store(),
            metadata_cache,
            self.mmap.clone(),
            bucket,
            self.chunk_cache.clone(),
        )
    }
}
