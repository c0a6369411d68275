use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::prelude::SessionContext;

use super::*;

fn write(path: &Path, column: &str, data_type: DataType) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let array: datafusion::arrow::array::ArrayRef = match data_type {
        DataType::Int64 => Arc::new(Int64Array::from(vec![1, 2, 3])),
        _ => Arc::new(StringArray::from(vec!["a", "b", "c"])),
    };
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(column, data_type, false)])),
        vec![array],
    )
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

async fn load(root: &Path) -> Result<Catalog> {
    let def = TableDefinition::new("t", root).unwrap();
    Catalog::load(vec![def], SessionContext::new().state()).await
}

#[tokio::test]
async fn incompatible_schemas_name_both_files() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a=1/x.parquet"), "v", DataType::Int64);
    write(&dir.path().join("a=2/x.parquet"), "v", DataType::Utf8);
    let err = load(dir.path()).await.unwrap_err().to_string();
    assert!(
        err.contains("a=1/x.parquet") && err.contains("a=2/x.parquet"),
        "{err}"
    );
    assert!(err.contains("column 'v'"), "{err}");
}

#[tokio::test]
async fn mixed_partition_layouts_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a=1/x.parquet"), "v", DataType::Int64);
    write(&dir.path().join("b=1/x.parquet"), "v", DataType::Int64);
    let err = load(dir.path()).await.unwrap_err().to_string();
    assert!(err.contains("partition directories differ"), "{err}");
}

#[tokio::test]
async fn corrupt_files_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a=1/x.parquet"), "v", DataType::Int64);
    std::fs::write(dir.path().join("a=2.parquet"), b"garbage").unwrap();
    std::fs::create_dir_all(dir.path().join("a=3")).unwrap();
    std::fs::write(dir.path().join("a=3/y.parquet"), b"PAR1garbagePAR1").unwrap();
    let catalog = load(dir.path()).await.unwrap();
    let table = catalog.get("t").unwrap();
    assert_eq!(table.num_files(), 1);
    assert_eq!(table.num_rows(), 3);
    assert_eq!(catalog.skipped_files(), 2);
    // A refresh with nothing new changes nothing and does not count the same files again.
    assert!(catalog.refresh().await.changed.is_empty());
    assert_eq!(catalog.skipped_files(), 2);
}

#[tokio::test]
async fn single_files_and_plain_directories() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("one.parquet");
    write(&file, "v", DataType::Int64);
    let catalog = load(&file).await.unwrap();
    let table = catalog.get("t").unwrap();
    assert_eq!(table.schema().fields().len(), 1);
    assert_eq!(table.num_rows(), 3);

    let plain = dir.path().join("plain");
    write(&plain.join("a.parquet"), "v", DataType::Int64);
    write(&plain.join("nested/b.parquet"), "v", DataType::Int64);
    let catalog = load(&plain).await.unwrap();
    assert_eq!(catalog.get("t").unwrap().num_rows(), 6);
}

#[tokio::test]
async fn partition_type_overrides_apply() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("code=007/x.parquet"), "v", DataType::Int64);
    let mut def = TableDefinition::new("t", dir.path()).unwrap();
    def.partition_types
        .insert("code".into(), PartitionType::Bigint);
    let catalog = Catalog::load(vec![def], SessionContext::new().state())
        .await
        .unwrap();
    let schema = catalog.get("t").unwrap().schema();
    assert_eq!(
        schema.field_with_name("code").unwrap().data_type(),
        &DataType::Int64
    );
}

#[tokio::test]
async fn missing_paths_fail_at_start() {
    let err = load(Path::new("/nonexistent/quiver/table"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/quiver/table"),
        "{err}"
    );
}
