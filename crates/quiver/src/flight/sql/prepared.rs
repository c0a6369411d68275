//! Flight SQL prepared statements: the per-user store (budgets in statements and bytes,
//! least recently used closed first) and the `DoPut` that binds their parameters.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow_flight::FlightData;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use futures::{Stream, TryStreamExt};
use tonic::Status;

use crate::error::{Error, Result};
use crate::query::{Caller, new_query_id};

/// A parameter stream that does not decode is the client's error, not ours.
/// The one row of parameter values a `DoPut` binds, cast to `types` (`None`: no row).
/// Read batch by batch: a client that streams more than one row is stopped at the first
/// extra row, not buffered. Decodes client bytes, so it is fuzzed (`fuzz/`): arrow-ipc
/// can panic on some malformed messages (fuzz/corpus/fuzz_do_put/crash-boolean-length),
/// and a panic here is the client's error, not the server's.
pub async fn bound_parameters(
    data: impl Stream<Item = Result<FlightData, Status>> + Send + 'static,
    types: &[Option<DataType>],
) -> Result<Option<Vec<ScalarValue>>, Status> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(decode_parameters(data, types))
        .catch_unwind()
        .await
        .unwrap_or_else(|_panic| {
            Err(Error::invalid(
                "the bound parameters are not a valid Arrow IPC stream (the decoder rejected \
                 a malformed message)",
            )
            .into())
        })
}

async fn decode_parameters(
    data: impl Stream<Item = Result<FlightData, Status>> + Send + 'static,
    types: &[Option<DataType>],
) -> Result<Option<Vec<ScalarValue>>, Status> {
    let data = data.map_err(|s| FlightError::Tonic(Box::new(s)));
    let mut batches = FlightRecordBatchStream::new_from_flight_data(data);
    let mut row: Option<RecordBatch> = None;
    while let Some(batch) = batches.try_next().await.map_err(bind_error)? {
        let rows = batch.num_rows() + row.as_ref().map_or(0, RecordBatch::num_rows);
        if rows > 1 {
            return Err(Error::invalid(
                "more than one row of parameters was bound; a query runs with one row \
                 (execute it once per row)",
            )
            .into());
        }
        if batch.num_rows() == 1 {
            row = Some(batch);
        }
    }
    let Some(batch) = row else {
        return Ok(None);
    };
    let values = batch
        .columns()
        .iter()
        .map(|column| ScalarValue::try_from_array(column, 0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)?;
    // Cast now: a value that cannot take its parameter's type fails at bind time, not
    // at the first execution.
    Ok(Some(crate::query::cast_params(values, types)?))
}

fn bind_error(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(status) => *status,
        other => Error::invalid(format!(
            "the bound parameters are not an Arrow IPC stream of one row: {other}"
        ))
        .into(),
    }
}

/// A statement created by `CreatePreparedStatement`, and the values bound to it.
#[derive(Debug, Clone)]
pub(super) struct PreparedStatement {
    pub(super) sql: String,
    /// The user who created it (`None` with authentication off); only they may use it.
    pub(super) owner: Option<Arc<str>>,
    /// Parameter types, `$1` first.
    pub(super) params: Vec<Option<DataType>>,
    /// The last row bound with `DoPut`.
    pub(super) bound: Option<Vec<ScalarValue>>,
    pub(super) last_used: Instant,
}

impl PreparedStatement {
    /// The values to run with; every parameter must be bound.
    pub(super) fn values(&self) -> Result<Vec<ScalarValue>> {
        match &self.bound {
            Some(values) => Ok(values.clone()),
            None if self.params.is_empty() => Ok(vec![]),
            None => Err(Error::invalid(format!(
                "the prepared statement has {} parameter(s) and none are bound: bind them \
                 with DoPut(CommandPreparedStatementQuery) first",
                self.params.len()
            ))),
        }
    }

    /// Bytes the statement keeps: its text, parameter types and bound values.
    fn size(&self) -> usize {
        size_of::<Self>()
            + self.sql.len()
            + self.params.len() * size_of::<Option<DataType>>()
            + self
                .bound
                .as_ref()
                .map_or(0, |values| values.iter().map(ScalarValue::size).sum())
    }
}

