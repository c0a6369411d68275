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
//!
//! Rows sent again and again (the row group cache's) need not be cast each time:
//! [`ViewTwins`] keeps their view columns made over offset arrays, and casting a view
//! array found there (or a slice of it) is a slice of its twin.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryViewArray, GenericByteViewArray, RecordBatch, StringViewArray,
};
use datafusion::arrow::buffer::Buffer;
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
        self.batch_with_twins(batch, schema, None)
    }

    /// [`ViewTypes::batch`], taking the offset arrays of view columns that `twins` holds
    /// instead of casting them.
    pub fn batch_with_twins(
        self,
        batch: RecordBatch,
        schema: &SchemaRef,
        twins: Option<&ViewTwins>,
    ) -> Result<RecordBatch, ArrowError> {
        match self {
            Self::Expand => expand_batch(batch, schema, twins),
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
/// [`expand_schema`]); other columns are passed through untouched, and view columns
/// `twins` holds become slices of their twins.
pub fn expand_batch(
    batch: RecordBatch,
    expanded: &SchemaRef,
    twins: Option<&ViewTwins>,
) -> Result<RecordBatch, ArrowError> {
    if Arc::ptr_eq(&batch.schema(), expanded) || batch.schema().as_ref() == expanded.as_ref() {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .zip(expanded.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                return Ok(Arc::clone(column));
            }
            match twins.and_then(|t| t.find(column.as_ref())) {
                Some(twin) if twin.data_type() == field.data_type() => Ok(twin),
                _ => cast(column, field.data_type()),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(expanded), columns)
}

/// View arrays made over offset arrays (their twins), found by the address of their
/// views: for rows that are sent many times, casting a view array to what is sent
/// becomes taking a slice of its twin. The views reference the twin's values buffer, so
/// a twin costs its offsets (4 bytes a row) beside the views.
#[derive(Debug, Default)]
pub struct ViewTwins {
    by_views: RwLock<BTreeMap<usize, Twin>>,
}

#[derive(Debug)]
struct Twin {
    /// The view array as made, which holds its views (their address is the key).
    view: ArrayRef,
    /// The same values as an offset array.
    twin: ArrayRef,
}

impl ViewTwins {
    /// `batches` with each top-level view column made again over a twin offset array
    /// that this registry remembers until the returned guard drops.
    pub fn twin(
        self: &Arc<Self>,
        batches: Vec<RecordBatch>,
    ) -> Result<(Vec<RecordBatch>, TwinRegistration), ArrowError> {
        let mut registration = TwinRegistration {
            twins: Arc::clone(self),
            keys: Vec::new(),
            bytes: 0,
        };
        let mut made = Vec::with_capacity(batches.len());
        for batch in batches {
            let mut columns = batch.columns().to_vec();
            for column in &mut columns {
                let (view, twin): (ArrayRef, ArrayRef) = match column.data_type() {
                    DataType::Utf8View => {
                        let twin = cast(column, &DataType::Utf8)?;
                        let view = StringViewArray::from(twin.as_string::<i32>());
                        (Arc::new(view), twin)
                    }
                    DataType::BinaryView => {
                        let twin = cast(column, &DataType::Binary)?;
                        let view = BinaryViewArray::from(twin.as_binary::<i32>());
                        (Arc::new(view), twin)
                    }
                    _ => continue,
                };
                if view.is_empty() {
                    continue;
                }
                // The views share the twin's values; its offsets and validity are extra.
                let shared: usize = data_buffers(view.as_ref())
                    .iter()
                    .map(|b| b.capacity())
                    .sum();
                registration.bytes += twin.get_array_memory_size().saturating_sub(shared);
                let key = views_address(view.as_ref());
                registration.keys.push(key);
                *column = Arc::clone(&view);
                self.by_views.write().insert(key, Twin { view, twin });
            }
            made.push(RecordBatch::try_new(batch.schema(), columns)?);
        }
        Ok((made, registration))
    }

    /// The twin of `array`'s rows, when `array` is a registered view array or a slice of
    /// one, with the same validity.
    pub fn find(&self, array: &dyn Array) -> Option<ArrayRef> {
        let address = views_address(array);
        if address == 0 {
            return None;
        }
        let map = self.by_views.read();
        let (&base, entry) = map.range(..=address).next_back()?;
        let distance = address - base;
        let row = distance / VIEW_SIZE;
        if !distance.is_multiple_of(VIEW_SIZE)
            || row + array.len() > entry.view.len()
            || entry.view.data_type() != array.data_type()
            || !same_buffers(data_buffers(array), data_buffers(entry.view.as_ref()))
        {
            return None;
        }
        // Same views; the validity must be the registered one too (`nullif` keeps the
        // views and changes it).
        let same_validity = match (array.nulls(), entry.view.nulls()) {
            (None, None) => true,
            (Some(nulls), Some(registered)) => {
                nulls.buffer().as_ptr() == registered.buffer().as_ptr()
                    && nulls.offset() == registered.offset() + row
            }
            _ => false,
        };
        same_validity.then(|| entry.twin.slice(row, array.len()))
    }

    /// View arrays remembered.
    pub fn len(&self) -> usize {
        self.by_views.read().len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Forgets its view arrays when dropped.
#[derive(Debug)]
pub struct TwinRegistration {
    twins: Arc<ViewTwins>,
    keys: Vec<usize>,
    /// Bytes the twins hold beyond the view arrays (their offsets).
    pub bytes: usize,
}

impl Drop for TwinRegistration {
    fn drop(&mut self) {
        let mut map = self.twins.by_views.write();
        for key in &self.keys {
            map.remove(key);
        }
    }
}

/// Bytes of one view.
const VIEW_SIZE: usize = 16;

/// Where the first view of a top-level view array lies; 0 for other arrays.
fn views_address(array: &dyn Array) -> usize {
    match array.data_type() {
        DataType::Utf8View => array.as_string_view().views().inner().as_ptr() as usize,
        DataType::BinaryView => array.as_binary_view().views().inner().as_ptr() as usize,
        _ => 0,
    }
}

/// A view array's data buffers; none for other arrays.
fn data_buffers(array: &dyn Array) -> &[Buffer] {
    match array.data_type() {
        DataType::Utf8View => array.as_string_view().data_buffers(),
        DataType::BinaryView => array.as_binary_view().data_buffers(),
        _ => &[],
    }
}

/// Whether two lists of buffers are the same memory.
fn same_buffers(a: &[Buffer], b: &[Buffer]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.as_ptr() == b.as_ptr() && a.len() == b.len())
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
    use datafusion::arrow::array::{BooleanArray, Int32Array, StringArray, UInt32Array};
    use datafusion::arrow::compute::{nullif, take};

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
        let out = expand_batch(batch.slice(0, 1), &target, None).unwrap();
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

    /// Strings of 0 to 40 bytes (some not ASCII) and nulls, in a fixed pseudo-random order.
    fn mixed_strings(n: usize) -> StringArray {
        let mut state = 7u64;
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = (state >> 33) as usize % 41;
                (!state.is_multiple_of(11)).then(|| {
                    let mut value = String::new();
                    for c in format!("{i}é").chars().cycle() {
                        if value.len() + c.len_utf8() > len {
                            break;
                        }
                        value.push(c);
                    }
                    value
                })
            })
            .collect()
    }

    fn expand_one(column: ArrayRef, twins: &ViewTwins) -> ArrayRef {
        let batch = RecordBatch::try_from_iter([("c", column)]).unwrap();
        let expanded = expand_schema(&batch.schema());
        Arc::clone(
            expand_batch(batch, &expanded, Some(twins))
                .unwrap()
                .column(0),
        )
    }

    #[test]
    fn twinned_views_are_sent_as_slices_of_their_twins() {
        let strings = mixed_strings(3_000);
        let binary = cast(&strings, &DataType::Binary).unwrap();
        let batch = RecordBatch::try_from_iter([
            (
                "s",
                Arc::new(StringViewArray::from_iter(strings.iter())) as ArrayRef,
            ),
            ("b", cast(&binary, &DataType::BinaryView).unwrap()),
            (
                "i",
                Arc::new(Int32Array::from_iter_values(0..3_000)) as ArrayRef,
            ),
        ])
        .unwrap();
        let twins = Arc::new(ViewTwins::default());
        let (made, registration) = twins.twin(vec![batch.clone()]).unwrap();
        let made = &made[0];
        assert_eq!(twins.len(), 2);
        assert!(registration.bytes >= 2 * 4 * 3_000, "offsets counted");
        assert_eq!(made, &batch, "same rows");
        assert!(Arc::ptr_eq(made.column(2), batch.column(2)));
        for (offset, len) in [(0, 3_000), (0, 1), (17, 100), (1_500, 1_500), (2_999, 1)] {
            for column in 0..2 {
                let slice = made.column(column).slice(offset, len);
                let expected = cast(&slice, &expand_type(slice.data_type())).unwrap();
                let out = expand_one(slice, &twins);
                assert_eq!(out.as_ref(), expected.as_ref(), "{column}: {offset}+{len}");
                // Not a copy: the values are the twin's, which the views share.
                let values = out.to_data().buffers()[1].as_ptr() as usize;
                let whole = data_buffers(made.column(column).as_ref())[0]
                    .as_slice()
                    .as_ptr_range();
                assert!(
                    whole.contains(&(values as *const u8)),
                    "{column}: {offset}+{len} copied"
                );
            }
        }
        drop(registration);
        assert!(twins.is_empty());
        let slice = made.column(0).slice(17, 100);
        assert!(twins.find(slice.as_ref()).is_none());
        assert_eq!(
            expand_one(Arc::clone(&slice), &twins).as_ref(),
            cast(&slice, &DataType::Utf8).unwrap().as_ref()
        );
    }

    #[test]
    fn other_arrays_sharing_twinned_buffers_are_cast() {
        let strings = mixed_strings(1_000);
        let batch = RecordBatch::try_from_iter([(
            "s",
            Arc::new(StringViewArray::from_iter(strings.iter())) as ArrayRef,
        )])
        .unwrap();
        let twins = Arc::new(ViewTwins::default());
        let (made, _registration) = twins.twin(vec![batch]).unwrap();
        let views = made[0].column(0);
        // The same views and values, other validity (what `nullif` makes).
        let mask = BooleanArray::from_iter((0..1_000).map(|i| Some(i % 3 == 0)));
        let masked = nullif(views.as_ref(), &mask).unwrap();
        // The same buffers read as another type.
        let as_binary = cast(views, &DataType::BinaryView).unwrap();
        // Rows chosen from it: new views.
        let taken = take(views.as_ref(), &UInt32Array::from(vec![5, 3, 900]), None).unwrap();
        // Made the same way but not registered.
        let unregistered: ArrayRef = Arc::new(StringViewArray::from(&strings));
        for (name, column) in [
            ("masked", masked),
            ("as binary", as_binary),
            ("taken", taken),
            ("unregistered", unregistered),
        ] {
            assert!(twins.find(column.as_ref()).is_none(), "{name} found");
            let expected = cast(&column, &expand_type(column.data_type())).unwrap();
            assert_eq!(
                expand_one(column, &twins).as_ref(),
                expected.as_ref(),
                "{name}"
            );
        }
    }

    #[test]
    fn plain_schemas_are_shared() {
        let schema = Arc::new(Schema::new(vec![Field::new("i", DataType::Int64, true)]));
        assert!(Arc::ptr_eq(&schema, &expand_schema(&schema)));
    }
}
