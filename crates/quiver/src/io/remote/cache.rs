//! The local cache of remote bytes: object versions cut into aligned blocks, each block a
//! file on local disk, served as slices of its memory map.
//!
//! ```text
//!  read(object version, ranges)
//!     │ blocks covering the ranges: index = offset / block size
//!     ├─ in the index ──────────────► mapping of DIR/v1/<object key>/<index>-<len>-<xxh64>
//!     ├─ being fetched by another read ─► wait for that fetch (single flight)
//!     └─ missing: consecutive blocks in one ranged GET (If-Match: ETag)
//!            └─ each block: write DIR/v1/tmp/<random>, rename into place, map, index
//!  ranges: a range inside one block is a slice of that block's mapping (no copy);
//!          a range across blocks is assembled from them (one copy)
//! ```
//!
//! - **Keys.** A block belongs to one object *version*: the key is a digest of the object
//!   URL, its ETag and its size, so a replaced object has new blocks and never serves
//!   stale bytes; the old blocks age out.
//! - **Crash safety.** A block is written under a temporary name and renamed into place
//!   only when complete, and its name carries its length and xxHash64. Blocks found at
//!   start-up are verified (length, then checksum) the first time they are mapped; one that
//!   fails is deleted and fetched again, never served. Temporary files left by a crash are
//!   deleted at start-up. No fsync: a block lost or torn by a power cut fails its checksum.
//! - **Bounds.** The blocks on disk stay under `max_bytes`, least recently used evicted
//!   first. Evicting unlinks the file: a query holding its mapping keeps reading it (the
//!   inode lives until the last mapping goes). At most `max_maps` blocks stay mapped
//!   between reads (each mapping is one of `vm.max_map_count`).
//! - **One process per directory**: an exclusive lock on `DIR/v1/lock`.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::Hasher;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, Shared, WeakShared};
use futures::{FutureExt, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use twox_hash::XxHash64;

use super::RemoteError;

/// Consecutive missing blocks fetched by one GET at most.
const MAX_RUN_BLOCKS: u64 = 16;
/// GETs one read issues at once.
const FETCH_CONCURRENCY: usize = 8;

/// Where the cache lives and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// The cache directory (blocks go under `v1/`).
    pub dir: PathBuf,
    /// Most bytes of blocks kept on disk.
    pub max_bytes: u64,
    /// Block size: the unit fetched, stored and evicted.
    pub block_size: u64,
    /// Most blocks kept mapped between reads.
    pub max_maps: usize,
}

/// One version of a remote object: what cached bytes belong to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    /// `s3://bucket/key`.
    pub url: String,
    /// The ETag as listed (or the modification time, for stores without ETags).
    pub version: String,
    /// Size in bytes as listed.
    pub size: u64,
}

/// The digest naming an object version's blocks.
type ObjectKey = [u8; 16];

impl ObjectVersion {
    fn key(&self) -> ObjectKey {
        let mut hasher = Sha256::new();
        for part in [self.url.as_bytes(), self.version.as_bytes()] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.update(self.size.to_le_bytes());
        let digest = hasher.finalize();
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BlockId {
    object: ObjectKey,
    index: u64,
}

/// Counters and gauges of the cache, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Block reads served from the cache.
    pub hits: AtomicU64,
    /// Block reads that had to fetch (or wait for a fetch).
    pub misses: AtomicU64,
    /// Blocks evicted to stay under the size bound.
    pub evictions: AtomicU64,
    /// Bytes of blocks on disk.
    pub bytes: AtomicU64,
    /// The size bound.
    pub limit: AtomicU64,
    /// Blocks on disk that failed verification and were dropped.
    pub corrupt: AtomicU64,
}

struct Entry {
    path: PathBuf,
    len: u64,
    checksum: u64,
    last_used: u64,
    /// Written by this process, or checked since start-up.
    verified: bool,
    /// The block's mapping, while it is among the `max_maps` most recent.
    map: Option<Bytes>,
}

#[derive(Default)]
struct Index {
    entries: HashMap<BlockId, Entry>,
    /// Least recently used first.
    lru: BTreeMap<u64, BlockId>,
    bytes: u64,
    clock: u64,
    mapped: usize,
}

impl Index {
    fn touch(&mut self, id: BlockId) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.entries.get_mut(&id) {
            self.lru.remove(&entry.last_used);
            entry.last_used = clock;
            self.lru.insert(clock, id);
        }
    }

