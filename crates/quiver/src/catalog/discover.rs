//! Finding a table's data files (on disk, or in an S3 listing) and reading Hive partition
//! values from their paths.
//!
//! Writers publish files by write-then-rename, and engines leave markers and staging
//! directories next to the data (`_SUCCESS`, `_temporary/`, `.part-0.parquet.crc`). So a
//! file or directory whose name starts with `.` or `_`, or ends in `.tmp`, is never data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use object_store::ObjectMeta;
use object_store::path::{Path as ObjectPath, PathPart};
use parquet::basic::Type as PhysicalType;
use parquet::column::page::{Page, PageReader};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::serialized_reader::SerializedPageReader;

use crate::error::{Error, Result};

/// The directory name Hive (and Spark, pyarrow, DuckDB) use for a NULL partition value.
pub const HIVE_NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// `key=value` pairs from directory names; `None` is the Hive NULL partition.
pub(crate) type Partitions = Vec<(String, Option<String>)>;

/// A data file found under a table's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FoundFile {
    /// What messages call it: the absolute path, or `s3://bucket/key`.
    pub name: String,
    /// Its object store location: the path (without the leading `/`) for a local file,
    /// `bucket/key` for an object.
    pub location: ObjectPath,
    /// `key=value` pairs from the directories between the root and the file, in order;
    /// values are percent-decoded, `None` for [`HIVE_NULL_PARTITION`].
    pub partitions: Partitions,
    /// File size in bytes, from the listing.
    pub size: u64,
    /// Last modification time, from the listing: with `size`, it tells a replaced file apart.
    pub modified: SystemTime,
    /// The object's ETag, from an S3 listing.
    pub e_tag: Option<String>,
}

impl FoundFile {
    fn local(
        path: PathBuf,
        partitions: Partitions,
        size: u64,
        modified: SystemTime,
    ) -> Option<Self> {
        let location = match ObjectPath::from_filesystem_path(&path) {
            Ok(location) => location,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping a path that is not a valid object path");
                return None;
            }
        };
        Some(Self {
            name: path.display().to_string(),
            location,
            partitions,
            size,
            modified,
            e_tag: None,
        })
    }

    /// The listing's view of the file, as DataFusion's readers take it.
    pub fn object_meta(&self) -> ObjectMeta {
        ObjectMeta {
            location: self.location.clone(),
            last_modified: self.modified.into(),
            size: self.size,
            e_tag: self.e_tag.clone(),
            version: None,
        }
    }
}

