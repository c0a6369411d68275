//! Table definitions: from `--table NAME=PATH`, `--data-dir DIR` and a TOML catalog file.
//!
//! ```toml
//! # quiver.toml
//! [tables.logs]
//! path = "/data/logs"            # a directory (Hive-partitioned or not) or one file
//! [tables.logs.partitions]       # optional: override the inferred partition column types
//! day = "date"                   # bigint | date | string
//! # extension = ".parquet"       # optional: suffix of the data files
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::discover::{PartitionType, is_hidden};
use crate::error::{Error, Result};

/// One table to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDefinition {
    /// Name in SQL (case-sensitive; quote names that are not lower-case identifiers).
    pub name: String,
    /// Absolute path of the directory or file.
    pub path: PathBuf,
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
    /// A definition with inferred partition types; checks the name and makes the path absolute.
    pub fn new(name: impl Into<String>, path: impl AsRef<Path>) -> Result<Self> {
        let name = name.into();
        validate_name(&name)?;
        let path = path.as_ref();
        let path = std::path::absolute(path).map_err(|e| Error::Config {
            message: format!("table '{name}': path {}: {e}", path.display()),
        })?;
        Ok(Self {
            name,
            path,
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

/// The TOML catalog file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    /// Tables by name.
    #[serde(default)]
    pub tables: BTreeMap<String, TableEntry>,
}

/// One table in the catalog file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    /// Directory or file; relative paths are relative to the catalog file.
    pub path: PathBuf,
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
    /// Reads and parses a catalog file into table definitions.
    pub fn load(file: &Path) -> Result<Vec<TableDefinition>> {
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
    pub fn parse(text: &str, base: &Path) -> Result<Vec<TableDefinition>> {
        let parsed: CatalogFile = toml::from_str(text).map_err(|e| Error::Config {
            message: e.to_string(),
        })?;
        parsed
            .tables
            .into_iter()
            .map(|(name, entry)| {
                let mut def = TableDefinition::new(name, base.join(entry.path))?;
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
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_flag() {
        let def = parse_table_flag("logs=/data/logs").unwrap();
        assert_eq!(def.name, "logs");
        assert_eq!(def.path, PathBuf::from("/data/logs"));
        assert!(parse_table_flag("no-equals").is_err());
        assert!(parse_table_flag("bad name=/x").is_err());
        assert!(parse_table_flag("=/x").is_err());
    }

    #[test]
    fn parses_catalog_toml() {
        let defs = CatalogFile::parse(
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
            "#,
            Path::new("/etc/quiver"),
        )
        .unwrap();
        assert_eq!(defs.len(), 2);
        assert_eq!(defs[0].path, PathBuf::from("/etc/quiver/logs"));
        assert_eq!(defs[0].partition_types["day"], PartitionType::Date);
        assert_eq!(defs[1].path, PathBuf::from("/abs/file.parquet"));
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
