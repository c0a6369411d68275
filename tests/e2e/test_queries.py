"""Query results from the real server, through pyarrow.flight, against DuckDB over pyarrow.dataset.

Each query runs twice: on Quiver over Arrow Flight, and on DuckDB whose tables are
pyarrow.dataset views of the same files. Rows must be equal (floats to 1e-9 relative,
unordered unless the query orders).
"""

import re
import datetime as dt
import decimal
import math

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from conftest import requests_dataset

# (name, SQL for Quiver, SQL for DuckDB if the dialects differ, ordered?)
QUERIES = [
    ("count", "SELECT COUNT(*) AS n FROM requests", None, False),
    ("group_by_partitions", "SELECT day, service, COUNT(*) AS n FROM requests GROUP BY day, service", None, False),
    (
        "partition_filter_full_rows",
        "SELECT * FROM requests WHERE day = DATE '2026-01-02' AND service = 'api'",
        None,
        False,
    ),
    ("data_filter", "SELECT request_id, status, latency_ms FROM requests WHERE status >= 500", None, False),
    (
        "decimal_and_float_aggregates",
        "SELECT service, SUM(cost_usd) AS total, MIN(cost_usd) AS lo, AVG(latency_ms) AS mean FROM requests GROUP BY service",
        None,
        False,
    ),
    ("timestamps", "SELECT region, MIN(ts) AS first, MAX(ts) AS last FROM requests GROUP BY region", None, False),
    (
        "join",
        "SELECT s.team, s.tier, COUNT(*) AS n FROM requests r JOIN services s ON r.service = s.service GROUP BY s.team, s.tier",
        None,
        False,
    ),
    (
        "order_limit",
        "SELECT request_id, latency_ms FROM requests ORDER BY latency_ms DESC, request_id LIMIT 25",
        None,
        True,
    ),
    ("empty", "SELECT request_id, ts, cost_usd FROM requests WHERE status = 999", None, False),
    ("null_filter", "SELECT COUNT(*) AS n FROM requests WHERE user_id IS NULL", None, False),
    ("null_group", "SELECT error, COUNT(*) AS n FROM requests GROUP BY error", None, False),
    (
        "strings",
        "SELECT request_id, upper(method) AS m, length(path) AS l FROM requests WHERE path LIKE '/v1/orders/%' AND method = 'POST'",
        None,
        False,
    ),
    ("null_partition", "SELECT day, service, COUNT(*) AS n FROM requests WHERE day IS NULL GROUP BY day, service", None, False),
    (
        "timestamp_range",
        "SELECT request_id, ts FROM requests WHERE ts >= TIMESTAMP '2026-01-02T06:00:00Z' AND ts < TIMESTAMP '2026-01-02T07:00:00Z'",
        "SELECT request_id, ts FROM requests WHERE ts >= TIMESTAMPTZ '2026-01-02 06:00:00+00' AND ts < TIMESTAMPTZ '2026-01-02 07:00:00+00'",
        False,
    ),
    (
        "evolved_schema",
        "SELECT day, COUNT(*) AS n, COUNT(retries) AS with_retries, SUM(retries) AS total FROM requests GROUP BY day",
        None,
        False,
    ),
    (
        "distinct_and_having",
        "SELECT service, COUNT(DISTINCT region) AS regions FROM requests GROUP BY service HAVING COUNT(*) > 100",
        None,
        False,
    ),
    (
        "window",
        "SELECT service, request_id, rank() OVER (PARTITION BY service ORDER BY latency_ms DESC, request_id) AS r "
        "FROM requests WHERE day = DATE '2026-01-03' QUALIFY r <= 3",
        "SELECT service, request_id, rank() OVER (PARTITION BY service ORDER BY latency_ms DESC, request_id) AS r "
        "FROM requests WHERE day = DATE '2026-01-03' QUALIFY r <= 3",
        False,
    ),
    (
        "cte",
        "WITH errs AS (SELECT service, status FROM requests WHERE status >= 500) "
        "SELECT service, status, COUNT(*) AS n FROM errs GROUP BY service, status",
        None,
        False,
    ),
    (
        "subquery_in",
        "SELECT COUNT(*) AS n FROM requests WHERE service IN (SELECT service FROM services WHERE tier = 'critical') AND day > DATE '2026-01-02'",
        None,
        False,
    ),
]


