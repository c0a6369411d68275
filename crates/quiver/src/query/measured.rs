//! A runtime filter in the Parquet decoder that measures what it passes, and stops
//! filtering there while it passes too many rows to pay for itself.
//!
//! A join's runtime filter is a probe of the join's hash table (or an `IN` list of its
//! keys). Evaluated in the decoder, it costs 12-27 ns a row here (one to three hash
//! lookups); what it saves is decoding the other columns of the rows it drops, and the
//! work between the scan and the join. When few rows pass (TPC-H Q17: 0.1%, Q18: under
//! 0.01%) that wins by far; when many pass, the same lookup is paid twice, in the decoder
//! and again in the join (Q5: 15% of lineitem passes, Q8's orders filter 30%, Q9's
//! several filters 5%: 1.3-2x slower than with no filter in the decoder). Which case a
//! query is in is only known once the join's build side is read, so [`Measured`] wraps
//! each runtime filter of a scan that filters while decoding: it evaluates every batch
//! until it has seen [`SAMPLE_ROWS`], then, while more than [`KEEP_BELOW`] of them pass,
//! answers "all pass" without evaluating, except a sample batch that keeps the measure
//! current: the 16th batch after it stopped ([`RESAMPLE_EVERY`]), and twice as far apart
//! each time a sample confirms it (up to [`RESAMPLE_AT_MOST`] batches apart); a sample
//! that drops most of its rows brings the samples close again. A filter that changes (a
//! TopK's bound tightening, a join's filter completing) starts measuring anew.
//!
//! Answering "all pass" is always correct: a runtime filter only drops rows early that
//! its operator drops anyway (the join probes every row it receives, TopK compares every
//! row with its heap). Pruning is unchanged: row groups, pages and files are pruned with
//! a snapshot of the filter itself ([`PhysicalExpr::snapshot`] unwraps this node), and a
//! plan sent to a cluster worker carries the plain filter.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr_common::physical_expr::proto_encode::PhysicalExprEncodeCtx;
use datafusion::physical_expr_common::physical_expr::{
    snapshot_generation, snapshot_physical_expr,
};
use datafusion_proto_models::protobuf::PhysicalExprNode;
use parking_lot::Mutex;

use super::routed::RoutedCase;

/// Rows evaluated before the filter's pass rate is trusted (8 of the decoder's batches).
const SAMPLE_ROWS: u64 = 65_536;

/// A filter that passes more than this fraction of the rows it is measured on is not
/// evaluated in the decoder.
const KEEP_BELOW: f64 = 0.02;

/// While a filter is not evaluated, the batch this many after it stopped still is; the
/// gap doubles with each sample that confirms it (sampling at a fixed one batch in 16 was
/// 55 ms of TPC-H Q9's lineitem scan: four hash probes on 6% of 6M rows).
const RESAMPLE_EVERY: u32 = 16;

/// The widest gap between samples: one a row group (~1M rows) at most, so that a filter
/// whose data changes along the file (clustered keys) is measured again within one.
const RESAMPLE_AT_MOST: u32 = 128;

/// The pass rate measured so far, shared by every copy of one filter in a query (the
/// scan's partitions and files, each opener's rewrite of its columns).
#[derive(Debug, Default)]
struct PassRate {
    /// The filter's generation these counts are for.
    generation: u64,
    evaluated: u64,
    passed: u64,
    /// More than [`KEEP_BELOW`] passed: answer "all pass".
    skipping: bool,
    /// Batches answered since the last one evaluated.
    since_sample: u32,
    /// Batches answered between two samples while skipping.
    gap: u32,
}

impl PassRate {
    /// Whether the next batch is evaluated, for a filter now at `generation`.
    fn evaluate_next(&mut self, generation: u64) -> bool {
        if generation != self.generation {
            *self = Self {
                generation,
                ..Self::default()
            };
        }
        if !self.skipping {
            return true;
        }
        self.since_sample += 1;
        if self.since_sample < self.gap {
            return false;
        }
        self.since_sample = 0;
        true
    }

