use std::os::unix::net::UnixListener;
use std::path::Path as FsPath;

use object_store::{ObjectStoreExt, local::LocalFileSystem};

use super::*;

fn location(path: &FsPath) -> Path {
    Path::from_filesystem_path(path).unwrap()
}

fn write(path: &FsPath, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn store() -> MmapStore {
    MmapStore::new(MmapLimits::default())
}

#[tokio::test]
async fn ranges_match_local_file_system_and_share_one_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.bin");
    write(&path, &pattern(300_000, 7));
    let loc = location(&path);
    let mmap = store();
    let local = LocalFileSystem::new();

    let ranges = [0..10, 4096..200_000, 299_990..300_000];
    let ours = mmap.get_ranges(&loc, &ranges).await.unwrap();
    let theirs = local.get_ranges(&loc, &ranges).await.unwrap();
    assert_eq!(ours, theirs);

    // No copies: every slice points into the same mapping, at its file offset.
    let base = ours[0].as_ptr() as usize;
    assert_eq!(ours[1].as_ptr() as usize - base, 4096);
    assert_eq!(ours[2].as_ptr() as usize - base, 299_990);
    let single = mmap.get_range(&loc, 100..200).await.unwrap();
    assert_eq!(single.as_ptr() as usize - base, 100);

    // Whole-object, suffix and head requests behave like LocalFileSystem's.
    assert_eq!(
        mmap.get(&loc).await.unwrap().bytes().await.unwrap(),
        local.get(&loc).await.unwrap().bytes().await.unwrap()
    );
    let suffix = GetOptions::new().with_range(Some(GetRange::Suffix(8)));
    assert_eq!(
        mmap.get_opts(&loc, suffix.clone())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        local
            .get_opts(&loc, suffix)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    );
    let ours = mmap.head(&loc).await.unwrap();
    let theirs = local.head(&loc).await.unwrap();
    assert_eq!(
        (ours.size, ours.last_modified, ours.e_tag),
        (theirs.size, theirs.last_modified, theirs.e_tag)
    );

    assert_eq!(
        mmap.stats().maps.load(Ordering::Relaxed),
        1,
        "mapped once, then cached"
    );
}

use object_store::GetRange;

#[tokio::test]
async fn zero_length_files_read_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.parquet");
    write(&path, b"");
    let mmap = store();
    let result = mmap.get(&location(&path)).await.unwrap();
    assert_eq!(result.meta.size, 0);
    assert!(result.bytes().await.unwrap().is_empty());
    assert!(
        mmap.get_ranges(&location(&path), std::slice::from_ref(&(0..0)))
            .await
            .unwrap()[0]
            .is_empty()
    );
}

#[tokio::test]
async fn reads_past_the_end_are_errors_not_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.bin");
    write(&path, &pattern(100, 1));
    let err = store()
        .get_ranges(&location(&path), std::slice::from_ref(&(50..150)))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("bytes 50..150 requested but the file has 100 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn a_file_replaced_by_rename_is_mapped_again_and_old_slices_survive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    write(&path, &pattern(10_000, 1));
    let mmap = store();
    let loc = location(&path);
    let old = mmap.get_range(&loc, 0..10_000).await.unwrap();

    // Same size, and possibly the same mtime: only the inode tells them apart.
    let staged = dir.path().join(".t.parquet.tmp");
    write(&staged, &pattern(10_000, 2));
    std::fs::rename(&staged, &path).unwrap();

    let new = mmap.get_range(&loc, 0..10_000).await.unwrap();
    assert_eq!(new, pattern(10_000, 2), "never served stale");
    assert_eq!(
        old,
        pattern(10_000, 1),
        "a slice in use keeps the old version"
    );
    assert_eq!(mmap.stats().maps.load(Ordering::Relaxed), 2);
    assert_eq!(
        mmap.stats().cached_files.load(Ordering::Relaxed),
        1,
        "replaced, not added"
    );
}