/// The data files among the objects listed under `prefix` in `bucket`, sorted by key:
/// the same rules as on disk, applied to the key's segments below the prefix.
pub(crate) fn remote_files(
    bucket: &str,
    prefix: &ObjectPath,
    listed: Vec<ObjectMeta>,
    extension: &str,
) -> Vec<FoundFile> {
    let depth = prefix.parts().count();
    let mut found: Vec<FoundFile> = listed
        .into_iter()
        .filter_map(|meta| {
            let parts: Vec<String> = meta
                .location
                .parts()
                .map(|p| p.as_ref().to_owned())
                .collect();
            // A table that is one object lists as itself: its own name is not checked.
            let below = parts.get(depth..).unwrap_or_default();
            let (file_name, dirs) = match below.split_last() {
                Some((name, dirs)) => (name.as_str(), dirs),
                None => ("", &[][..]),
            };
            if dirs.iter().any(|d| is_hidden(d))
                || (!below.is_empty() && (is_hidden(file_name) || !file_name.ends_with(extension)))
            {
                return None;
            }
            let partitions = dirs
                .iter()
                .filter_map(|d| {
                    d.split_once('=')
                        .map(|(k, v)| (percent_decode(k), parse_partition_value(v)))
                })
                .collect();
            Some(FoundFile {
                name: format!("s3://{bucket}/{}", meta.location),
                location: ObjectPath::from_iter(
                    std::iter::once(PathPart::from(bucket)).chain(meta.location.parts()),
                ),
                partitions,
                size: meta.size,
                modified: meta.last_modified.into(),
                e_tag: meta.e_tag,
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Whether a file or directory name marks something that is not (yet) data.
pub(crate) fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_') || name.ends_with(".tmp")
}

/// Lists the data files of the table rooted at `root` (a directory, or a single file),
/// sorted by path. Blocking: call from a blocking thread.
pub(crate) fn list_files(root: &Path, extension: &str) -> Result<Vec<FoundFile>> {
    let io_err = |path: &Path, source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(root).map_err(|e| io_err(root, e))?;
    let mut found = Vec::new();
    if meta.is_file() {
        let modified = meta.modified().map_err(|e| io_err(root, e))?;
        found.extend(FoundFile::local(
            root.to_path_buf(),
            vec![],
            meta.len(),
            modified,
        ));
        return Ok(found);
    }

    // Depth-first walk with an explicit stack: partition trees can be deep, recursion is not needed.
    // Directories are visited once each (by device and inode): a symlink back to an
    // ancestor would otherwise make the walk endless.
    let mut visited = std::collections::HashSet::new();
    visited.insert(dir_id(&meta));
    let mut stack: Vec<(PathBuf, Partitions)> = vec![(root.to_path_buf(), vec![])];
    while let Some((dir, partitions)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A partition directory removed while we walk is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => return Err(io_err(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(path = %entry.path().display(), "skipping a name that is not UTF-8");
                continue;
            };
            if is_hidden(name) {
                continue;
            }
            let path = entry.path();
            // Follow symlinks: a table may be assembled from links to files elsewhere.
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // A symlink loop, a dangling link's permissions, ...: one bad entry must not
                // take the table (or the server's start-up) down with it.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an entry that cannot be read");
                    continue;
                }
            };
            if meta.is_dir() {
                if !visited.insert(dir_id(&meta)) {
                    tracing::warn!(path = %path.display(), "skipping a directory already listed (a symlink loop?)");
                    continue;
                }
                let mut partitions = partitions.clone();
                if let Some((key, value)) = name.split_once('=') {
                    partitions.push((percent_decode(key), parse_partition_value(value)));
                }
                stack.push((path, partitions));
            } else if meta.is_file() && name.ends_with(extension) {
                let modified = meta.modified().map_err(|e| io_err(root, e))?;
                found.extend(FoundFile::local(
                    path,
                    partitions.clone(),
                    meta.len(),
                    modified,
                ));
            }
        }
    }
    found.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(found)
}

/// Identifies a directory however it was reached.
#[cfg(unix)]
fn dir_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Without inodes, every directory is new (no loop protection).
#[cfg(not(unix))]
fn dir_id(_meta: &std::fs::Metadata) -> (u64, u64) {
    (rand::random(), rand::random())
}

fn parse_partition_value(raw: &str) -> Option<String> {
    (raw != HIVE_NULL_PARTITION).then(|| percent_decode(raw))
}

/// Hive escapes `/`, `=`, `%`, `#`, `:` and other characters in partition values as `%XX`.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The type a partition column is served as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionType {
    /// 64-bit signed integer (`Int64`).
    #[serde(alias = "int", alias = "int64", alias = "integer")]
    Bigint,
    /// Calendar date (`Date32`), from `YYYY-MM-DD`.
    Date,
    /// Text (`Utf8`).
    #[serde(alias = "utf8", alias = "varchar", alias = "text")]
    String,
}

impl PartitionType {
    /// Infers the narrowest type that every non-NULL value parses as.
    pub(crate) fn infer<'a>(values: impl Iterator<Item = &'a str> + Clone) -> Self {
        if values.clone().all(|v| parse_int(v).is_some()) {
            Self::Bigint
        } else if values.clone().all(|v| parse_date(v).is_some()) {
            Self::Date
        } else {
            Self::String
        }
    }

    /// The Arrow type of the column.
    pub fn data_type(self) -> datafusion::arrow::datatypes::DataType {
        use datafusion::arrow::datatypes::DataType;
        match self {
            Self::Bigint => DataType::Int64,
            Self::Date => DataType::Date32,
            Self::String => DataType::Utf8,
        }
    }

    /// Parses a partition value as this type; `None` input is SQL NULL.
    pub(crate) fn parse(
        self,
        value: Option<&str>,
    ) -> std::result::Result<datafusion::scalar::ScalarValue, String> {
        use datafusion::scalar::ScalarValue;
        Ok(match (self, value) {
            (Self::Bigint, v) => ScalarValue::Int64(
                v.map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| format!("'{v}' is not an integer"))
                })
                .transpose()?,
            ),
            (Self::Date, v) => ScalarValue::Date32(
                v.map(|v| parse_date(v).ok_or_else(|| format!("'{v}' is not a date (YYYY-MM-DD)")))
                    .transpose()?,
            ),
            (Self::String, v) => ScalarValue::Utf8(v.map(str::to_owned)),
        })
    }
}

