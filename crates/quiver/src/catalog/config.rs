//! Table definitions: from `--table NAME=PATH`, `--data-dir DIR` and a TOML catalog file.
//!
//! ```toml
//! # quiver.toml
//! [tables.logs]
//! path = "/data/logs"            # a directory (Hive-partitioned or not) or one file
//! [tables.logs.partitions]       # optional: override the inferred partition column types
//! day = "date"                   # bigint | date | string
//! # extension = ".parquet"       # optional: suffix of the data files
//!
//! [tables.events]
//! path = "s3://analytics/events/" # a prefix (or one object) on S3
//! [stores."s3://analytics"]       # optional: settings of that bucket (see io::remote)
//! endpoint = "http://minio:9000"
//! allow_http = true
//! ```

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::path::{Path, PathBuf};

use object_store::path::Path as ObjectPath;
use serde::Deserialize;

use super::discover::{PartitionType, is_hidden};
use crate::error::{Error, Result};
use crate::io::remote::{StoreSettings, parse_s3_url};

/// Where a table's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableLocation {
    /// An absolute path: a directory or one file.
    Local(PathBuf),
    /// A prefix (or one object) in an S3 bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix in it (empty: the whole bucket).
        prefix: ObjectPath,
    },
}

impl TableLocation {
    /// `s3://bucket/prefix` as an S3 location, anything else as a path made absolute.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        if text.starts_with("s3://") {
            let (bucket, prefix) = parse_s3_url(text).ok_or_else(|| Error::Config {
                message: format!("'{text}' is not an S3 location: use s3://BUCKET/PREFIX"),
            })?;
            return Ok(Self::S3 { bucket, prefix });
        }
        if text.contains("://") {
            return Err(Error::Config {
                message: format!("'{text}': only local paths and s3:// locations are supported"),
            });
        }
        let path = std::path::absolute(base.join(text)).map_err(|e| Error::Config {
            message: format!("path {text}: {e}"),
        })?;
        Ok(Self::Local(path))
    }

    /// The local path, for a local table.
    pub fn local(&self) -> Option<&Path> {
        match self {
            Self::Local(path) => Some(path),
            Self::S3 { .. } => None,
        }
    }

    /// How file locations of this table start, as object store paths show them: the
    /// path without its leading `/`, or `bucket/prefix`.
    pub fn root(&self) -> String {
        match self {
            Self::Local(path) => path.display().to_string(),
            Self::S3 { bucket, prefix } if prefix.as_ref().is_empty() => bucket.clone(),
            Self::S3 { bucket, prefix } => format!("{bucket}/{prefix}"),
        }
    }
}

impl Display for TableLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(path) => write!(f, "{}", path.display()),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// One table to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDefinition {
    /// Name in SQL (case-sensitive; quote names that are not lower-case identifiers).
    pub name: String,
    /// Where its files are.
    pub location: TableLocation,
    /// Partition column types that override inference.
    pub partition_types: BTreeMap<String, PartitionType>,
    /// Suffix of the data files; other files are ignored.
    pub extension: String,
    /// Hold the table's rows in memory (loaded at start and after each refresh that
    /// changes its files) and serve queries from there.
    pub pinned: bool,
}

/// Suffix of Parquet data files unless a table says otherwise.
pub const DEFAULT_EXTENSION: &str = ".parquet";

impl TableDefinition {
    /// A definition with inferred partition types; checks the name and makes a local
    /// path absolute. `s3://bucket/prefix` is a table on S3.
    pub fn new(name: impl Into<String>, path: impl AsRef<Path>) -> Result<Self> {
        let name = name.into();
        validate_name(&name)?;
        let path = path.as_ref();
        let location =
            TableLocation::parse(&path.to_string_lossy(), Path::new("")).map_err(|e| {
                Error::Config {
                    message: format!("table '{name}': {e}"),
                }
            })?;
        Ok(Self {
            name,
            location,
            partition_types: BTreeMap::new(),
            extension: DEFAULT_EXTENSION.to_string(),
            pinned: false,
        })
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::Config {
            message: format!("table name '{name}' must be 1-128 letters, digits, '_' or '-'"),
        })
    }
}

/// Parses `NAME=PATH` from `--table`.
pub fn parse_table_flag(s: &str) -> Result<TableDefinition> {
    let (name, path) = s.split_once('=').ok_or_else(|| Error::Config {
        message: format!("--table expects NAME=PATH, got '{s}'"),
    })?;
    TableDefinition::new(name.trim(), path.trim())
}

/// One table per immediate subdirectory of `dir`, named after it.
pub fn tables_in_data_dir(dir: &Path) -> Result<Vec<TableDefinition>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let mut tables = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if path.is_dir() && !is_hidden(&name) {
            tables.push(TableDefinition::new(name, &path)?);
        }
    }
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tables)
}

/// The tables and bucket settings of a catalog file.
#[derive(Debug, Default)]
pub struct Catalogued {
    /// The tables.
    pub tables: Vec<TableDefinition>,
    /// Settings by bucket (`s3://bucket`).
    pub stores: BTreeMap<String, StoreSettings>,
}