#[tokio::test]
async fn a_deleted_file_stays_readable_through_slices_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.parquet");
    write(&path, &pattern(50_000, 3));
    let mmap = store();
    let loc = location(&path);
    let slice = mmap.get_range(&loc, 1000..50_000).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(&slice[..], &pattern(50_000, 3)[1000..]);
    let err = mmap.get_range(&loc, 0..10).await.unwrap_err();
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn the_cache_is_bounded_by_count_and_bytes_without_invalidating_slices() {
    let dir = tempfile::tempdir().unwrap();
    let mmap = MmapStore::new(MmapLimits {
        max_files: 2,
        max_bytes: 25_000,
    });
    let mut held = vec![];
    for i in 0..4u8 {
        let path = dir.path().join(format!("{i}.bin"));
        write(&path, &pattern(10_000, i));
        held.push(mmap.get_range(&location(&path), 0..10_000).await.unwrap());
    }
    let stats = mmap.stats();
    assert_eq!(stats.cached_files.load(Ordering::Relaxed), 2);
    assert_eq!(stats.cached_bytes.load(Ordering::Relaxed), 20_000);
    assert_eq!(stats.evictions.load(Ordering::Relaxed), 2);
    // Evicted mappings live on while their slices do.
    assert_eq!(stats.live_files.load(Ordering::Relaxed), 4);
    for (i, slice) in held.iter().enumerate() {
        assert_eq!(slice, &pattern(10_000, i as u8));
    }
    drop(held);
    assert_eq!(
        stats.live_files.load(Ordering::Relaxed),
        2,
        "unmapped when the last slice went"
    );
    assert_eq!(stats.live_bytes.load(Ordering::Relaxed), 20_000);

    // A byte bound: a third 10 kB file would exceed 25 kB, so the least recent goes.
    let path = dir.path().join("big.bin");
    write(&path, &pattern(30_000, 9));
    assert_eq!(
        mmap.get_range(&location(&path), 0..5).await.unwrap(),
        pattern(5, 9)
    );
    assert_eq!(
        stats.cached_files.load(Ordering::Relaxed),
        2,
        "larger than the bound: not cached"
    );
}

#[tokio::test]
async fn directories_sockets_and_fifos_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let mmap = store();

    let sub = dir.path().join("sub.parquet");
    std::fs::create_dir(&sub).unwrap();
    let err = mmap.get_range(&location(&sub), 0..1).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("is a directory, not a regular file"),
        "{err}"
    );

    let socket = dir.path().join("s.parquet");
    let _listener = UnixListener::bind(&socket).unwrap();
    let err = mmap.get_range(&location(&socket), 0..1).await.unwrap_err();
    assert!(
        err.to_string().contains("is a socket, not a regular file"),
        "{err}"
    );

    let fifo = dir.path().join("f.parquet");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    // Opening a FIFO for reading would block until a writer came: it must not be opened.
    let err = mmap.get_range(&location(&fifo), 0..1).await.unwrap_err();
    assert!(
        err.to_string().contains("is a FIFO, not a regular file"),
        "{err}"
    );
}

#[tokio::test]
async fn unreadable_files_are_permission_errors() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret.parquet");
    write(&path, b"PAR1");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    if File::open(&path).is_ok() {
        // Root reads anything: this process cannot see the error it would test.
        eprintln!("skipped: running with CAP_DAC_OVERRIDE");
        return;
    }
    let err = store().get_range(&location(&path), 0..4).await.unwrap_err();
    assert!(
        matches!(err, object_store::Error::PermissionDenied { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn open_listed_refuses_a_changed_file_before_mapping_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("listed.parquet");
    write(&path, &pattern(1000, 1));
    let mmap = store();
    let listed = LocalFileSystem::new().head(&location(&path)).await.unwrap();
    assert_eq!(
        mmap.open_listed(&listed).unwrap().slice(0..1000).unwrap(),
        pattern(1000, 1)
    );

    let staged = dir.path().join("staged");
    write(&staged, &pattern(2000, 2));
    std::fs::rename(&staged, &path).unwrap();
    let maps = mmap.stats().maps.load(Ordering::Relaxed);
    let err = mmap.open_listed(&listed).unwrap_err();
    assert!(matches!(err, MmapError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("now 2000 bytes"), "{err}");
    assert_eq!(
        mmap.stats().maps.load(Ordering::Relaxed),
        maps,
        "nothing mapped"
    );
}
