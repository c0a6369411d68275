//! Flight SQL metadata: catalogs, schemas, tables and table types from the engine's
//! catalog (as far as the caller may see it), and the static `GetSqlInfo` and
//! `GetXdbcTypeInfo` answers.

use std::sync::Arc;

use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::{
    self, CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas,
    CommandGetExportedKeys, CommandGetImportedKeys, CommandGetPrimaryKeys, CommandGetSqlInfo,
    CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo, Nullable, Searchable, SqlInfo,
    SqlNullOrdering, SqlSupportedCaseSensitivity, SqlSupportedTransaction, XdbcDataType,
};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::FlightSql;
use crate::error::{Error, Result};
use crate::query::TableAccess;

impl FlightSql {
    /// The `DoGet` of a Flight SQL metadata command: its one batch. Any other command
    /// is not a ticket this server issues.
    pub(in crate::flight) async fn metadata(
        &self,
        command: sql::Command,
        access: &TableAccess,
    ) -> Result<RecordBatch> {
        let command = match command {
            sql::Command::CommandGetCatalogs(c) => c.into(),
            sql::Command::CommandGetDbSchemas(c) => c.into(),
            sql::Command::CommandGetTables(c) => c.into(),
            sql::Command::CommandGetTableTypes(c) => c.into(),
            sql::Command::CommandGetSqlInfo(c) => c.into(),
            sql::Command::CommandGetXdbcTypeInfo(c) => c.into(),
            sql::Command::CommandGetPrimaryKeys(c) => c.into(),
            sql::Command::CommandGetExportedKeys(c) => c.into(),
            sql::Command::CommandGetImportedKeys(c) => c.into(),
            sql::Command::CommandGetCrossReference(c) => c.into(),
            other => {
                return Err(Error::invalid(format!(
                    "the Flight SQL message {} is not a ticket this server issues; \
                     call GetFlightInfo and redeem the ticket it returns",
                    other.type_url()
                )));
            }
        };
        self.metadata_of(command, access).await
    }

    /// Answers a metadata command from the engine's catalog, as far as the caller may
    /// see it (`access`).
    pub(super) async fn metadata_of(
        &self,
        command: Metadata,
        access: &TableAccess,
    ) -> Result<RecordBatch> {
        let batch = match command {
            Metadata::Catalogs(c) => {
                let mut builder = c.into_builder();
                let mut catalogs: Vec<_> = self
                    .schemas(access)
                    .await?
                    .into_iter()
                    .map(|p| p.0)
                    .collect();
                catalogs.dedup();
                for catalog in catalogs {
                    builder.append(catalog);
                }
                builder.build()
            }
            Metadata::DbSchemas(c) => {
                let mut builder = c.into_builder();
                for (catalog, schema) in self.schemas(access).await? {
                    builder.append(catalog, schema);
                }
                builder.build()
            }
            Metadata::Tables(c) => {
                let mut builder = c.into_builder();
                for table in self.engine.list_tables(access).await? {
                    builder.append(
                        &table.catalog,
                        &table.schema,
                        &table.name,
                        table.table_type,
                        &self.engine.view_types().schema(&table.arrow_schema),
                    )?;
                }
                builder.build()
            }
            Metadata::TableTypes(c) => {
                let mut builder = c.into_builder();
                builder.append("TABLE");
                builder.append("VIEW");
                builder.build()
            }
            Metadata::SqlInfo(c) => c.into_builder(&self.sql_info).build(),
            Metadata::XdbcTypeInfo(c) => c.into_builder(&self.type_info).build(),
            // No table has keys: Parquet files declare none.
            Metadata::Keys => Ok(RecordBatch::new_empty(keys_schema())),
            Metadata::PrimaryKeys => Ok(RecordBatch::new_empty(primary_keys_schema())),
        };
        Ok(batch?)
    }