    fn remove(&mut self, id: &BlockId) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.lru.remove(&entry.last_used);
        self.bytes -= entry.len;
        if entry.map.is_some() {
            self.mapped -= 1;
        }
        Some(entry)
    }
}

/// A shared fetch of consecutive blocks: every reader that needs one of them awaits it.
type RunFuture = Shared<BoxFuture<'static, Result<Arc<Vec<(u64, Bytes)>>, RemoteError>>>;

/// Fetches in flight are indexed weakly: when every reader of a fetch has gone (its
/// queries cancelled), the fetch is dropped, its GET aborted and its bytes freed, instead
/// of living on in the index until some later read happens to need the same blocks.
type RunRef = WeakShared<BoxFuture<'static, Result<Arc<Vec<(u64, Bytes)>>, RemoteError>>>;

/// Dead entries of the in-flight index (fetches abandoned by all their readers) are swept
/// once it holds this many.
const INFLIGHT_SWEEP: usize = 4096;

/// Fetches a byte range of the object version being read, from the store.
pub type Fetch =
    Arc<dyn Fn(Range<u64>) -> BoxFuture<'static, Result<Bytes, RemoteError>> + Send + Sync>;

/// The block cache; see the module documentation.
pub struct BlockCache {
    blocks: PathBuf,
    tmp: PathBuf,
    options: CacheOptions,
    index: Mutex<Index>,
    inflight: Mutex<HashMap<BlockId, RunRef>>,
    stats: Arc<CacheStats>,
    /// Holds the directory's lock for the life of the cache.
    _lock: File,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("options", &self.options)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl BlockCache {
    /// Opens (or creates) the cache in `options.dir`, takes its lock, deletes temporary
    /// files left by a crash and indexes the blocks already there, evicting down to the
    /// bound. Blocking: call at start-up.
    pub fn open(options: CacheOptions) -> Result<Self, RemoteError> {
        let root = options.dir.join("v1");
        let blocks = root.join("blocks");
        let tmp = root.join("tmp");
        let io = |path: &Path, e: std::io::Error| RemoteError::Cache {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(&blocks).map_err(|e| io(&blocks, e))?;
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let lock_path = root.join("lock");
        let lock = File::create(&lock_path).map_err(|e| io(&lock_path, e))?;
        if lock.try_lock().is_err() {
            return Err(RemoteError::Cache {
                path: options.dir.display().to_string(),
                message: "another quiver process uses this cache directory; give each server \
                          its own --cache-dir"
                    .into(),
            });
        }

        let mut found = Vec::new();
        for object_dir in std::fs::read_dir(&blocks).map_err(|e| io(&blocks, e))? {
            let object_dir = object_dir.map_err(|e| io(&blocks, e))?.path();
            let Some(object) = object_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_key)
            else {
                let _ = std::fs::remove_dir_all(&object_dir);
                continue;
            };
            let Ok(files) = std::fs::read_dir(&object_dir) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let parsed = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_block_name);
                let (Some((index, len, checksum)), Ok(meta)) = (parsed, file.metadata()) else {
                    let _ = std::fs::remove_file(&path);
                    continue;
                };
                let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((used, BlockId { object, index }, path, len, checksum));
            }
        }
        // Oldest first, so the clock orders them by when they were last written.
        found.sort_by_key(|(used, ..)| *used);
        let stats = Arc::new(CacheStats::default());
        stats.limit.store(options.max_bytes, Ordering::Relaxed);
        let cache = Self {
            blocks,
            tmp,
            options,
            index: Mutex::default(),
            inflight: Mutex::default(),
            stats,
            _lock: lock,
        };
        let mut evicted = Vec::new();
        {
            let mut index = cache.index.lock();
            for (_, id, path, len, checksum) in found {
                let entry = Entry {
                    path,
                    len,
                    checksum,
                    last_used: 0,
                    verified: false,
                    map: None,
                };
                evicted.extend(cache.insert(&mut index, id, entry));
            }
        }
        for path in evicted {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(
            dir = %cache.options.dir.display(),
            blocks = cache.index.lock().entries.len(),
            bytes = cache.stats.bytes.load(Ordering::Relaxed),
            limit = cache.options.max_bytes,
            "object cache opened"
        );
        Ok(cache)
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.options.block_size
    }

