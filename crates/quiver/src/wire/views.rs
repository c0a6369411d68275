//! String and binary views on their way to the wire.
//!
//! DataFusion reads Parquet strings as `Utf8View`, whose values live in shared data
//! buffers. Arrow IPC writes every data buffer a view array references, whole, and a
//! filtered or sliced batch still references all of them: a 65k-row slice of TPC-H
//! lineitem encoded to 215 MB instead of 11 MB. Two ways out ([`ViewTypes`]): casting
//! views to `Utf8`/`Binary` (the default) copies just the values each batch holds, and
//! clients get the types they would get reading the same files with pyarrow; keeping
//! views sends them as they are when their buffers are mostly referenced, and compacts
//! them (copying the referenced values) when they are not.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, GenericByteViewArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::ByteViewType;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;

/// How string and binary views are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ViewTypes {
    /// As `Utf8`/`Binary`: the types pyarrow reads from Parquet and every Flight SQL
    /// driver knows; each batch's values are copied once.
    #[default]
    Expand,
    /// As `Utf8View`/`BinaryView` (clients need Arrow 15 or later): top-level view columns
    /// go out untouched while they would put at most [`MAX_VIEW_OVERHEAD`] times their
    /// compacted size on the wire, and are compacted otherwise. Views inside lists and
    /// structs go out as they are.
    Keep,
}

impl ViewTypes {
    /// The schema results are sent with.
    pub fn schema(self, schema: &SchemaRef) -> SchemaRef {
        match self {
            Self::Expand => expand_schema(schema),
            Self::Keep => Arc::clone(schema),
        }
    }

    /// `batch` as it is sent, with `schema` from [`ViewTypes::schema`].
    pub fn batch(self, batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        match self {
            Self::Expand => expand_batch(batch, schema),
            Self::Keep => Ok(compact_batch(batch)),
        }
    }
}

/// A view column is compacted when its views and data buffers are more than this many
/// times the views and the bytes they reference: what it would be compacted.
pub const MAX_VIEW_OVERHEAD: f64 = 1.1;

/// `batch` with each top-level view column that references a small part of its data
/// buffers compacted; every other column is the same array.
pub fn compact_batch(batch: RecordBatch) -> RecordBatch {
    let mut columns = None::<Vec<ArrayRef>>;
    for (i, column) in batch.columns().iter().enumerate() {
        let compacted = match column.data_type() {
            DataType::Utf8View => compact(column.as_string_view()),
            DataType::BinaryView => compact(column.as_binary_view()),
            _ => None,
        };
        if let Some(compacted) = compacted {
            columns.get_or_insert_with(|| batch.columns().to_vec())[i] = compacted;
        }
    }
    match columns {
        // Same schema, same lengths: only the buffers changed.
        Some(columns) => RecordBatch::try_new(batch.schema(), columns).unwrap_or(batch),
        None => batch,
    }
}

/// The compacted array, when `array`'s data buffers are mostly bytes it does not reference.
fn compact<T: ByteViewType + ?Sized>(array: &GenericByteViewArray<T>) -> Option<ArrayRef> {
    let held: usize = array.data_buffers().iter().map(|b| b.len()).sum();
    if held == 0 {
        return None;
    }
    // Values of 12 bytes or less live in the view itself.
    let referenced: usize = array
        .views()
        .iter()
        .map(|v| *v as u32 as usize)
        .filter(|len| *len > 12)
        .sum();
    let views = array.views().inner().len();
    let sent = (views + held) as f64;
    let compacted = (views + referenced) as f64;
    (sent > MAX_VIEW_OVERHEAD * compacted).then(|| Arc::new(array.gc()) as ArrayRef)
}

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
    use datafusion::arrow::array::{Int32Array, StringArray, StringViewArray};

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
    fn views_are_kept_and_compacted_only_when_mostly_unreferenced() {
        let values: Vec<String> = (0..1_000)
            .map(|i| format!("value number {i} of a thousand"))
            .collect();
        let views: ArrayRef = Arc::new(StringViewArray::from_iter_values(&values));
        let short: ArrayRef = Arc::new(StringViewArray::from_iter_values(["a", "bb", "ccc"]));
        let batch = RecordBatch::try_from_iter([("s", Arc::clone(&views))]).unwrap();
        let schema = ViewTypes::Keep.schema(&batch.schema());
        assert_eq!(schema.field(0).data_type(), &DataType::Utf8View);

        // Whole: sent untouched.
        let out = ViewTypes::Keep.batch(batch.clone(), &schema).unwrap();
        assert!(Arc::ptr_eq(out.column(0), &views));
        // Inlined values only: no data buffer, nothing to compact.
        let inline = RecordBatch::try_from_iter([("s", short)]).unwrap();
        let out = compact_batch(inline.clone());
        assert!(Arc::ptr_eq(out.column(0), inline.column(0)));

        // A 10-row slice references 1% of the data: compacted to what it holds.
        let out = ViewTypes::Keep
            .batch(batch.slice(500, 10), &schema)
            .unwrap();
        let strings = out.column(0).as_string_view();
        let held: usize = strings.data_buffers().iter().map(|b| b.len()).sum();
        let referenced: usize = values[500..510].iter().map(String::len).sum();
        assert_eq!(held, referenced);
        assert_eq!(
            strings.iter().map(Option::unwrap).collect::<Vec<_>>(),
            values[500..510]
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        // A slice holding most of it: untouched.
        let most = batch.slice(0, 990);
        let out = compact_batch(most.clone());
        assert!(Arc::ptr_eq(out.column(0), most.column(0)));
    }

    #[test]
    fn plain_schemas_are_shared() {
        let schema = Arc::new(Schema::new(vec![Field::new("i", DataType::Int64, true)]));
        assert!(Arc::ptr_eq(&schema, &expand_schema(&schema)));
    }
}
