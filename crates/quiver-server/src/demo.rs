//! `quiver demo` and the --demo cache: generation with a progress bar, published by rename.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

/// Bumped when the generator changes, so an old cache is not served as the new dataset.
const DEMO_VERSION: u32 = 1;

/// Writes the dataset into `out` with a progress bar.
pub fn write(out: &Path, rows: u64) -> anyhow::Result<()> {
    let bar = ProgressBar::new(rows).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {human_pos}/{human_len} rows ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("generating demo data");
    quiver::demo::generate(out, rows, &mut |n| bar.inc(n))
        .with_context(|| format!("cannot write the demo dataset to {}", out.display()))?;
    bar.finish_with_message("demo data written");
    Ok(())
}

/// The cached dataset of `rows` rows under `cache`, generated on first use.
pub fn ensure(cache: &Path, rows: u64) -> anyhow::Result<PathBuf> {
    let dir = cache.join(format!("demo-v{DEMO_VERSION}-{rows}"));
    if dir.is_dir() {
        tracing::info!(dir = %dir.display(), "using cached demo data");
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    // Generate beside the final name and rename: an interrupted run leaves no half dataset.
    let tmp = cache.join(format!(
        ".demo-v{DEMO_VERSION}-{rows}.{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp, rows)?;
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot create {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "demo data ready");
    Ok(dir)
}
