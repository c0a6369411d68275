use std::time::{Duration, Instant};

use futures::StreamExt;

use super::*;

/// A sort of ~21 MB of rows, far over a 2 MiB pool.
const BIG_SORT: &str = "SELECT value, repeat('x', 100) AS s FROM generate_series(1, 200000) \
                        ORDER BY s DESC, value DESC";

async fn engine(limit: usize, pool: PoolKind, spill: bool) -> Arc<QueryEngine> {
    let options = QueryOptions {
        cpu_threads: 2,
        // DataFusion sets 10 MB aside per sort for merging spills: more than these pools.
        datafusion_config: vec![(
            "datafusion.execution.sort_spill_reservation_bytes".into(),
            "262144".into(),
        )],
        memory: MemoryOptions {
            limit,
            pool,
            max_spill_bytes: if spill { 1 << 30 } else { 0 },
            ..MemoryOptions::default()
        },
        ..QueryOptions::default()
    };
    Arc::new(QueryEngine::new(vec![], options).await.unwrap())
}

/// Runs `sql` to the end on the CPU runtime: rows, or the error.
async fn run(engine: &Arc<QueryEngine>, sql: &str) -> Result<(usize, i64)> {
    let Execution {
        mut stream,
        report,
        mut query,
        ..
    } = engine.execute(sql).await?;
    engine
        .cpu()
        .run(async move {
            let _report = report;
            query.finish(crate::metrics::Outcome::Success);
            let (mut rows, mut first) = (0, None);
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                if first.is_none() && batch.num_rows() > 0 {
                    let col = batch.column(0);
                    let col = col
                        .as_any()
                        .downcast_ref::<datafusion::arrow::array::Int64Array>()
                        .expect("int64");
                    first = Some(col.value(0));
                }
                rows += batch.num_rows();
            }
            Ok((rows, first.unwrap_or_default()))
        })
        .await
}