/// What one user may keep open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedLimits {
    /// Statements per user (`--max-prepared-statements`).
    pub max_statements: usize,
    /// Bytes of statements and bound values per user (`--max-prepared-statement-bytes`).
    pub max_bytes: usize,
}

impl Default for PreparedLimits {
    fn default() -> Self {
        Self {
            max_statements: crate::flight::DEFAULT_MAX_PREPARED_STATEMENTS,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Open prepared statements by handle. Each user has a budget of statements and bytes;
/// when creating or binding would pass it, the user's own least recently used statements
/// are closed (clients that never close theirs cannot exhaust the server, and cannot
/// close anyone else's).
#[derive(Debug)]
pub(super) struct PreparedStatements {
    limits: PreparedLimits,
    map: Mutex<HashMap<Bytes, PreparedStatement>>,
}

impl PreparedStatements {
    pub(super) fn new(limits: PreparedLimits) -> Self {
        Self {
            limits: PreparedLimits {
                max_statements: limits.max_statements.max(1),
                max_bytes: limits.max_bytes,
            },
            map: Mutex::default(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub(super) fn insert(&self, statement: PreparedStatement) -> Result<Bytes> {
        let handle = Bytes::from(format!("ps-{}{}", new_query_id(), new_query_id()));
        let owner = statement.owner.clone();
        let mut map = self.map.lock();
        self.check_alone(&statement)?;
        map.insert(handle.clone(), statement);
        self.evict(&mut map, &owner, &handle);
        Ok(handle)
    }

    /// A statement larger than the whole budget is refused outright.
    fn check_alone(&self, statement: &PreparedStatement) -> Result<()> {
        if statement.size() > self.limits.max_bytes {
            return Err(Error::invalid(format!(
                "the prepared statement and its bound values take {} bytes, over the {} \
                 bytes each user may keep (--max-prepared-statement-bytes)",
                statement.size(),
                self.limits.max_bytes
            )));
        }
        Ok(())
    }

    /// Closes `owner`'s least recently used statements, other than `keep`, until the
    /// owner is within budget.
    fn evict(
        &self,
        map: &mut HashMap<Bytes, PreparedStatement>,
        owner: &Option<Arc<str>>,
        keep: &Bytes,
    ) {
        loop {
            let (count, bytes, oldest) = map.iter().filter(|(_, s)| &s.owner == owner).fold(
                (0, 0, None),
                |(count, bytes, oldest), (h, s)| {
                    let older = match oldest {
                        Some((_, t)) if t <= s.last_used => oldest,
                        _ if h == keep => oldest,
                        _ => Some((h, s.last_used)),
                    };
                    (count + 1, bytes + s.size(), older)
                },
            );
            let over = count > self.limits.max_statements || bytes > self.limits.max_bytes;
            let Some((oldest, _)) = oldest.filter(|_| over) else {
                break;
            };
            let oldest = oldest.clone();
            tracing::debug!("closing the least recently used prepared statement");
            map.remove(&oldest);
        }
    }

    /// The statement, if `caller` created it.
    pub(super) fn get(&self, handle: &Bytes, caller: &Caller) -> Result<PreparedStatement> {
        self.with(handle, caller, |s| {
            s.last_used = Instant::now();
            s.clone()
        })
    }

    pub(super) fn bind(
        &self,
        handle: &Bytes,
        caller: &Caller,
        values: Option<Vec<ScalarValue>>,
    ) -> Result<()> {
        let mut map = self.map.lock();
        let statement = Self::owned(&mut map, handle, caller)?;
        let mut bound = statement.clone();
        bound.bound = values;
        self.check_alone(&bound)?;
        *statement = bound;
        self.evict(&mut map, &caller.user, handle);
        Ok(())
    }

    /// Closes the statement. Closing one already closed (or evicted, or unknown) is not
    /// an error: clients close their statements when they are done, whatever happened
    /// to them meanwhile. Another user's statement is left alone, silently.
    pub(super) fn remove(&self, handle: &Bytes, caller: &Caller) {
        let mut map = self.map.lock();
        if Self::owned(&mut map, handle, caller).is_ok() {
            map.remove(handle);
        }
    }

    fn with<T>(
        &self,
        handle: &Bytes,
        caller: &Caller,
        f: impl FnOnce(&mut PreparedStatement) -> T,
    ) -> Result<T> {
        let mut map = self.map.lock();
        Ok(f(Self::owned(&mut map, handle, caller)?))
    }

    /// The statement under `handle`, if `caller` created it.
    fn owned<'a>(
        map: &'a mut HashMap<Bytes, PreparedStatement>,
        handle: &Bytes,
        caller: &Caller,
    ) -> Result<&'a mut PreparedStatement> {
        match map.get_mut(handle) {
            Some(statement) if statement.owner == caller.user => Ok(statement),
            _ => {
                let shown: String = String::from_utf8_lossy(handle).chars().take(64).collect();
                Err(Error::invalid(format!(
                    "no open prepared statement has the handle {shown:?}: it was closed, \
                     replaced after newer ones filled your --max-prepared-statements or \
                     --max-prepared-statement-bytes, or belongs to another user; prepare it again"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_statements_evict_the_least_recently_used() {
        let statements = PreparedStatements::new(PreparedLimits {
            max_statements: 2,
            max_bytes: 1 << 20,
        });
        let statement = || PreparedStatement {
            sql: "SELECT 1".into(),
            owner: None,
            params: vec![],
            bound: None,
            last_used: Instant::now(),
        };
        let anyone = Caller::default();
        let a = statements.insert(statement()).unwrap();
        let b = statements.insert(statement()).unwrap();
        statements.get(&a, &anyone).unwrap();
        let c = statements.insert(statement()).unwrap();
        assert!(statements.get(&a, &anyone).is_ok());
        assert!(
            statements.get(&b, &anyone).is_err(),
            "b was least recently used"
        );
        assert!(statements.get(&c, &anyone).is_ok());
        // Another user's handle is as good as unknown.
        let bob = Caller {
            user: Some("bob".into()),
            ..Caller::default()
        };
        assert!(statements.get(&a, &bob).is_err());
        // Another user's close does nothing; the owner's closes it, twice is fine.
        statements.remove(&a, &bob);
        assert!(statements.get(&a, &anyone).is_ok());
        statements.remove(&a, &anyone);
        statements.remove(&a, &anyone);
        assert!(statements.get(&a, &anyone).is_err());
    }

    #[test]
    fn budgets_are_per_user_and_in_bytes() {
        let statements = PreparedStatements::new(PreparedLimits {
            max_statements: 2,
            max_bytes: 4096,
        });
        let as_user = |name: &str| Caller {
            user: Some(name.into()),
            ..Caller::default()
        };
        let statement = |user: &str, sql_len: usize| PreparedStatement {
            sql: "x".repeat(sql_len),
            owner: Some(user.into()),
            params: vec![],
            bound: None,
            last_used: Instant::now(),
        };
        let (alice, bob) = (as_user("alice"), as_user("bob"));
        let a1 = statements.insert(statement("alice", 10)).unwrap();
        let a2 = statements.insert(statement("alice", 10)).unwrap();
        // Bob's statements never close Alice's.
        for _ in 0..5 {
            statements.insert(statement("bob", 10)).unwrap();
        }
        assert!(statements.get(&a1, &alice).is_ok());
        assert!(statements.get(&a2, &alice).is_ok());
        assert_eq!(statements.len(), 4);
        // Bytes: a big statement pushes out the user's older ones, and one over the
        // whole budget is refused.
        let big = statements.insert(statement("alice", 3000)).unwrap();
        assert!(statements.get(&a1, &alice).is_err());
        assert!(statements.get(&big, &alice).is_ok());
        let err = statements.insert(statement("alice", 5000)).unwrap_err();
        assert!(
            err.to_string().contains("--max-prepared-statement-bytes"),
            "{err}"
        );
        // Binding a large value counts too.
        let b = statements.insert(statement("bob", 10)).unwrap();
        let err = statements
            .bind(
                &b,
                &bob,
                Some(vec![ScalarValue::from("v".repeat(5000).as_str())]),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("--max-prepared-statement-bytes"),
            "{err}"
        );
    }
}