/// The TOML catalog file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    /// Tables by name.
    #[serde(default)]
    pub tables: BTreeMap<String, TableEntry>,
    /// Settings of S3 buckets, keyed `s3://bucket`.
    #[serde(default)]
    pub stores: BTreeMap<String, StoreSettings>,
}

/// One table in the catalog file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    /// Directory or file (relative paths are relative to the catalog file), or an
    /// `s3://bucket/prefix`.
    pub path: String,
    /// Partition column types that override inference.
    #[serde(default)]
    pub partitions: BTreeMap<String, PartitionType>,
    /// Suffix of the data files (default `.parquet`), e.g. `.parq` or `.pq`.
    pub extension: Option<String>,
    /// Serve the table from memory (as `--pin-table`).
    #[serde(default)]
    pub pin: bool,
}

impl CatalogFile {
    /// Reads and parses a catalog file into table definitions and bucket settings.
    pub fn load(file: &Path) -> Result<Catalogued> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::Io {
            path: file.display().to_string(),
            source: e,
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            Error::Config { message } => Error::Config {
                message: format!("{}: {message}", file.display()),
            },
            other => other,
        })
    }

    /// Parses catalog TOML; relative paths resolve against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Catalogued> {
        let parsed: CatalogFile = toml::from_str(text).map_err(|e| Error::Config {
            message: e.to_string(),
        })?;
        for url in parsed.stores.keys() {
            match parse_s3_url(url) {
                Some((_, prefix)) if prefix.as_ref().is_empty() => {}
                _ => {
                    return Err(Error::Config {
                        message: format!(
                            "[stores.\"{url}\"]: name a bucket as s3://BUCKET (no prefix)"
                        ),
                    });
                }
            }
        }
        let tables = parsed
            .tables
            .into_iter()
            .map(|(name, entry)| {
                let location =
                    TableLocation::parse(&entry.path, base).map_err(|e| Error::Config {
                        message: format!("table '{name}': {e}"),
                    })?;
                let mut def = TableDefinition::new(name, "/")?;
                def.location = location;
                def.partition_types = entry.partitions;
                def.pinned = entry.pin;
                if let Some(extension) = entry.extension {
                    if extension.is_empty() {
                        return Err(Error::Config {
                            message: format!("table '{}': extension must not be empty", def.name),
                        });
                    }
                    def.extension = extension;
                }
                Ok(def)
            })
            .collect::<Result<_>>()?;
        Ok(Catalogued {
            tables,
            stores: parsed.stores,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_flag() {
        let def = parse_table_flag("logs=/data/logs").unwrap();
        assert_eq!(def.name, "logs");
        assert_eq!(
            def.location,
            TableLocation::Local(PathBuf::from("/data/logs"))
        );
        let s3 = parse_table_flag("events=s3://bucket/events/").unwrap();
        assert_eq!(
            s3.location,
            TableLocation::S3 {
                bucket: "bucket".into(),
                prefix: ObjectPath::from("events")
            }
        );
        assert_eq!(s3.location.root(), "bucket/events");
        assert!(parse_table_flag("x=s3:///events").is_err());
        assert!(parse_table_flag("x=gs://b/events").is_err());
        assert!(parse_table_flag("no-equals").is_err());
        assert!(parse_table_flag("bad name=/x").is_err());
        assert!(parse_table_flag("=/x").is_err());
    }

    #[test]
    fn parses_catalog_toml() {
        let parsed = CatalogFile::parse(
            r#"
            [tables.logs]
            path = "logs"
            [tables.logs.partitions]
            day = "date"
            service = "string"
            [tables.one]
            path = "/abs/file.parquet"
            extension = ".parq"
            pin = true
            [tables.remote]
            path = "s3://b/p/q"
            [stores."s3://b"]
            endpoint = "http://127.0.0.1:9000"
            allow_http = true
            "#,
            Path::new("/etc/quiver"),
        )
        .unwrap();
        let defs = parsed.tables;
        assert_eq!(defs.len(), 3);
        assert_eq!(
            defs[0].location.local(),
            Some(Path::new("/etc/quiver/logs"))
        );
        assert_eq!(defs[0].partition_types["day"], PartitionType::Date);
        assert_eq!(
            defs[1].location.local(),
            Some(Path::new("/abs/file.parquet"))
        );
        assert_eq!(defs[2].location.to_string(), "s3://b/p/q");
        assert_eq!(
            parsed.stores["s3://b"].endpoint.as_deref(),
            Some("http://127.0.0.1:9000")
        );
        let err =
            CatalogFile::parse("[stores.\"s3://b/p\"]\nregion='x'", Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("no prefix"), "{err}");
        assert_eq!(defs[1].extension, ".parq");
        assert_eq!(defs[0].extension, DEFAULT_EXTENSION);
        assert!(defs[1].pinned && !defs[0].pinned);

        let err = CatalogFile::parse("[tables.x]\npath='a'\nbogus=1", Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = CatalogFile::parse(
            "[tables.x]\npath='a'\n[tables.x.partitions]\nday='week'",
            Path::new("/"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("week"), "{err}");
    }
}
