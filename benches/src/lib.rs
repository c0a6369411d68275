//! Benchmark harness for Quiver.
//!
//! Speed and memory are reported as ratios against a baseline run in the same process,
//! never asserted in tests. Timings interleave the systems compared, run by run, so that
//! drift on a shared machine hits both alike, and report medians.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The demo dataset with `rows` request rows, generated once into the user's cache.
pub fn demo_data(rows: u64) -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("quiver");
    let dir = base.join(format!("demo-v1-{rows}"));
    if dir.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&base)?;
    let staging = base.join(format!(".demo-v1-{rows}.{}", std::process::id()));
    eprintln!("generating {rows} demo rows into {}", dir.display());
    quiver::demo::generate(&staging, rows, &mut |_| {})?;
    std::fs::rename(&staging, &dir)?;
    Ok(dir)
}

/// Median of `samples` (which it sorts).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Runs `f` and returns how long it took.
pub async fn time<F, T>(f: F) -> anyhow::Result<Duration>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    f.await?;
    Ok(start.elapsed())
}