    /// Counts an evaluated batch of `rows` of which `passed` passed.
    fn record(&mut self, generation: u64, rows: u64, passed: u64) {
        if generation != self.generation {
            return;
        }
        let sampled = self.skipping;
        self.evaluated += rows;
        self.passed += passed;
        if self.evaluated >= SAMPLE_ROWS {
            self.skipping = self.passed as f64 > KEEP_BELOW * self.evaluated as f64;
        }
        self.gap = match (sampled, self.skipping) {
            // Stopped evaluating just now.
            (false, true) => RESAMPLE_EVERY,
            // A sample that passed many rows too: the next one further away.
            (true, true) if passed as f64 > KEEP_BELOW * rows as f64 => {
                (self.gap * 2).min(RESAMPLE_AT_MOST)
            }
            // A sample that dropped most rows: look again soon.
            (true, true) => RESAMPLE_EVERY,
            (_, false) => self.gap,
        };
        // Recent batches weigh more: the rate of a filter whose data changes follows it.
        if self.evaluated >= 16 * SAMPLE_ROWS {
            self.evaluated /= 2;
            self.passed /= 2;
        }
    }
}

/// A runtime filter that the decoder evaluates only while it drops most rows (see the
/// module documentation).
#[derive(Debug)]
pub(crate) struct Measured {
    filter: Arc<dyn PhysicalExpr>,
    rate: Arc<Mutex<PassRate>>,
    /// The filter as this copy evaluates it, for one generation.
    current: Mutex<Option<(u64, Form)>>,
}

/// How a snapshot of the filter is evaluated.
#[derive(Debug, Clone)]
enum Form {
    /// A partitioned join's filter, routed ([`RoutedCase`]).
    Routed(Arc<RoutedCase>),
    /// Any other filter, as DataFusion evaluates it.
    Plain(Arc<dyn PhysicalExpr>),
}

impl Form {
    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        match self {
            Self::Routed(routed) => routed.evaluate(batch),
            Self::Plain(filter) => filter.evaluate(batch),
        }
    }
}

impl Measured {
    /// `filter`, measured.
    pub(crate) fn wrap(filter: Arc<dyn PhysicalExpr>) -> Arc<dyn PhysicalExpr> {
        Self::sharing(filter, Arc::default())
    }

    fn sharing(filter: Arc<dyn PhysicalExpr>, rate: Arc<Mutex<PassRate>>) -> Arc<dyn PhysicalExpr> {
        Arc::new(Self {
            filter,
            rate,
            current: Mutex::default(),
        })
    }

    /// The filter at `generation`, for batches of `schema`: a snapshot taken once per
    /// generation (a dynamic filter evaluated as it is re-reads and remaps its expression
    /// for every batch), routed when it is a partitioned join's CASE.
    fn current(&self, generation: u64, schema: &Schema) -> Result<Form> {
        let mut current = self.current.lock();
        if let Some((taken_at, form)) = current.as_ref()
            && *taken_at == generation
        {
            return Ok(form.clone());
        }
        let snapshot = snapshot_physical_expr(Arc::clone(&self.filter))?;
        let form = match RoutedCase::of(&snapshot, schema) {
            Some(routed) => Form::Routed(Arc::new(routed)),
            None => Form::Plain(snapshot),
        };
        *current = Some((generation, form.clone()));
        Ok(form)
    }
}

impl PartialEq for Measured {
    fn eq(&self, other: &Self) -> bool {
        self.filter.as_ref() == other.filter.as_ref()
    }
}

impl Eq for Measured {}

impl Hash for Measured {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.filter.hash(state);
    }
}

impl fmt::Display for Measured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Measured({})", self.filter)
    }
}

