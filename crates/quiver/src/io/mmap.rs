//! A memory-mapping [`ObjectStore`] for local Parquet files.
//!
//! Every read is a slice of one `Bytes` per file that owns the mapping: no `pread`, no
//! fresh `Vec`, no copy. The mappings live in a cache bounded by count and by bytes, keyed
//! by path and checked against the file's identity (device, inode, size, mtime) on every
//! lookup, so a file replaced by rename is mapped afresh, never served stale. Evicting a
//! mapping only drops the cache's reference: slices handed out keep it alive, and the
//! last one to go unmaps it.
//!
//! # Safety model
//! A mapping is only as stable as the file under it. Quiver maps regular files only,
//! checks sizes before slicing, and relies on Parquet files being immutable: replacing a
//! file by rename or deleting it is safe (the old inode lives on while mapped), but
//! truncating a mapped file in place makes the kernel raise SIGBUS on the next touch of
//! a page past the new end, which no Rust code can recover from. The README's
//! operations section says so; `--io pread` is the mode for file systems where that
//! cannot be guaranteed (NFS, FUSE).
//!
//! # Where page faults happen
//! A slice of a cold mapping faults its pages in on whichever thread first touches them.
//! Quiver polls every query plan on its CPU runtime (see `query::CpuRuntime`) and runs
//! catalog refreshes there too, so the Parquet decoder, the only code that reads these
//! bytes, always runs on a CPU thread, never on the tokio runtime serving gRPC. For
//! larger reads we also `madvise(MADV_WILLNEED)` the range, which starts the kernel's
//! read-ahead for the whole range at once instead of one fault-around window at a time.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::{self, Debug, Display};
use std::fs::{File, Metadata};
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use memmap2::{Advice, Mmap};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

/// Reads at least this long are preceded by `MADV_WILLNEED`. Shorter ones are served
/// by the kernel's fault-around (64 KiB by default) in a fault or two, where the extra
/// system call would cost more than it saves.
const WILLNEED_MIN_BYTES: usize = 128 * 1024;

/// How many mappings the cache keeps, and how many bytes they may span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapLimits {
    /// Most files kept mapped. Each mapping costs one entry of the process's
    /// `vm.max_map_count` (65,530 by default), which the allocator also draws on.
    pub max_files: usize,
    /// Most bytes kept mapped. Mapped pages are page cache, not heap: the kernel can
    /// drop them under pressure, but they show in RSS while resident.
    pub max_bytes: u64,
}

impl Default for MmapLimits {
    fn default() -> Self {
        Self {
            // A sixteenth of the default vm.max_map_count, leaving the rest to the
            // allocator, thread stacks and mappings still held by running queries.
            max_files: 4096,
            max_bytes: 64 << 30,
        }
    }
}

/// What makes a file version unique: a rename brings a new inode, an in-place
/// rewrite a new size or mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    /// Length in bytes.
    pub size: u64,
    /// Modification time.
    pub modified: SystemTime,
}

impl FileIdentity {
    pub(super) fn of(metadata: &Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.len(),
            modified: metadata.modified().unwrap_or(UNIX_EPOCH),
        }
    }

    /// The ETag LocalFileSystem would report, so conditional requests behave the same
    /// in both I/O modes.
    fn e_tag(&self) -> String {
        let mtime = self
            .modified
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        format!("{:x}-{:x}-{:x}", self.ino, mtime, self.size)
    }
}