    /// Distinct (catalog, schema) pairs, sorted.
    async fn schemas(&self, access: &TableAccess) -> Result<Vec<(String, String)>> {
        let mut pairs: Vec<_> = self
            .engine
            .list_tables(access)
            .await?
            .into_iter()
            .map(|t| (t.catalog, t.schema))
            .collect();
        pairs.dedup();
        Ok(pairs)
    }
}

/// The metadata commands, answered by [`FlightSql::metadata`].
pub(super) enum Metadata {
    Catalogs(CommandGetCatalogs),
    DbSchemas(CommandGetDbSchemas),
    Tables(CommandGetTables),
    TableTypes(CommandGetTableTypes),
    SqlInfo(CommandGetSqlInfo),
    XdbcTypeInfo(CommandGetXdbcTypeInfo),
    PrimaryKeys,
    /// Exported, imported or cross-reference keys (one schema).
    Keys,
}

macro_rules! metadata_from {
    ($($command:ty => $variant:expr),* $(,)?) => {
        $(impl From<$command> for Metadata {
            #[allow(clippy::redundant_closure_call)]
            fn from(c: $command) -> Self {
                $variant(c)
            }
        })*
    };
}

metadata_from!(
    CommandGetCatalogs => Metadata::Catalogs,
    CommandGetDbSchemas => Metadata::DbSchemas,
    CommandGetTables => Metadata::Tables,
    CommandGetTableTypes => Metadata::TableTypes,
    CommandGetSqlInfo => Metadata::SqlInfo,
    CommandGetXdbcTypeInfo => Metadata::XdbcTypeInfo,
    CommandGetPrimaryKeys => |_| Metadata::PrimaryKeys,
    CommandGetExportedKeys => |_| Metadata::Keys,
    CommandGetImportedKeys => |_| Metadata::Keys,
    CommandGetCrossReference => |_| Metadata::Keys,
);

/// `GetPrimaryKeys`' result schema (Flight SQL spec).
fn primary_keys_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ]))
}