    /// `ranges` of `object`, from cached blocks where present and through `fetch`
    /// (one GET per run of missing blocks) where not. Also returns how many of the
    /// bytes came from the store in this call.
    pub async fn read(
        self: &Arc<Self>,
        object: &ObjectVersion,
        ranges: &[Range<u64>],
        fetch: Fetch,
    ) -> Result<(Vec<Bytes>, u64), RemoteError> {
        let block_size = self.options.block_size;
        for r in ranges {
            if r.start > r.end || r.end > object.size {
                return Err(RemoteError::Changed {
                    url: object.url.clone(),
                    reason: format!(
                        "bytes {}..{} requested of an object listed with {} bytes",
                        r.start, r.end, object.size
                    ),
                });
            }
        }
        let mut needed: Vec<u64> = ranges
            .iter()
            .filter(|r| r.start < r.end)
            .flat_map(|r| r.start / block_size..=(r.end - 1) / block_size)
            .collect();
        needed.sort_unstable();
        needed.dedup();
        let key = object.key();

        let mut blocks: HashMap<u64, Bytes> = HashMap::with_capacity(needed.len());
        let mut missing = Vec::new();
        for &index in &needed {
            match self.lookup(BlockId { object: key, index }) {
                Some(bytes) => {
                    blocks.insert(index, bytes);
                }
                None => missing.push(index),
            }
        }
        self.stats
            .hits
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        self.stats
            .misses
            .fetch_add(missing.len() as u64, Ordering::Relaxed);

        let mut fetched_bytes = 0;
        if !missing.is_empty() {
            let runs = self.runs(object, key, &missing, &fetch, &mut fetched_bytes);
            let results: Vec<Arc<Vec<(u64, Bytes)>>> = futures::stream::iter(runs)
                .buffer_unordered(FETCH_CONCURRENCY)
                .try_collect()
                .await?;
            for run in results {
                for (index, bytes) in run.iter() {
                    blocks.insert(*index, bytes.clone());
                }
            }
        }

        let slices = ranges
            .iter()
            .map(|r| assemble(&blocks, block_size, r, &object.url))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((slices, fetched_bytes))
    }

    /// The shared fetches that cover `missing`: ones already running, and new ones for
    /// runs of consecutive blocks nobody is fetching. `fetched` gains the bytes of the
    /// new ones.
    fn runs(
        self: &Arc<Self>,
        object: &ObjectVersion,
        key: ObjectKey,
        missing: &[u64],
        fetch: &Fetch,
        fetched: &mut u64,
    ) -> Vec<RunFuture> {
        let mut inflight = self.inflight.lock();
        if inflight.len() >= INFLIGHT_SWEEP {
            inflight.retain(|_, run| run.upgrade().is_some());
        }
        let mut futures: Vec<RunFuture> = Vec::new();
        let mut mine: Vec<u64> = Vec::new();
        for &index in missing {
            let running = inflight
                .get(&BlockId { object: key, index })
                .and_then(WeakShared::upgrade);
            match running {
                // Only once per shared run, however many of its blocks we need.
                Some(run) if !futures.iter().any(|f| f.ptr_eq(&run)) => futures.push(run),
                Some(_) => {}
                None => mine.push(index),
            }
        }
        let mut start = 0;
        while start < mine.len() {
            let mut end = start + 1;
            while end < mine.len()
                && mine[end] == mine[end - 1] + 1
                && (end - start) < MAX_RUN_BLOCKS as usize
            {
                end += 1;
            }
            let run = &mine[start..end];
            let first = run[0] * self.options.block_size;
            let last = ((run[run.len() - 1] + 1) * self.options.block_size).min(object.size);
            *fetched += last - first;
            let future = Arc::clone(self)
                .fetch_run(object.clone(), key, first..last, Arc::clone(fetch))
                .boxed()
                .shared();
            if let Some(weak) = future.downgrade() {
                for &index in run {
                    inflight.insert(BlockId { object: key, index }, weak.clone());
                }
            }
            futures.push(future);
            start = end;
        }
        futures
    }