/// A file that cannot be served from a mapping.
#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    /// Directories, sockets, FIFOs and devices are never mapped.
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The request reaches past the end of the file.
    #[error(
        "{path}: bytes {start}..{end} requested but the file has {size} bytes; it was \
         truncated or replaced while in use (Parquet files must be immutable: publish new \
         files by rename)"
    )]
    OutOfRange {
        /// The path.
        path: PathBuf,
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
        /// Actual size.
        size: u64,
    },
    /// The file is not the version the caller listed.
    #[error("{path} changed since it was listed: {reason}")]
    Changed {
        /// The path.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Opening, inspecting or mapping the file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl MmapError {
    fn io(path: &FsPath, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// How a mapping failure reaches DataFusion and the Parquet reader: as an object store
/// error whose source is the I/O error itself for a missing or unreadable file (the path
/// is in the object store error), or Quiver's own [`crate::Error`], which `crate::error`
/// finds again in the source chain to give it its status code and message.
impl From<MmapError> for object_store::Error {
    fn from(e: MmapError) -> Self {
        match e {
            MmapError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                Self::NotFound {
                    path: path.display().to_string(),
                    source: Box::new(source),
                }
            }
            MmapError::Io { path, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Self::PermissionDenied {
                    path: path.display().to_string(),
                    source: Box::new(source),
                }
            }
            other => Self::Generic {
                store: "local",
                source: Box::new(crate::Error::from(other)),
            },
        }
    }
}

/// A file that is not what the catalog listed, or not a file: the client's query meets
/// the operator's data, so these keep codes of their own (see `crate::error`).
impl From<MmapError> for crate::Error {
    fn from(e: MmapError) -> Self {
        match e {
            MmapError::NotRegular { path, kind } => crate::Error::NotAFile {
                path: path.display().to_string(),
                kind,
            },
            MmapError::Changed { path, reason } => crate::Error::FileChanged {
                path: path.display().to_string(),
                reason,
            },
            MmapError::OutOfRange {
                path,
                start,
                end,
                size,
            } => crate::Error::FileChanged {
                path: path.display().to_string(),
                reason: format!(
                    "bytes {start}..{end} requested but the file has {size} bytes: it was \
                     truncated or replaced while in use"
                ),
            },
            MmapError::Io { path, source } => crate::Error::Io {
                path: path.display().to_string(),
                source,
            },
        }
    }
}

/// One mapped file: the identity it was mapped at and the bytes of the whole file.
#[derive(Clone)]
pub struct MappedFile {
    path: Arc<PathBuf>,
    identity: FileIdentity,
    /// Owns the mapping (through [`LiveMapping`]); empty for a zero-length file.
    bytes: Bytes,
    mmap: Option<Arc<LiveMapping>>,
}

impl Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("size", &self.identity.size)
            .finish_non_exhaustive()
    }
}

impl MappedFile {
    /// The identity of the file version this mapping shows.
    pub fn identity(&self) -> &FileIdentity {
        &self.identity
    }

    /// Bytes `range` of the file, sharing the mapping. Errors (instead of panicking)
    /// when the range reaches past the end.
    pub fn slice(&self, range: Range<u64>) -> Result<Bytes, MmapError> {
        let size = self.identity.size;
        if range.start > range.end || range.end > size {
            return Err(MmapError::OutOfRange {
                path: self.path.as_ref().clone(),
                start: range.start,
                end: range.end,
                size,
            });
        }
        // Both ends are at most `size`, which came from a mapping of that many bytes,
        // so they fit in usize.
        let (start, end) = (range.start as usize, range.end as usize);
        if let Some(mmap) = &self.mmap
            && end - start >= WILLNEED_MIN_BYTES
        {
            // Only a hint: a failure costs nothing but the read-ahead.
            let _ = mmap.mmap.advise_range(Advice::WillNeed, start, end - start);
        }
        Ok(self.bytes.slice(start..end))
    }
}

/// A mapping that keeps the live-mapping gauges right for as long as any slice of it
/// exists.
struct LiveMapping {
    mmap: Mmap,
    stats: Arc<MmapStats>,
}

impl Drop for LiveMapping {
    fn drop(&mut self) {
        self.stats.live_files.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .live_bytes
            .fetch_sub(self.mmap.len() as u64, Ordering::Relaxed);
    }
}

/// Lets `Bytes` own the mapping through an `Arc` we also keep for `madvise`.
struct SharedMapping(Arc<LiveMapping>);

impl AsRef<[u8]> for SharedMapping {
    fn as_ref(&self) -> &[u8] {
        &self.0.mmap
    }
}

/// Counters of the mapping layer, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct MmapStats {
    /// Reads served from a cached mapping.
    pub hits: AtomicU64,
    /// Files mapped (cache misses, including files changed since they were mapped).
    pub maps: AtomicU64,
    /// Mappings dropped from the cache to stay within its limits.
    pub evictions: AtomicU64,
    /// Files in the cache, and the bytes they span.
    pub cached_files: AtomicU64,
    /// Bytes spanned by cached mappings.
    pub cached_bytes: AtomicU64,
    /// Mappings alive, cached or still referenced by a query after eviction.
    pub live_files: AtomicU64,
    /// Bytes spanned by live mappings.
    pub live_bytes: AtomicU64,
}