/// `GetExportedKeys`', `GetImportedKeys`' and `GetCrossReference`'s result schema.
fn keys_schema() -> SchemaRef {
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("pk_catalog_name", true),
        text("pk_db_schema_name", true),
        text("pk_table_name", false),
        text("pk_column_name", false),
        text("fk_catalog_name", true),
        text("fk_db_schema_name", true),
        text("fk_table_name", false),
        text("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        text("fk_key_name", true),
        text("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ]))
}

/// What `GetSqlInfo` reports.
pub(super) fn sql_info() -> Result<SqlInfoData> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Quiver");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    // The Arrow columnar format version (IPC metadata V5).
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.5.0");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, true);
    b.append(SqlInfo::FlightSqlServerBulkIngestion, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    // Unquoted names fold to lower case; quoted names keep their case.
    b.append(
        SqlInfo::SqlIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
    );
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(
        SqlInfo::SqlQuotedIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityCaseInsensitive as i32,
    );
    b.append(SqlInfo::SqlAllTablesAreSelectable, true);
    b.append(
        SqlInfo::SqlNullOrdering,
        SqlNullOrdering::SqlNullsSortedHigh as i32,
    );
    b.append(SqlInfo::SqlSearchStringEscape, "\\");
    b.append(SqlInfo::SqlSupportsColumnAliasing, true);
    b.append(SqlInfo::SqlNullPlusNullIsNull, true);
    b.append(SqlInfo::SqlSupportsTableCorrelationNames, true);
    b.append(SqlInfo::SqlSupportsExpressionsInOrderBy, true);
    b.append(SqlInfo::SqlSupportsOrderByUnrelated, true);
    b.append(SqlInfo::SqlSupportsLikeEscapeClause, true);
    // Bitmasks of SupportedSqlGrammar / SupportedAnsi92SqlGrammarLevel: minimum and core
    // grammar, ANSI-92 entry level.
    b.append(SqlInfo::SqlSupportedGrammar, 0b11_i32);
    b.append(SqlInfo::SqlAnsi92SupportedLevel, 0b1_i32);
    b.append(SqlInfo::SqlSchemaTerm, "schema");
    b.append(SqlInfo::SqlCatalogTerm, "catalog");
    b.append(SqlInfo::SqlCatalogAtStart, true);
    b.append(SqlInfo::SqlSelectForUpdateSupported, false);
    b.append(SqlInfo::SqlStoredProceduresSupported, false);
    b.append(SqlInfo::SqlCorrelatedSubqueriesSupported, true);
    b.append(SqlInfo::SqlTransactionsSupported, false);
    b.append(SqlInfo::SqlBatchUpdatesSupported, false);
    b.append(SqlInfo::SqlSavepointsSupported, false);
    Ok(b.build()?)
}

/// What `GetXdbcTypeInfo` reports: the SQL types a query can name.
pub(super) fn type_info() -> Result<XdbcTypeInfoData> {
    let mut b = XdbcTypeInfoDataBuilder::new();
    let mut add = |name: &str, data_type: XdbcDataType, size: Option<i32>, quoted: bool| {
        let numeric = matches!(
            data_type,
            XdbcDataType::XdbcTinyint
                | XdbcDataType::XdbcSmallint
                | XdbcDataType::XdbcInteger
                | XdbcDataType::XdbcBigint
                | XdbcDataType::XdbcReal
                | XdbcDataType::XdbcDouble
                | XdbcDataType::XdbcDecimal
        );
        b.append(XdbcTypeInfo {
            type_name: name.to_string(),
            data_type,
            column_size: size,
            literal_prefix: quoted.then(|| "'".to_string()),
            literal_suffix: quoted.then(|| "'".to_string()),
            create_params: (data_type == XdbcDataType::XdbcDecimal)
                .then(|| vec!["precision".to_string(), "scale".to_string()]),
            nullable: Nullable::NullabilityNullable,
            case_sensitive: data_type == XdbcDataType::XdbcVarchar,
            searchable: if data_type == XdbcDataType::XdbcVarchar {
                Searchable::Full
            } else {
                Searchable::Basic
            },
            unsigned_attribute: numeric.then_some(false),
            fixed_prec_scale: false,
            auto_increment: Some(false),
            local_type_name: Some(name.to_string()),
            minimum_scale: (data_type == XdbcDataType::XdbcDecimal).then_some(0),
            maximum_scale: (data_type == XdbcDataType::XdbcDecimal).then_some(38),
            sql_data_type: data_type,
            datetime_subcode: None,
            num_prec_radix: numeric.then_some(10),
            interval_precision: None,
        });
    };
    add("BOOLEAN", XdbcDataType::XdbcBit, Some(1), false);
    add("TINYINT", XdbcDataType::XdbcTinyint, Some(3), false);
    add("SMALLINT", XdbcDataType::XdbcSmallint, Some(5), false);
    add("INTEGER", XdbcDataType::XdbcInteger, Some(10), false);
    add("BIGINT", XdbcDataType::XdbcBigint, Some(19), false);
    add("REAL", XdbcDataType::XdbcReal, Some(7), false);
    add("DOUBLE", XdbcDataType::XdbcDouble, Some(15), false);
    add("DECIMAL", XdbcDataType::XdbcDecimal, Some(38), false);
    add("VARCHAR", XdbcDataType::XdbcVarchar, None, true);
    add("BYTEA", XdbcDataType::XdbcVarbinary, None, true);
    add("DATE", XdbcDataType::XdbcDate, Some(10), true);
    add("TIME", XdbcDataType::XdbcTime, Some(18), true);
    add("TIMESTAMP", XdbcDataType::XdbcTimestamp, Some(29), true);
    Ok(b.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_tables_build() {
        assert!(sql_info().is_ok());
        let types = type_info().unwrap();
        assert_eq!(types.record_batch(None).unwrap().num_rows(), 13);
        assert_eq!(
            types
                .record_batch(XdbcDataType::XdbcBigint as i32)
                .unwrap()
                .num_rows(),
            1
        );
    }
}