@pytest.fixture(scope="module")
def oracle(dataset):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    requests = requests_dataset(dataset)  # noqa: F841 (DuckDB finds Python variables by name)
    services = ds.dataset(dataset / "services", format="parquet")  # noqa: F841
    con.register("requests", requests)
    con.register("services", services)
    return con


def normalise(value):
    if isinstance(value, float):
        return ("float", value)
    if isinstance(value, decimal.Decimal):
        return ("num", value)
    if isinstance(value, int) and not isinstance(value, bool):
        return ("num", decimal.Decimal(value))
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return ("ts", value.astimezone(dt.timezone.utc))
    return ("v", value)


def rows(table: pa.Table):
    return [tuple(normalise(v) for v in row.values()) for row in table.to_pylist()]


def sort_key(row):
    return tuple((v is None, repr(v)) for v in row)


def values_equal(a, b):
    if a[0] == "float" and b[0] == "float":
        return math.isclose(a[1], b[1], rel_tol=1e-9, abs_tol=1e-9)
    if a[0] != b[0]:
        # DuckDB sums int32 to HUGEINT/decimal and averages to double; compare numerically.
        if {a[0], b[0]} <= {"num", "float"}:
            return math.isclose(float(a[1]), float(b[1]), rel_tol=1e-9)
        return False
    return a[1] == b[1]


@pytest.mark.parametrize("name,sql,oracle_sql,ordered", QUERIES, ids=[q[0] for q in QUERIES])
def test_query_matches_duckdb(server, oracle, name, sql, oracle_sql, ordered):
    ours = server.query(sql)
    theirs = oracle.execute(oracle_sql or sql).to_arrow_table()
    assert ours.column_names == theirs.column_names
    a, b = rows(ours), rows(theirs)
    assert len(a) == len(b), f"{name}: {len(a)} rows vs {len(b)}"
    if not ordered:
        # Sort on the exact values that are not floats; floats are compared approximately.
        a.sort(key=sort_key)
        b.sort(key=sort_key)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        assert all(values_equal(x, y) for x, y in zip(ra, rb)), f"{name}: {ra} != {rb}"
    if name != "empty":
        assert len(a) > 0, f"{name} should return rows"


def test_empty_result_still_has_a_schema(server):
    table = server.query("SELECT request_id, cost_usd FROM requests WHERE 1 = 0")
    assert table.num_rows == 0
    assert table.schema.names == ["request_id", "cost_usd"]
    assert table.schema.field("request_id").type == pa.string()
    assert table.schema.field("cost_usd").type == pa.decimal128(12, 4)


def test_types_are_what_pyarrow_reads(server, dataset):
    ours = server.query("SELECT * FROM requests LIMIT 1").schema
    theirs = requests_dataset(dataset).schema
    for field in theirs:
        if field.name == "service":
            assert ours.field(field.name).type == pa.string()
        else:
            assert ours.field(field.name).type == field.type, field.name


def test_explain_analyze_shows_pruning(server, dataset):
    plan = server.query(
        "EXPLAIN ANALYZE SELECT COUNT(*) FROM requests WHERE day = DATE '2026-01-02' AND status = 500"
    )
    text = "\n".join(str(v) for v in plan.column("plan").to_pylist())
    assert "DataSourceExec" in text
    assert "predicate=status@" in text, text
    assert "row_groups_pruned_statistics" in text, text
    # Exactly the files of that day are scanned (the oracle: the files on disk), named
    # relative to the table root.
    scanned = set(re.findall(r"requests/day=[^/\]\], ]+/service=[^/\]\], ]+/part-0\.parquet", text))
    on_disk = {str(p.relative_to(dataset)) for p in (dataset / "requests" / "day=2026-01-02").rglob("*.parquet")}
    assert on_disk and scanned == on_disk, (scanned, on_disk)


def test_explain_shows_partition_and_data_predicates(server, dataset):
    plan = server.query("EXPLAIN SELECT request_id FROM requests WHERE service = 'api' AND latency_ms > 800")
    text = "\n".join(str(v) for v in plan.column("plan").to_pylist())
    assert "latency_ms" in text and "predicate" in text, text
    # Paths are relative to the table: the server's directory layout stays private.
    assert str(dataset).lstrip("/") not in text, text
    assert "requests/day=" in text, text
