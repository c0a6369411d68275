// A list of one range is what these reads ask for, not a typo for a range of values.
#![allow(clippy::single_range_in_vec_init)]

use std::sync::atomic::AtomicUsize;

use super::*;

/// An object of `len` bytes whose byte `i` is `i % 251`, served by a fetch that counts
/// its calls and the bytes it returns.
struct FakeObject {
    version: ObjectVersion,
    data: Bytes,
    calls: Arc<AtomicUsize>,
    fetched: Arc<AtomicU64>,
}

impl FakeObject {
    fn new(len: usize) -> Self {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        Self {
            version: ObjectVersion {
                url: "s3://bucket/table/part-0.parquet".into(),
                version: "\"etag-1\"".into(),
                size: len as u64,
            },
            data: Bytes::from(data),
            calls: Arc::default(),
            fetched: Arc::default(),
        }
    }

    fn fetch(&self) -> Fetch {
        let data = self.data.clone();
        let calls = Arc::clone(&self.calls);
        let fetched = Arc::clone(&self.fetched);
        Arc::new(move |range: Range<u64>| {
            calls.fetch_add(1, Ordering::SeqCst);
            fetched.fetch_add(range.end - range.start, Ordering::SeqCst);
            let bytes = data.slice(range.start as usize..range.end as usize);
            async move {
                // Let concurrent readers find the fetch in flight.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(bytes)
            }
            .boxed()
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn options(dir: &Path, max_bytes: u64, block_size: u64) -> CacheOptions {
    CacheOptions {
        dir: dir.to_owned(),
        max_bytes,
        block_size,
        max_maps: 1024,
    }
}

fn block_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for object in std::fs::read_dir(dir.join("v1/blocks")).unwrap() {
        for file in std::fs::read_dir(object.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files
}

#[tokio::test]
async fn ranges_across_blocks_equal_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(BlockCache::open(options(dir.path(), 1 << 20, 100)).unwrap());
    let object = FakeObject::new(1050);
    let ranges = [
        0..1,
        95..105,
        100..200,
        1000..1050,
        7..7,
        0..1050,
        999..1000,
    ];
    let (got, from_store) = cache
        .read(&object.version, &ranges, object.fetch())
        .await
        .unwrap();
    for (range, bytes) in ranges.iter().zip(&got) {
        assert_eq!(
            bytes,
            &object.data.slice(range.start as usize..range.end as usize)
        );
    }
    // Eleven blocks (the last one short), each fetched once, in runs of at most 16.
    assert_eq!(from_store, 1050);
    assert_eq!(object.calls(), 1);
    assert_eq!(block_files(dir.path()).len(), 11);
    assert_eq!(cache.stats().bytes.load(Ordering::Relaxed), 1050);

    // Warm: no fetch, the same bytes.
    let (again, from_store) = cache
        .read(&object.version, &ranges, object.fetch())
        .await
        .unwrap();
    assert_eq!(again, got);
    assert_eq!(from_store, 0);
    assert_eq!(object.calls(), 1);

    // Past the end of the listed size: the object is not what was listed.
    let err = cache
        .read(&object.version, &[1000..1051], object.fetch())
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Changed { .. }), "{err}");
}

#[tokio::test]
async fn a_range_inside_one_block_is_a_slice_of_its_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(BlockCache::open(options(dir.path(), 1 << 20, 4096)).unwrap());
    let object = FakeObject::new(10_000);
    let fetch = object.fetch();
    let (a, _) = cache
        .read(&object.version, &[10..20], Arc::clone(&fetch))
        .await
        .unwrap();
    let (b, _) = cache.read(&object.version, &[10..20], fetch).await.unwrap();
    // Both point into the same mapped block: no copy was made.
    assert_eq!(a[0].as_ptr(), b[0].as_ptr());
}

#[tokio::test]
async fn concurrent_reads_of_a_missing_block_fetch_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(BlockCache::open(options(dir.path(), 1 << 20, 1000)).unwrap());
    let object = Arc::new(FakeObject::new(4000));
    // Sixteen reads polled together: each finds the block missing or already in flight.
    let reads = (0..16u64).map(|i| {
        let (cache, object) = (Arc::clone(&cache), Arc::clone(&object));
        async move {
            let start = (i * 37) % 900;
            cache
                .read(&object.version, &[start..start + 50], object.fetch())
                .await
                .unwrap()
        }
    });
    for (bytes, _) in futures::future::join_all(reads).await {
        assert_eq!(bytes[0].len(), 50);
    }
    assert_eq!(object.calls(), 1);
    assert_eq!(object.fetched.load(Ordering::SeqCst), 1000);
}