    /// Fetches `range` (whole blocks) with one GET, stores each block and returns them.
    async fn fetch_run(
        self: Arc<Self>,
        object: ObjectVersion,
        key: ObjectKey,
        range: Range<u64>,
        fetch: Fetch,
    ) -> Result<Arc<Vec<(u64, Bytes)>>, RemoteError> {
        let block_size = self.options.block_size;
        let first = range.start / block_size;
        let result = fetch(range.clone()).await.and_then(|bytes| {
            if bytes.len() as u64 != range.end - range.start {
                return Err(RemoteError::Changed {
                    url: object.url.clone(),
                    reason: format!(
                        "the store returned {} bytes for bytes {}..{}",
                        bytes.len(),
                        range.start,
                        range.end
                    ),
                });
            }
            let mut blocks = Vec::new();
            let mut offset = 0;
            let mut index = first;
            while offset < bytes.len() {
                let end = (offset + block_size as usize).min(bytes.len());
                let block = bytes.slice(offset..end);
                blocks.push((index, self.store(BlockId { object: key, index }, block)));
                offset = end;
                index += 1;
            }
            Ok(Arc::new(blocks))
        });
        // Whoever completes the fetch clears it, so the next read finds the index.
        let mut inflight = self.inflight.lock();
        let last = first + (range.end - range.start).div_ceil(block_size);
        for index in first..last {
            inflight.remove(&BlockId { object: key, index });
        }
        result
    }