fn parse_int(v: &str) -> Option<i64> {
    // Leading zeros ("007") are identifiers, not numbers: keep them as text.
    let digits = v.strip_prefix('-').unwrap_or(v);
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    v.parse().ok()
}

/// Days since the Unix epoch for a strict `YYYY-MM-DD`.
fn parse_date(v: &str) -> Option<i32> {
    if v.len() != 10 {
        return None;
    }
    let date = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((date - epoch).num_days()).ok()
}

/// The largest dictionary page read for a distinct count: a larger one holds many values,
/// where an equality is selective whatever the exact count.
const DICTIONARY_PAGE_READ_LIMIT: u64 = 1 << 20;

/// For each leaf column of a local Parquet file, the most values any of its row groups'
/// dictionary pages holds: a lower bound of the column's distinct values (a writer that
/// fell back from its dictionary wrote more). Strings and binaries only (`BYTE_ARRAY`):
/// their min/max give DataFusion no estimate of an equality, while `1 / distinct values`
/// does. `None` for a column where any row group has no dictionary or a dictionary page
/// over [`DICTIONARY_PAGE_READ_LIMIT`], or where a page cannot be read.
pub(crate) fn dictionary_distinct_counts(
    path: &Path,
    metadata: &ParquetMetaData,
) -> Vec<Option<usize>> {
    let columns = metadata.file_metadata().schema_descr().num_columns();
    let Ok(file) = std::fs::File::open(path) else {
        return vec![None; columns];
    };
    let file = Arc::new(file);
    (0..columns)
        .map(|column| {
            let mut most = None;
            for group in metadata.row_groups() {
                let chunk = group.column(column);
                if chunk.column_type() != PhysicalType::BYTE_ARRAY {
                    return None;
                }
                let dictionary = chunk.dictionary_page_offset()?;
                let size = u64::try_from(chunk.data_page_offset() - dictionary).ok()?;
                if size > DICTIONARY_PAGE_READ_LIMIT {
                    return None;
                }
                let rows = usize::try_from(group.num_rows()).ok()?;
                let mut pages =
                    SerializedPageReader::new(Arc::clone(&file), chunk, rows, None).ok()?;
                match pages.get_next_page().ok()?? {
                    Page::DictionaryPage { num_values, .. } => {
                        let values = usize::try_from(num_values).ok()?;
                        most = Some(most.map_or(values, |m: usize| m.max(values)));
                    }
                    _ => return None,
                }
            }
            most
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_counts_from_dictionary_pages() {
        use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
        use parquet::arrow::ArrowWriter;
        use parquet::file::properties::WriterProperties;
        use parquet::file::reader::{FileReader, SerializedFileReader};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        // Row group 0 holds 3 of the names, row group 1 all 7; `plain` is never a dictionary.
        let names = |n: usize, of: usize| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("name-{}", i % of)),
            ))
        };
        let ints: ArrayRef = Arc::new(Int64Array::from_iter_values(0..100));
        let props = WriterProperties::builder()
            .set_column_dictionary_enabled("plain".into(), false)
            .build();
        let first = RecordBatch::try_from_iter([
            ("name", names(100, 3)),
            ("plain", names(100, 5)),
            ("int", Arc::clone(&ints)),
        ])
        .unwrap();
        let mut writer = ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            first.schema(),
            Some(props),
        )
        .unwrap();
        writer.write(&first).unwrap();
        writer.flush().unwrap();
        let second = RecordBatch::try_from_iter([
            ("name", names(100, 7)),
            ("plain", names(100, 5)),
            ("int", ints),
        ])
        .unwrap();
        writer.write(&second).unwrap();
        writer.close().unwrap();

        let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let metadata = reader.metadata();
        assert_eq!(metadata.num_row_groups(), 2);
        let counts = dictionary_distinct_counts(&path, metadata);
        assert_eq!(counts, vec![Some(7), None, None]);
        // A file that cannot be opened gives no counts.
        let gone = dictionary_distinct_counts(&dir.path().join("gone.parquet"), metadata);
        assert_eq!(gone, vec![None, None, None]);
    }

    #[test]
    fn infers_partition_types() {
        let t = |v: &[&str]| PartitionType::infer(v.iter().copied());
        assert_eq!(t(&["1", "-20", "300"]), PartitionType::Bigint);
        assert_eq!(t(&["2026-01-01", "2026-12-31"]), PartitionType::Date);
        assert_eq!(t(&["2026-01-01", "later"]), PartitionType::String);
        assert_eq!(t(&["007", "1"]), PartitionType::String);
        assert_eq!(t(&["2026-02-30"]), PartitionType::String);
        assert_eq!(t(&["api", "web"]), PartitionType::String);
    }

    #[test]
    fn parses_values() {
        use datafusion::scalar::ScalarValue;
        assert_eq!(
            PartitionType::Date.parse(Some("1970-01-02")).unwrap(),
            ScalarValue::Date32(Some(1))
        );
        assert_eq!(
            PartitionType::Bigint.parse(None).unwrap(),
            ScalarValue::Int64(None)
        );
        assert!(PartitionType::Bigint.parse(Some("x")).is_err());
    }

    #[test]
    fn walks_hive_layout_and_skips_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for rel in [
            "day=2026-01-01/service=api/part-0.parquet",
            "day=2026-01-01/service=a%2Fb/part-0.parquet",
            "day=__HIVE_DEFAULT_PARTITION__/service=web/part-0.parquet",
            "day=2026-01-01/service=api/.part-1.parquet",
            "day=2026-01-01/service=api/_part-2.parquet",
            "day=2026-01-01/service=api/part-3.parquet.tmp",
            "day=2026-01-01/_temporary/part-4.parquet",
            "day=2026-01-01/service=api/notes.txt",
        ] {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        let found = list_files(root, ".parquet").unwrap();
        let parts: Vec<_> = found.iter().map(|f| f.partitions.clone()).collect();
        let kv = |d: Option<&str>, s: &str| {
            vec![
                ("day".to_string(), d.map(str::to_string)),
                ("service".to_string(), Some(s.to_string())),
            ]
        };
        assert_eq!(
            parts,
            vec![
                kv(Some("2026-01-01"), "a/b"),
                kv(Some("2026-01-01"), "api"),
                kv(None, "web"),
            ]
        );
    }

    #[test]
    fn remote_listing_follows_the_same_rules() {
        let meta = |key: &str| ObjectMeta {
            location: ObjectPath::parse(key).unwrap(),
            last_modified: chrono::DateTime::from_timestamp(1, 0).unwrap(),
            size: 1,
            e_tag: Some(format!("\"{key}\"")),
            version: None,
        };
        let listed = [
            "t/day=2026-01-01/service=api/part-0.parquet",
            "t/day=__HIVE_DEFAULT_PARTITION__/service=a%2Fb/part-0.parquet",
            "t/day=2026-01-01/service=api/.part-1.parquet",
            "t/day=2026-01-01/_temporary/part-4.parquet",
            "t/day=2026-01-01/service=api/part-3.parquet.tmp",
            "t/day=2026-01-01/service=api/notes.txt",
        ]
        .into_iter()
        .map(meta)
        .collect();
        let found = remote_files("b", &ObjectPath::parse("t").unwrap(), listed, ".parquet");
        let names: Vec<_> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "s3://b/t/day=2026-01-01/service=api/part-0.parquet",
                "s3://b/t/day=__HIVE_DEFAULT_PARTITION__/service=a%2Fb/part-0.parquet",
            ]
        );
        assert_eq!(
            found[0].location.as_ref(),
            "b/t/day=2026-01-01/service=api/part-0.parquet"
        );
        assert_eq!(found[1].partitions[0].1, None);
        assert_eq!(found[1].partitions[1].1.as_deref(), Some("a/b"));
        assert!(found[0].e_tag.is_some());

        // A table that is one object.
        let one = remote_files(
            "b",
            &ObjectPath::parse("t/x.parquet").unwrap(),
            vec![meta("t/x.parquet")],
            ".parquet",
        );
        assert_eq!(one.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let part = root.join("day=2026-01-01");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::write(part.join("part-0.parquet"), b"x").unwrap();
        // A link back to the root, and a link to itself.
        std::os::unix::fs::symlink(root, part.join("loop")).unwrap();
        std::os::unix::fs::symlink(root.join("self"), root.join("self")).unwrap();
        let found = list_files(root, ".parquet").unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
    }
}