#[tokio::test]
async fn a_fetch_every_reader_abandoned_is_dropped_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(BlockCache::open(options(dir.path(), 1 << 20, 1000)).unwrap());
    let object = FakeObject::new(4000);
    // A read cancelled while its GET is in flight (the fake fetch sleeps 20 ms).
    let read = cache.read(&object.version, &[0..4000], object.fetch());
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(1), read)
            .await
            .is_err()
    );
    assert_eq!(object.calls(), 1);
    // Nothing holds the fetch now: the next read starts its own instead of waiting on
    // (or keeping alive) the abandoned one.
    let (bytes, from_store) = cache
        .read(&object.version, &[0..4000], object.fetch())
        .await
        .unwrap();
    assert_eq!(bytes[0], object.data);
    assert_eq!(from_store, 4000);
    assert_eq!(object.calls(), 2);
    assert!(
        cache
            .inflight
            .lock()
            .values()
            .all(|run| run.upgrade().is_none())
    );
}

#[tokio::test]
async fn eviction_keeps_the_bound_and_reads_in_flight_keep_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(BlockCache::open(options(dir.path(), 300, 100)).unwrap());
    let object = FakeObject::new(1000);
    let (held, _) = cache
        .read(&object.version, &[0..100], object.fetch())
        .await
        .unwrap();
    for start in (100..1000).step_by(100) {
        cache
            .read(&object.version, &[start..start + 100], object.fetch())
            .await
            .unwrap();
        assert!(cache.stats().bytes.load(Ordering::Relaxed) <= 300);
        assert!(block_files(dir.path()).len() <= 3);
    }
    assert_eq!(cache.stats().evictions.load(Ordering::Relaxed), 7);
    // The first block was evicted (its file unlinked), but the bytes a reader holds
    // are still its mapping, intact.
    assert_eq!(held[0], object.data.slice(0..100));

    // Least recently used goes first: touch block 7, then add block 0 again.
    cache
        .read(&object.version, &[700..701], object.fetch())
        .await
        .unwrap();
    let calls = object.calls();
    cache
        .read(&object.version, &[0..1], object.fetch())
        .await
        .unwrap();
    assert_eq!(object.calls(), calls + 1);
    cache
        .read(&object.version, &[700..701], object.fetch())
        .await
        .unwrap();
    assert_eq!(
        object.calls(),
        calls + 1,
        "block 7, used after block 8, outlived it"
    );
}

#[tokio::test]
async fn a_restart_reuses_the_cache_and_never_serves_a_damaged_block() {
    let dir = tempfile::tempdir().unwrap();
    let object = FakeObject::new(500);
    {
        let cache = Arc::new(BlockCache::open(options(dir.path(), 1 << 20, 100)).unwrap());
        cache
            .read(&object.version, &[0..500], object.fetch())
            .await
            .unwrap();
    }
    assert_eq!(object.calls(), 1);
    let mut files = block_files(dir.path());
    files.sort();
    // A crash mid-write leaves a temporary file; a power cut can leave a block whose
    // bytes are not what its name says, or a short one.
    std::fs::write(dir.path().join("v1/tmp/0123456789abcdef"), b"half a block").unwrap();
    std::fs::write(&files[0], vec![0u8; 100]).unwrap();
    std::fs::write(&files[1], b"short").unwrap();

    let cache = Arc::new(BlockCache::open(options(dir.path(), 1 << 20, 100)).unwrap());
    assert_eq!(
        std::fs::read_dir(dir.path().join("v1/tmp"))
            .unwrap()
            .count(),
        0
    );
    let (bytes, from_store) = cache
        .read(&object.version, &[0..500], object.fetch())
        .await
        .unwrap();
    assert_eq!(bytes[0], object.data);
    // Blocks 2-4 came from disk; the two damaged ones were fetched again (one run).
    assert_eq!(from_store, 200);
    assert_eq!(object.calls(), 2);
    assert_eq!(cache.stats().corrupt.load(Ordering::Relaxed), 1);
    assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_new_version_of_an_object_has_its_own_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(BlockCache::open(options(dir.path(), 1 << 20, 100)).unwrap());
    let old = FakeObject::new(300);
    cache
        .read(&old.version, &[0..300], old.fetch())
        .await
        .unwrap();
    let mut new = FakeObject::new(300);
    new.version.version = "\"etag-2\"".into();
    new.data = Bytes::from(vec![7u8; 300]);
    let (bytes, _) = cache
        .read(&new.version, &[0..300], new.fetch())
        .await
        .unwrap();
    assert_eq!(bytes[0], new.data);
    assert_eq!(new.calls(), 1);
}

#[test]
fn one_process_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = BlockCache::open(options(dir.path(), 1 << 20, 100)).unwrap();
    let err = BlockCache::open(options(dir.path(), 1 << 20, 100)).unwrap_err();
    assert!(err.to_string().contains("another quiver process"), "{err}");
}

#[test]
fn block_names_round_trip() {
    assert_eq!(
        parse_block_name("12-1048576-00ff00ff00ff00ff"),
        Some((12, 1 << 20, 0x00ff00ff00ff00ff))
    );
    assert_eq!(parse_block_name("12-1048576"), None);
    assert_eq!(parse_block_name("x-1-2"), None);
    let key = ObjectVersion {
        url: "s3://b/k".into(),
        version: "e".into(),
        size: 1,
    }
    .key();
    assert_eq!(parse_key(&hex(&key)), Some(key));
    assert_eq!(parse_key("zz"), None);
}