struct CacheEntry {
    file: MappedFile,
    last_used: u64,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<PathBuf, CacheEntry>,
    bytes: u64,
    clock: u64,
}

/// Serves local files from memory maps; see the module documentation.
pub struct MmapStore {
    /// Writes, listing, copies and paths are LocalFileSystem's.
    local: LocalFileSystem,
    limits: MmapLimits,
    cache: Mutex<Cache>,
    stats: Arc<MmapStats>,
}

impl Debug for MmapStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapStore")
            .field("limits", &self.limits)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Display for MmapStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MmapStore(file://)")
    }
}

impl MmapStore {
    /// A store for the whole local file system with the given cache bounds.
    pub fn new(limits: MmapLimits) -> Self {
        Self {
            local: LocalFileSystem::new(),
            limits,
            cache: Mutex::default(),
            stats: Arc::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<MmapStats> {
        &self.stats
    }

    /// The file at `location` mapped, from the cache when the file is unchanged.
    pub fn open(&self, location: &Path) -> object_store::Result<MappedFile> {
        let path = self.local.path_to_filesystem(location)?;
        Ok(self.map(&path, None)?)
    }

    /// Like [`Self::open`], but only if the file is still the version `listed`
    /// describes (same size and modification time): checked before anything is mapped,
    /// and again on the descriptor that gets mapped.
    pub fn open_listed(&self, listed: &ObjectMeta) -> Result<MappedFile, MmapError> {
        let path = self
            .local
            .path_to_filesystem(&listed.location)
            .map_err(|e| {
                MmapError::io(
                    FsPath::new(listed.location.as_ref()),
                    std::io::Error::other(e),
                )
            })?;
        self.map(&path, Some(listed))
    }

    /// The mapping of `path` as it is now.
    ///
    /// One `stat` per call decides whether the cached mapping still shows the file
    /// at `path`; a changed file is mapped again and replaces the old entry (whose
    /// slices stay valid).
    fn map(&self, path: &FsPath, listed: Option<&ObjectMeta>) -> Result<MappedFile, MmapError> {
        // Check the kind before opening: opening a FIFO for reading blocks.
        let metadata = std::fs::metadata(path).map_err(|e| MmapError::io(path, e))?;
        check_regular(path, &metadata)?;
        let identity = FileIdentity::of(&metadata);
        check_listed(path, &identity, listed)?;
        {
            let mut cache = self.cache.lock();
            cache.clock += 1;
            let clock = cache.clock;
            if let Some(entry) = cache.entries.get_mut(path)
                && entry.file.identity == identity
            {
                entry.last_used = clock;
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(entry.file.clone());
            }
        }

        let file = self.map_uncached(path)?;
        // Renamed over between the stat and the open: what we mapped is newer.
        check_listed(path, &file.identity, listed)?;
        self.insert(path, file.clone());
        Ok(file)
    }

    fn map_uncached(&self, path: &FsPath) -> Result<MappedFile, MmapError> {
        let file = File::open(path).map_err(|e| MmapError::io(path, e))?;
        // The identity of what we opened, which is what we map: the path may have been
        // renamed over since the stat above.
        let metadata = file.metadata().map_err(|e| MmapError::io(path, e))?;
        check_regular(path, &metadata)?;
        let identity = FileIdentity::of(&metadata);
        let path = Arc::new(path.to_owned());
        self.stats.maps.fetch_add(1, Ordering::Relaxed);
        if identity.size == 0 {
            // mmap(2) rejects zero-length mappings; an empty file has nothing to map.
            return Ok(MappedFile {
                path,
                identity,
                bytes: Bytes::new(),
                mmap: None,
            });
        }
        let len = usize::try_from(identity.size)
            .map_err(|_| MmapError::io(&path, std::io::Error::other("file too large to map")))?;
        // SAFETY: the mapping is read-only and private to this process. Its contents can
        // change only if another process writes to the file in place, and reading past
        // the end can fault only if the file is truncated; Quiver requires Parquet files
        // to be immutable (replaced by rename, never rewritten), as documented in the
        // README and checked by the size check in `MappedFile::slice`. `len` is the size
        // of the file we opened, read from that same descriptor.
        #[allow(unsafe_code)]
        let mmap = unsafe { memmap2::MmapOptions::new().len(len).map(&file) }
            .map_err(|e| MmapError::io(&path, e))?;
        self.stats.live_files.fetch_add(1, Ordering::Relaxed);
        self.stats
            .live_bytes
            .fetch_add(identity.size, Ordering::Relaxed);
        let live = Arc::new(LiveMapping {
            mmap,
            stats: Arc::clone(&self.stats),
        });
        Ok(MappedFile {
            path,
            identity,
            bytes: Bytes::from_owner(SharedMapping(Arc::clone(&live))),
            mmap: Some(live),
        })
    }

    /// Caches `file`, evicting the least recently used mappings to stay in bounds.
    /// A file larger than the byte bound is served but not cached.
    fn insert(&self, path: &FsPath, file: MappedFile) {
        let size = file.identity.size;
        if size > self.limits.max_bytes || self.limits.max_files == 0 {
            return;
        }
        let mut cache = self.cache.lock();
        cache.clock += 1;
        let clock = cache.clock;
        if let Some(old) = cache.entries.insert(
            path.to_owned(),
            CacheEntry {
                file,
                last_used: clock,
            },
        ) {
            cache.bytes -= old.file.identity.size;
        }
        cache.bytes += size;
        let mut evicted = 0;
        while cache.entries.len() > self.limits.max_files || cache.bytes > self.limits.max_bytes {
            // A linear scan: eviction is rare next to hits, and the cache is small.
            let Some(oldest) = cache
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            if let Some(e) = cache.entries.remove(&oldest) {
                cache.bytes -= e.file.identity.size;
                evicted += 1;
            }
        }
        self.stats.evictions.fetch_add(evicted, Ordering::Relaxed);
        self.stats
            .cached_files
            .store(cache.entries.len() as u64, Ordering::Relaxed);
        self.stats
            .cached_bytes
            .store(cache.bytes, Ordering::Relaxed);
    }

    fn object_meta(location: &Path, identity: &FileIdentity) -> ObjectMeta {
        ObjectMeta {
            location: location.clone(),
            last_modified: identity.modified.into(),
            size: identity.size,
            e_tag: Some(identity.e_tag()),
            version: None,
        }
    }
}

/// Fails with [`MmapError::Changed`] unless `identity` is the version `listed` describes.
pub(super) fn check_listed(
    path: &FsPath,
    identity: &FileIdentity,
    listed: Option<&ObjectMeta>,
) -> Result<(), MmapError> {
    let Some(listed) = listed else {
        return Ok(());
    };
    let modified: DateTime<Utc> = identity.modified.into();
    if identity.size == listed.size && modified == listed.last_modified {
        return Ok(());
    }
    Err(MmapError::Changed {
        path: path.to_owned(),
        reason: format!(
            "it is now {} bytes modified at {modified}, but was listed with {} bytes modified \
             at {}",
            identity.size, listed.size, listed.last_modified
        ),
    })
}

fn check_regular(path: &FsPath, metadata: &Metadata) -> Result<(), MmapError> {
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return Ok(());
    }
    let kind = if file_type.is_dir() {
        "directory"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "device"
    } else {
        "special file"
    };
    Err(MmapError::NotRegular {
        path: path.to_owned(),
        kind,
    })
}

#[async_trait]
impl ObjectStore for MmapStore {
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.version.is_some() {
            // Local files have no versions; let LocalFileSystem say so.
            return self.local.get_opts(location, options).await;
        }
        let file = self.open(location)?;
        let meta = Self::object_meta(location, &file.identity);
        options.check_preconditions(&meta)?;
        let range = match &options.range {
            Some(range) => range
                .as_range(meta.size)
                .map_err(|e| object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                })?,
            None => 0..meta.size,
        };
        let bytes = if options.head {
            Bytes::new()
        } else {
            file.slice(range.clone())?
        };
        // A single chunk: `GetResult::bytes` and object_store's collectors return it as
        // is, so the caller gets the slice of the mapping itself.
        let payload = futures::stream::once(async move { Ok(bytes) }).boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(payload),
            meta,
            range,
            attributes: Attributes::default(),
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        // No coalescing: every range is a slice of the same mapping.
        let file = self.open(location)?;
        Ok(ranges
            .iter()
            .map(|r| file.slice(r.clone()))
            .collect::<Result<_, _>>()?)
    }

    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.local.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.local.put_multipart_opts(location, opts).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.local.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.local.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.local.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.local.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.local.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.local.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests;
