//! Expanding string and binary views before results go on the wire.
//!
//! DataFusion reads Parquet strings as `Utf8View`, whose values live in shared data
//! buffers. Arrow IPC writes every data buffer a view array references, and when the
//! Flight encoder slices a batch into messages, each slice still references all of them:
//! a 65k-row slice of TPC-H lineitem encoded to 215 MB instead of 11 MB. Casting views to
//! `Utf8`/`Binary` copies just the values each batch holds, and clients get the types
//! they would get reading the same files with pyarrow.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;

/// The schema with every view type (at any depth) replaced by its offset-based twin.
pub fn expand_schema(schema: &SchemaRef) -> SchemaRef {
    if !schema.fields().iter().any(|f| has_view(f.data_type())) {
        return Arc::clone(schema);
    }
    let fields: Vec<FieldRef> = schema.fields().iter().map(expand_field).collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Casts the columns of `batch` that hold views to the types in `expanded` (from
/// [`expand_schema`]); other columns are passed through untouched.
pub fn expand_batch(batch: RecordBatch, expanded: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if Arc::ptr_eq(&batch.schema(), expanded) || batch.schema().as_ref() == expanded.as_ref() {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .zip(expanded.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(Arc::clone(column))
            } else {
                cast(column, field.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(expanded), columns)
}

fn has_view(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8View | DataType::BinaryView => true,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _)
        | DataType::ListView(f)
        | DataType::LargeListView(f) => has_view(f.data_type()),
        DataType::Struct(fields) => fields.iter().any(|f| has_view(f.data_type())),
        DataType::Dictionary(_, value) => has_view(value),
        _ => false,
    }
}

fn expand_field(field: &FieldRef) -> FieldRef {
    if !has_view(field.data_type()) {
        return Arc::clone(field);
    }
    Arc::new(Field::clone(field).with_data_type(expand_type(field.data_type())))
}

fn expand_type(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::List(f) => DataType::List(expand_field(f)),
        DataType::LargeList(f) => DataType::LargeList(expand_field(f)),
        DataType::FixedSizeList(f, n) => DataType::FixedSizeList(expand_field(f), *n),
        DataType::Map(f, sorted) => DataType::Map(expand_field(f), *sorted),
        DataType::ListView(f) => DataType::List(expand_field(f)),
        DataType::LargeListView(f) => DataType::LargeList(expand_field(f)),
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(expand_field).collect::<Fields>())
        }
        DataType::Dictionary(key, value) => {
            DataType::Dictionary(key.clone(), Box::new(expand_type(value)))
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, Int32Array, StringArray, StringViewArray};

    #[test]
    fn views_become_offsets() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8View, true),
            Field::new("i", DataType::Int32, false),
            Field::new(
                "l",
                DataType::List(Arc::new(Field::new("item", DataType::Utf8View, true))),
                true,
            ),
        ]));
        let expanded = expand_schema(&schema);
        assert_eq!(expanded.field(0).data_type(), &DataType::Utf8);
        assert_eq!(expanded.field(1).data_type(), &DataType::Int32);
        assert_eq!(
            expanded.field(2).data_type(),
            &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
        );

        let long = "a string longer than twelve bytes";
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(schema.fields()[..2].to_vec())),
            vec![
                Arc::new(StringViewArray::from(vec![Some(long), None])),
                Arc::new(Int32Array::from(vec![1, 2])),
            ],
        )
        .unwrap();
        let target = expand_schema(&batch.schema());
        // Slicing must not drag the whole data buffer along after expansion.
        let out = expand_batch(batch.slice(0, 1), &target).unwrap();
        let strings = out
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(strings.value(0), long);
        assert_eq!(strings.value_data().len(), long.len());
    }

    #[test]
    fn plain_schemas_are_shared() {
        let schema = Arc::new(Schema::new(vec![Field::new("i", DataType::Int64, true)]));
        assert!(Arc::ptr_eq(&schema, &expand_schema(&schema)));
    }
}