impl PhysicalExpr for Measured {
    fn data_type(&self, input_schema: &Schema) -> Result<DataType> {
        self.filter.data_type(input_schema)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.filter.nullable(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let generation = snapshot_generation(&self.filter);
        if !self.rate.lock().evaluate_next(generation) {
            return Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))));
        }
        let result = self
            .current(generation, batch.schema_ref())?
            .evaluate(batch)?;
        let rows = batch.num_rows();
        let passed = match &result {
            ColumnarValue::Array(array) => array
                .as_boolean_opt()
                .map_or(rows, |mask| mask.true_count()),
            ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))) => rows,
            ColumnarValue::Scalar(_) => 0,
        };
        self.rate
            .lock()
            .record(generation, rows as u64, passed as u64);
        Ok(result)
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.filter]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        let [filter] = <[_; 1]>::try_from(children).map_err(|children| {
            datafusion::error::DataFusionError::Internal(format!(
                "a measured filter has one child, got {}",
                children.len()
            ))
        })?;
        Ok(Self::sharing(filter, Arc::clone(&self.rate)))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.filter.fmt_sql(f)
    }

    /// Pruning (files, row groups, pages) uses the filter as it is now, unwrapped.
    fn snapshot(&self) -> Result<Option<Arc<dyn PhysicalExpr>>> {
        snapshot_physical_expr(Arc::clone(&self.filter)).map(Some)
    }

    /// A worker gets the plain filter.
    fn try_to_proto(&self, ctx: &PhysicalExprEncodeCtx<'_>) -> Result<Option<PhysicalExprNode>> {
        ctx.encode_child(&self.filter).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::{BooleanArray, Int64Array};
    use datafusion::arrow::datatypes::Field;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{
        BinaryExpr, Column, DynamicFilterPhysicalExpr, lit,
    };

    fn batch(values: impl IntoIterator<Item = i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(values))]).unwrap()
    }

    /// Evaluates `filter` on 8192-row batches of keys 0..8192 and returns the rows each
    /// batch passed.
    fn passed_per_batch(filter: &Arc<dyn PhysicalExpr>, batches: usize) -> Vec<usize> {
        (0..batches)
            .map(|_| {
                let batch = batch(0..8192);
                let mask = filter.evaluate(&batch).unwrap().into_array(8192).unwrap();
                let mask: &BooleanArray = mask.as_boolean();
                mask.true_count()
            })
            .collect()
    }

    fn key_below(bound: i64) -> Arc<dyn PhysicalExpr> {
        Arc::new(BinaryExpr::new(
            Arc::new(Column::new("k", 0)),
            Operator::Lt,
            lit(bound),
        ))
    }

    #[test]
    fn a_filter_that_drops_most_rows_is_always_evaluated() {
        // 100 of 8192 pass: 1.2%.
        let filter = Measured::wrap(key_below(100));
        assert_eq!(passed_per_batch(&filter, 64), vec![100; 64]);
    }

    /// Which batches after the first eight were evaluated (a mask that is not all true),
    /// counted from the ninth.
    fn sampled(passed: &[usize]) -> Vec<usize> {
        passed[8..]
            .iter()
            .enumerate()
            .filter(|(_, n)| **n != 8192)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn a_filter_that_passes_many_rows_is_sampled_further_apart() {
        // 4096 of 8192 pass: after 8 batches evaluated, the 16th batch is, then the gap
        // doubles with each sample up to 128 batches.
        let filter = Measured::wrap(key_below(4096));
        let passed = passed_per_batch(&filter, 8 + 600);
        assert_eq!(passed[..8], [4096; 8]);
        assert_eq!(sampled(&passed), [15, 47, 111, 239, 367, 495]);
        assert!(passed.iter().all(|n| *n == 4096 || *n == 8192));
    }

    #[test]
    fn a_sample_that_drops_most_rows_brings_the_samples_close_again() {
        // Half the rows pass for 300 batches (the samples drift 128 batches apart), then
        // the data changes and 10 rows a batch pass: the next sample sees it, and the
        // samples after it come every 16 batches while that lasts.
        let filter = Measured::wrap(key_below(4096));
        let before = sampled(&passed_per_batch(&filter, 8 + 300));
        assert!(before.windows(2).any(|w| w[1] - w[0] == 128), "{before:?}");
        let mut evaluated = vec![];
        for i in 0..400 {
            let keys_from_4086 = batch(4086..4086 + 8192);
            let mask = filter
                .evaluate(&keys_from_4086)
                .unwrap()
                .into_array(8192)
                .unwrap();
            if mask.as_boolean().true_count() == 10 {
                evaluated.push(i);
            }
        }
        assert!(evaluated[0] < 128, "{evaluated:?}");
        assert!(
            evaluated.windows(2).all(|w| w[1] - w[0] == 16),
            "{evaluated:?}"
        );
    }

    #[test]
    fn a_changed_filter_is_measured_again() {
        let dynamic = Arc::new(DynamicFilterPhysicalExpr::new(
            vec![Arc::new(Column::new("k", 0)) as _],
            lit(true),
        ));
        let filter = Measured::wrap(Arc::clone(&dynamic) as _);
        // Everything passes: no longer evaluated.
        assert_eq!(passed_per_batch(&filter, 9)[8], 8192);
        // The filter tightens (a TopK bound, a join's build side read): evaluated again.
        dynamic.update(key_below(10)).unwrap();
        assert_eq!(passed_per_batch(&filter, 20), vec![10; 20]);
    }

    #[test]
    fn copies_share_the_measure_and_snapshots_unwrap() {
        let filter = Measured::wrap(key_below(4096));
        let copy = Arc::clone(&filter)
            .with_new_children(vec![key_below(4096)])
            .unwrap();
        passed_per_batch(&filter, 8);
        // The copy has learnt that the filter passes half.
        assert_eq!(passed_per_batch(&copy, 1), vec![8192]);
        let snapshot = snapshot_physical_expr(filter).unwrap();
        assert_eq!(snapshot.to_string(), key_below(4096).to_string());
    }
}
