//! How `quiver query` and `quiver tables` write what they receive: the result in the
//! chosen format, the output file published only when complete, progress on stderr.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::util::pretty::pretty_format_batches;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parquet::arrow::ArrowWriter;

use crate::cli::OutputFormat;

/// `--output`: written under a temporary name beside the target, renamed over it when
/// complete, removed if the query fails.
pub(super) struct PendingFile {
    pub(super) file: File,
    temporary: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PendingFile {
    pub(super) fn create(target: &Path) -> anyhow::Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("--output {} names no file", target.display()))?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(".{}.partial", std::process::id()));
        let temporary = target.with_file_name(temporary_name);
        let file = File::create(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        Ok(Self {
            file,
            temporary,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub(super) fn commit(mut self) -> anyhow::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.temporary, &self.target)
            .with_context(|| format!("renaming the result to {}", self.target.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Where result batches go, in the chosen format: the writer is made when the schema
/// arrives (before the first batch, or alone for a result without rows).
pub(super) enum Sink {
    /// The schema has not arrived yet.
    Waiting {
        format: OutputFormat,
        out: Out,
        max_rows: usize,
    },
    /// `table`: the rows kept to print, at most `max_rows` (0: all).
    Table {
        out: Out,
        schema: SchemaRef,
        kept: Vec<RecordBatch>,
        kept_rows: usize,
        max_rows: usize,
    },
    Csv(arrow::csv::Writer<Out>),
    Json(arrow::json::LineDelimitedWriter<Out>),
    Parquet(ArrowWriter<Out>),
}

type Out = Box<dyn Write + Send>;

impl Sink {
    pub(super) fn new(format: OutputFormat, out: Out, max_rows: usize) -> Self {
        Sink::Waiting {
            format,
            out,
            max_rows,
        }
    }

    /// Whether the schema has arrived.
    pub(super) fn started(&self) -> bool {
        !matches!(self, Sink::Waiting { .. })
    }

    /// The writer for a result of `schema` (once: a started sink stays as it is).
    pub(super) fn start(self, schema: &SchemaRef) -> anyhow::Result<Self> {
        let Sink::Waiting {
            format,
            out,
            max_rows,
        } = self
        else {
            return Ok(self);
        };
        Ok(match format {
            OutputFormat::Table => Sink::Table {
                out,
                schema: Arc::clone(schema),
                kept: Vec::new(),
                kept_rows: 0,
                max_rows: if max_rows == 0 { usize::MAX } else { max_rows },
            },
            OutputFormat::Csv => Sink::Csv(
                arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(out),
            ),
            OutputFormat::Json => Sink::Json(arrow::json::LineDelimitedWriter::new(out)),
            OutputFormat::Parquet => {
                Sink::Parquet(ArrowWriter::try_new(out, Arc::clone(schema), None)?)
            }
        })
    }

    pub(super) fn write(&mut self, batch: RecordBatch) -> anyhow::Result<()> {
        match self {
            Sink::Waiting { .. } => bail!("a result batch arrived before its schema"),
            Sink::Table {
                kept,
                kept_rows,
                max_rows,
                ..
            } => {
                let room = max_rows.saturating_sub(*kept_rows);
                if room > 0 {
                    let batch = batch.slice(0, batch.num_rows().min(room));
                    *kept_rows += batch.num_rows();
                    kept.push(batch);
                }
            }
            Sink::Csv(writer) => writer.write(&batch)?,
            Sink::Json(writer) => writer.write(&batch)?,
            Sink::Parquet(writer) => writer.write(&batch)?,
        }
        Ok(())
    }

    /// Writes what is left (the table, the Parquet footer) once `rows` rows arrived.
    pub(super) fn finish(self, rows: u64) -> anyhow::Result<()> {
        match self {
            // No schema ever came: a result of no columns.
            Sink::Waiting { .. } => self.start(&Arc::new(Schema::empty()))?.finish(rows)?,
            Sink::Table {
                mut out,
                schema,
                mut kept,
                kept_rows,
                ..
            } => {
                if kept.is_empty() {
                    kept.push(RecordBatch::new_empty(schema));
                }
                writeln!(out, "{}", pretty_format_batches(&kept)?)?;
                let hidden = rows.saturating_sub(kept_rows as u64);
                if hidden > 0 {
                    writeln!(
                        out,
                        "({hidden} more rows not shown: raise --max-rows, or use --format csv)"
                    )?;
                }
                out.flush()?;
            }
            Sink::Csv(writer) => writer.into_inner().flush()?,
            Sink::Json(mut writer) => {
                writer.finish()?;
                writer.into_inner().flush()?;
            }
            Sink::Parquet(writer) => writer.into_inner()?.flush()?,
        }
        Ok(())
    }
}

/// Rows received and their rate on stderr: live on a terminal, one summary line at the end.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    rows: u64,
}

impl Progress {
    pub(super) fn new(quiet: bool) -> Self {
        let bar = (!quiet).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {human_pos} rows ({per_sec})")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar, rows: 0 }
    }

    pub(super) fn add(&mut self, batch: &RecordBatch) {
        self.rows += batch.num_rows() as u64;
        if let Some(bar) = &self.bar {
            bar.inc(batch.num_rows() as u64);
        }
    }

    /// Clears the live line and prints the summary; returns the rows received.
    pub(super) fn finish(&self, started: Instant) -> u64 {
        let rows = self.rows;
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{rows} rows in {secs:.2}s ({:.0} rows/s)",
                rows as f64 / secs.max(1e-9)
            );
        }
        rows
    }
}

pub(super) fn count_or_unknown(n: i64) -> String {
    if n < 0 { "?".into() } else { n.to_string() }
}

pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub(super) fn indent<const N: usize>(rows: Vec<[String; N]>) -> Vec<[String; N]> {
    rows.into_iter()
        .map(|mut r| {
            r[0] = format!("  {}", r[0]);
            r
        })
        .collect()
}

/// Writes `header` and `rows` as left-aligned columns.
pub(super) fn write_aligned<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", text.join("  ").trim_end())
    };
    line(out, header.to_vec())?;
    for row in rows {
        line(out, row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn columns_align() {
        let mut out = Vec::new();
        let rows = [["requests".to_string(), "10".to_string()]];
        write_aligned(&mut out, ["TABLE", "ROWS"], &rows).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "TABLE     ROWS\nrequests  10\n"
        );
    }

    #[test]
    fn every_format_writes_a_result_without_batches() {
        for format in [OutputFormat::Table, OutputFormat::Csv, OutputFormat::Json] {
            Sink::new(format, Box::new(std::io::sink()), 0)
                .finish(0)
                .unwrap();
        }
    }
}