    /// Writes a fetched block to the cache and returns the bytes to serve: the block's
    /// mapping when it was stored, the fetched bytes when it could not be (a full disk
    /// costs the cache, not the query).
    fn store(&self, id: BlockId, block: Bytes) -> Bytes {
        if block.len() as u64 > self.options.max_bytes {
            return block;
        }
        let checksum = checksum(&block);
        let dir = self.blocks.join(hex(&id.object));
        let path = dir.join(format!("{}-{}-{checksum:016x}", id.index, block.len()));
        let tmp = self.tmp.join(format!("{:016x}", rand::random::<u64>()));
        let written = (|| {
            std::fs::create_dir_all(&dir)?;
            let mut file = File::create(&tmp)?;
            file.write_all(&block)?;
            drop(file);
            std::fs::rename(&tmp, &path)?;
            map_file(&path, block.len() as u64)
        })();
        let map = match written {
            Ok(map) => map,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(path = %path.display(), error = %e, "cannot write to the object cache; serving the block uncached");
                return block;
            }
        };
        let entry = Entry {
            path,
            len: block.len() as u64,
            checksum,
            last_used: 0,
            verified: true,
            map: Some(map.clone()),
        };
        let evicted = {
            let mut index = self.index.lock();
            self.insert(&mut index, id, entry)
        };
        for path in evicted {
            let _ = std::fs::remove_file(path);
        }
        map
    }

    /// Adds `entry` as the most recently used block and evicts down to the bounds.
    /// Returns the files to delete (outside the lock).
    fn insert(&self, index: &mut Index, id: BlockId, mut entry: Entry) -> Vec<PathBuf> {
        let mut evicted = Vec::new();
        if let Some(old) = index.remove(&id)
            && old.path != entry.path
        {
            evicted.push(old.path);
        }
        index.clock += 1;
        entry.last_used = index.clock;
        index.bytes += entry.len;
        if entry.map.is_some() {
            index.mapped += 1;
        }
        index.lru.insert(entry.last_used, id);
        index.entries.insert(id, entry);
        while index.bytes > self.options.max_bytes {
            let Some((_, oldest)) = index.lru.first_key_value().map(|(k, v)| (*k, *v)) else {
                break;
            };
            if let Some(e) = index.remove(&oldest) {
                evicted.push(e.path);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.unmap_excess(index);
        self.stats.bytes.store(index.bytes, Ordering::Relaxed);
        evicted
    }

    /// Drops the mappings of the least recently used blocks beyond `max_maps` (their
    /// files stay; readers holding slices keep them mapped).
    fn unmap_excess(&self, index: &mut Index) {
        if index.mapped <= self.options.max_maps {
            return;
        }
        let order: Vec<BlockId> = index.lru.values().copied().collect();
        for id in order {
            if index.mapped <= self.options.max_maps {
                break;
            }
            if let Some(entry) = index.entries.get_mut(&id)
                && entry.map.take().is_some()
            {
                index.mapped -= 1;
            }
        }
    }

    /// A cached block's bytes, mapping (and on first use, verifying) it if needed.
    fn lookup(&self, id: BlockId) -> Option<Bytes> {
        let (path, len, checksum, verified) = {
            let mut index = self.index.lock();
            let entry = index.entries.get(&id)?;
            if let Some(map) = &entry.map {
                let map = map.clone();
                index.touch(id);
                return Some(map);
            }
            (
                entry.path.clone(),
                entry.len,
                entry.checksum,
                entry.verified,
            )
        };
        // Map (and check) outside the lock: it is a system call, and a first check
        // reads the whole block.
        let mapped = map_file(&path, len).ok().filter(|map| {
            verified || {
                let ok = self::checksum(map) == checksum;
                if !ok {
                    tracing::warn!(path = %path.display(), "dropping a corrupt object cache block");
                    self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                ok
            }
        });
        let mut index = self.index.lock();
        let Some(map) = mapped else {
            // Gone (deleted from outside, or evicted meanwhile) or corrupt: fetch again.
            if index.entries.get(&id).is_some_and(|e| e.path == path) {
                index.remove(&id);
                self.stats.bytes.store(index.bytes, Ordering::Relaxed);
                drop(index);
                let _ = std::fs::remove_file(&path);
            }
            return None;
        };
        if let Some(entry) = index.entries.get_mut(&id)
            && entry.path == path
        {
            entry.verified = true;
            if entry.map.is_none() {
                entry.map = Some(map.clone());
                index.mapped += 1;
            }
            index.touch(id);
            self.unmap_excess(&mut index);
        }
        Some(map)
    }
}

/// The bytes of `range` from the blocks that cover it.
fn assemble(
    blocks: &HashMap<u64, Bytes>,
    block_size: u64,
    range: &Range<u64>,
    url: &str,
) -> Result<Bytes, RemoteError> {
    if range.start == range.end {
        return Ok(Bytes::new());
    }
    let first = range.start / block_size;
    let last = (range.end - 1) / block_size;
    let block = |index: u64| {
        blocks.get(&index).ok_or_else(|| RemoteError::Changed {
            url: url.to_owned(),
            reason: format!("block {index} is missing"),
        })
    };
    let piece = |index: u64| -> Result<Bytes, RemoteError> {
        let bytes = block(index)?;
        let base = index * block_size;
        let start = range.start.max(base) - base;
        let end = range.end.min(base + block_size) - base;
        if end as usize > bytes.len() {
            return Err(RemoteError::Changed {
                url: url.to_owned(),
                reason: format!("block {index} is {} bytes, short of {end}", bytes.len()),
            });
        }
        Ok(bytes.slice(start as usize..end as usize))
    };
    if first == last {
        return piece(first);
    }
    let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
    for index in first..=last {
        out.extend_from_slice(&piece(index)?);
    }
    Ok(out.freeze())
}

/// Maps a block file read-only, checking its length.
fn map_file(path: &Path, len: u64) -> std::io::Result<Bytes> {
    let file = File::open(path)?;
    let actual = file.metadata()?.len();
    if actual != len || len == 0 {
        return Err(std::io::Error::other(format!(
            "{} has {actual} bytes, expected {len}",
            path.display()
        )));
    }
    // SAFETY: block files are written whole under a temporary name and renamed into
    // place, never modified afterwards; eviction unlinks them, which leaves mappings of
    // the old inode valid. Only a process writing into the cache directory behind our
    // back (which holds a lock on it) could change the bytes under the mapping.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(&file)? };
    Ok(Bytes::from_owner(map))
}

fn checksum(bytes: &[u8]) -> u64 {
    let mut hasher = XxHash64::with_seed(0);
    hasher.write(bytes);
    hasher.finish()
}

fn hex(key: &ObjectKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_key(name: &str) -> Option<ObjectKey> {
    if name.len() != 32 {
        return None;
    }
    let mut key = [0; 16];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// `<index>-<len>-<xxh64 hex>`.
fn parse_block_name(name: &str) -> Option<(u64, u64, u64)> {
    let mut parts = name.split('-');
    let index = parts.next()?.parse().ok()?;
    let len = parts.next()?.parse().ok()?;
    let checksum = u64::from_str_radix(parts.next()?, 16).ok()?;
    parts.next().is_none().then_some((index, len, checksum))
}

#[cfg(test)]
mod tests;