async fn wait_idle(engine: &QueryEngine) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.memory_pool().reserved() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.memory_pool().reserved()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_over_the_limit_spills_and_the_pool_returns_to_idle() {
    // A fifth of what the sort holds: it must spill to finish.
    let engine = engine(4 << 20, PoolKind::Fair, true).await;
    assert_eq!(engine.memory_pool().reserved(), 0);
    let (rows, first) = run(&engine, BIG_SORT).await.unwrap();
    // Oracle: the sort's answer is known in closed form.
    assert_eq!((rows, first), (200_000, 200_000));
    assert_eq!(wait_idle(&engine).await, 0, "success leaks nothing");
    let totals = engine.scan_totals();
    assert!(
        totals.spill_files > 0 && totals.spilled_bytes > 0,
        "{totals:?}"
    );
    let pool = engine.metered_pool();
    assert_eq!(pool.allocated_total(), pool.freed_total());
    assert!(
        pool.peak() > 0 && pool.peak() <= 4 << 20,
        "peak {}",
        pool.peak()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_spill_space_it_fails_with_resources_exhausted_naming_consumers() {
    let engine = engine(2 << 20, PoolKind::Greedy, false).await;
    let err = run(&engine, BIG_SORT).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.to_string().contains("consumers"), "{err}");
    assert_eq!(wait_idle(&engine).await, 0, "an error leaks nothing");
    // The engine is fine afterwards.
    assert_eq!(run(&engine, "SELECT 42::BIGINT").await.unwrap(), (1, 42));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_query_returns_its_memory() {
    let engine = engine(64 << 20, PoolKind::Fair, true).await;
    let Execution {
        mut stream,
        report,
        query,
        ..
    } = engine.execute(BIG_SORT).await.unwrap();
    let pool = engine.memory_pool();
    let first = engine
        .cpu()
        .run(async move {
            let batch = stream.next().await.unwrap()?;
            assert!(
                pool.reserved() > 0,
                "the sort holds memory while it streams"
            );
            // Dropping the stream here (client gone) must release the sort's reservation.
            drop(stream);
            drop(report);
            drop(query);
            Ok(batch.num_rows())
        })
        .await
        .unwrap();
    assert!(first > 0);
    assert_eq!(wait_idle(&engine).await, 0, "cancel leaks nothing");
}

/// `n` copies of `term` joined by `op`.
fn chain(term: &str, op: &str, n: usize) -> String {
    vec![term; n].join(op)
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_at_the_default_limits_plan_and_run_on_the_default_stack() {
    let engine = engine(64 << 20, PoolKind::Fair, false).await;
    let depth = SqlLimits::default().max_depth;
    // `1 + 1 + ...` of n terms nests n levels: the deepest allowed, planned and run
    // (planning constant-folds it, execution of a column chain recurses too).
    let sql = format!("SELECT {}::BIGINT", chain("1", " + ", depth));
    assert_eq!(run(&engine, &sql).await.unwrap(), (1, depth as i64));
    let sql = format!(
        "SELECT sum({}) FROM generate_series(1, 3)",
        chain("value", " + ", depth - 1)
    );
    assert_eq!(
        run(&engine, &sql).await.unwrap(),
        (1, 6 * (depth as i64 - 1))
    );
    let sql = format!(
        "SELECT count(*) FROM generate_series(1, 2000) WHERE {}",
        (0..depth - 2)
            .map(|i| format!("value = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    );
    assert_eq!(run(&engine, &sql).await.unwrap(), (1, depth as i64 - 3));
    let sql = chain(
        "SELECT 1::BIGINT",
        " UNION ALL ",
        SqlLimits::default().max_set_operations + 1,
    );
    let (rows, _) = run(&engine, &sql).await.unwrap();
    assert_eq!(rows, SqlLimits::default().max_set_operations + 1);
    // One more level is refused before planning, naming the flag.
    let sql = format!("SELECT {}", chain("1", " + ", depth + 1));
    let err = run(&engine, &sql).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.to_string().contains("--max-sql-depth"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_deepest_text_within_the_size_limit_is_refused_without_overflowing() {
    let engine = engine(64 << 20, PoolKind::Fair, false).await;
    // Half a million terms: the parser builds a tree that deep; it is measured without
    // recursing past the limit and dropped on the query runtime's stack.
    let max = SqlLimits::default().max_bytes;
    let sql = format!("SELECT {}", chain("1", "+", (max - 8) / 2));
    assert!(sql.len() <= max);
    let err = run(&engine, &sql).await.unwrap_err();
    assert!(err.to_string().contains("--max-sql-depth"), "{err}");
    let sql = format!("SELECT {}", chain("1", "+", max / 2 + 1));
    let err = run(&engine, &sql).await.unwrap_err();
    assert!(err.to_string().contains("--max-sql-size"), "{err}");
    for sql in [
        chain("SELECT 1", " UNION ALL ", 20_000),
        format!("SELECT 1 WHERE {}", chain("true", " AND ", 200_000)),
        format!("SELECT {}", chain("'a'", " || ", 200_000)),
    ] {
        let err = run(&engine, &sql).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
    assert_eq!(run(&engine, "SELECT 7::BIGINT").await.unwrap(), (1, 7));
}

#[tokio::test(flavor = "multi_thread")]
async fn function_outputs_are_capped_before_they_are_allocated() {
    let engine = engine(64 << 20, PoolKind::Fair, false).await;
    for sql in [
        "SELECT length(repeat('x', 800000000))::BIGINT",
        "SELECT cardinality(range(1, 1000000000))::BIGINT",
        "SELECT length(lpad('x', 2000000000))::BIGINT",
        "SELECT length(repeat('x', 1000000) || repeat('y', 1000000))::BIGINT",
        "SELECT length(concat(repeat('x', 1000000), repeat('y', 1000000)))::BIGINT",
        "SELECT max(length(repeat('x', 40000) || value::varchar))::BIGINT FROM generate_series(1, 100000)",
    ] {
        let err = run(&engine, sql).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{sql}: {err}");
        assert!(err.to_string().contains("--max-function-output"), "{err}");
    }
    assert_eq!(
        run(&engine, "SELECT length(repeat('ab', 1000) || 'c')::BIGINT")
            .await
            .unwrap(),
        (1, 2001)
    );
    // A chain of `||` at the depth limit is one capped call: it plans quickly.
    let sql = format!(
        "SELECT length({})::BIGINT",
        chain("'ab'", " || ", SqlLimits::default().max_depth - 2)
    );
    let started = Instant::now();
    assert_eq!(
        run(&engine, &sql).await.unwrap(),
        (1, 2 * (SqlLimits::default().max_depth as i64 - 2))
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // NULL anywhere makes NULL, as `||` does.
    let sql =
        "SELECT count(*) FROM (SELECT 'a' || CAST(NULL AS VARCHAR) || 'b' AS s) WHERE s IS NULL";
    assert_eq!(run(&engine, sql).await.unwrap(), (1, 1));
}

/// What runs after planning on the query's task (`execute_then`) hands over what it
/// prepared; when it hands nothing over, or panics first, the caller gets an internal error
/// saying so (with the panic), the query is not left listed, and the engine goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_continuation_that_hands_nothing_over_fails_the_query_cleanly() {
    let engine = engine(64 << 20, PoolKind::Fair, false).await;
    let (rows, _done) = engine
        .execute_then("SELECT 1 AS one", |execution, planned| async move {
            let schema = execution.stream.schema();
            planned.ready(schema.fields().len());
        })
        .await
        .unwrap();
    assert_eq!(rows, 1);

    let dropped = engine
        .execute_then(
            "SELECT 1 AS one",
            |_execution, planned: Planned<()>| async move {
                drop(planned);
            },
        )
        .await
        .err()
        .unwrap();
    assert!(
        dropped
            .to_string()
            .contains("ended before the query was planned"),
        "{dropped}"
    );

    let panicked = engine
        .execute_then(
            "SELECT 1 AS one",
            |_execution, _planned: Planned<()>| async move {
                panic!("a continuation that panics");
            },
        )
        .await
        .err()
        .unwrap();
    let message = panicked.to_string();
    assert!(message.contains("failed while planning"), "{message}");
    assert!(message.contains("panic"), "{message}");

    // Nothing is left listed, and the next query runs.
    assert_eq!(run(&engine, "SELECT 7").await.unwrap(), (1, 7));
    assert!(engine.active_queries().is_empty());
}
