"""`--plan-cache-entries`: a repeated statement skips parsing and logical optimization,
and is never planned from a stale table version, for another caller's table access, or
with a function whose value changes by itself. Oracle: DuckDB over pyarrow.dataset of the
same files; what the cache did is read from the server's Prometheus metrics."""

import random
import shutil

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pytest

from conftest import DAYS, Server, make_requests, wait_for, write_atomically
from test_result_cache import oracle, rows, two_callers

SQL = "SELECT service, count(*) AS n, max(latency_ms) AS worst FROM requests WHERE status >= 500 GROUP BY service ORDER BY service"


def counts(s: Server) -> tuple:
    m = s.metrics()
    return tuple(m.get(f"quiver_plan_cache_{k}") for k in ("hits_total", "misses_total", "entries"))


def test_a_repeated_statement_is_planned_once(dataset, tmp_path):
    s = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        expected = [tuple(r) for r in oracle(dataset).execute(SQL).fetchall()]
        assert rows(s.query(SQL)) == expected
        assert counts(s) == (0, 1, 1)
        for _ in range(3):
            assert rows(s.query(SQL)) == expected
        assert counts(s) == (3, 1, 1)
        # A plan is planned physically for each query: every run scanned the table.
        assert s.metrics().get("quiver_table_scans_total", table="requests") == 4
        other = "SELECT count(*) AS n FROM requests WHERE status = 503"
        assert rows(s.query(other)) == [tuple(r) for r in oracle(dataset).execute(other).fetchall()]
        assert counts(s) == (3, 2, 2)
    finally:
        s.stop()


# Kept plans are planned and run without the session's function registry (names are
# resolved before a plan is kept): scalar, capped, aggregate and window functions.
WITH_FUNCTIONS = [
    "SELECT service, upper(service) AS u, length(service) AS l, count(*) AS n FROM requests "
    "GROUP BY service ORDER BY service",
    "SELECT region, sum(status) AS s, count(DISTINCT method) AS m, min(path) AS p, max(error) AS e "
    "FROM requests GROUP BY region ORDER BY region",
    "SELECT service, n, row_number() OVER (ORDER BY n DESC, service) AS r, lag(n) OVER (ORDER BY service) AS prev "
    "FROM (SELECT service, count(*) AS n FROM requests GROUP BY service) AS t ORDER BY service",
    "SELECT service, repeat(service, 2) AS twice, lpad(service, 12, '*') AS padded, "
    "service || '-' || CAST(count(*) AS VARCHAR) AS label, concat(service, '/', min(region)) AS c "
    "FROM requests GROUP BY service ORDER BY service",
    "SELECT CASE WHEN status >= 500 THEN 'error' ELSE lower(method) END AS kind, count(*) AS n "
    "FROM requests WHERE path LIKE '/v1/users/%' OR starts_with(path, '/v1/items/') GROUP BY 1 ORDER BY 1",
]


def test_kept_plans_with_functions_answer_as_when_first_planned(dataset, tmp_path):
    s = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        duck = oracle(dataset)
        for i, sql in enumerate(WITH_FUNCTIONS):
            expected = [tuple(r) for r in duck.execute(sql).fetchall()]
            for _ in range(3):
                assert rows(s.query(sql)) == expected, sql
            # Planned once, then answered twice from its kept plan.
            assert counts(s) == (2 * (i + 1), i + 1, i + 1), sql
    finally:
        s.stop()


def test_zero_turns_it_off(dataset, tmp_path):
    s = Server(["--data-dir", str(dataset), "--plan-cache-entries", "0"], tmp_path)
    try:
        for _ in range(2):
            assert rows(s.query(SQL)) == [tuple(r) for r in oracle(dataset).execute(SQL).fetchall()]
        assert counts(s) == (0, 0, 0)
    finally:
        s.stop()


def test_parameters_are_part_of_the_key(dataset, tmp_path):
    s = Server(["--data-dir", str(dataset)], tmp_path)
    sql = "SELECT count(*) AS n FROM requests WHERE status = $1"
    con = oracle(dataset)
    try:
        with flightsql.connect(f"grpc://{s.addr}") as conn, conn.cursor() as cur:
            def run_all():
                for status in (503, 200):
                    cur.execute(sql, parameters=(status,))
                    assert cur.fetchall() == con.execute(sql.replace("$1", str(status))).fetchall(), status
            run_all()
            hits, misses, entries = counts(s)
            assert entries == 2, counts(s)
            # The same two statements again: planned from the cache, answers unchanged.
            run_all()
            again = counts(s)
            assert again[1] == misses and again[0] > hits and again[2] == 2, (again, hits, misses)
    finally:
        s.stop()


def test_plans_with_values_that_change_by_themselves_are_never_kept(dataset, tmp_path):
    s = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        sql = "SELECT count(*) AS n, now() AS t FROM requests"
        first = s.query(sql)
        second = s.query(sql)
        # now() is folded into a constant while optimizing: a kept plan would repeat it.
        assert second["t"][0].as_py() > first["t"][0].as_py()
        random_sql = "SELECT count(*) AS n FROM requests WHERE random() < 2"
        s.query(random_sql)
        s.query(random_sql)
        hits, _, entries = counts(s)
        assert (hits, entries) == (0, 0), counts(s)
        # Too long to keep (over 4 KiB of text): planned each time, never counted.
        long_sql = SQL + " " * 5000
        assert rows(s.query(long_sql)) == rows(s.query(long_sql))
        assert counts(s)[0] == 0 and counts(s)[2] == 0, counts(s)
        # Under 4 KiB, but a plan of 110 scans of 14 columns each: too heavy to keep.
        heavy = "SELECT count(*) AS n FROM (" + " UNION ALL ".join(["SELECT * FROM requests"] * 110) + ")"
        assert len(heavy) < 4096
        expected = oracle(dataset).execute("SELECT count(*) * 110 FROM requests").fetchall()[0][0]
        assert s.query(heavy)["n"][0].as_py() == s.query(heavy)["n"][0].as_py() == expected
        assert counts(s)[0] == 0 and counts(s)[2] == 0, counts(s)
    finally:
        s.stop()


def test_a_new_table_version_is_planned_again(dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset / "requests", root / "requests")
    s = Server(["--data-dir", str(root), "--refresh-interval", "1s"], tmp_path / "server")
    try:
        sql = "SELECT count(*) AS n FROM requests"
        before = s.query(sql)["n"][0].as_py()
        assert s.query(sql)["n"][0].as_py() == before
        assert counts(s)[0] == 1
        new = make_requests(random.Random(7), DAYS[-1], "billing", 1234, True)
        write_atomically(new, root / "requests" / f"day={DAYS[-1]}" / "service=billing" / "part-0.parquet")
        # A plan kept from the old version would scan the old file list forever.
        wait_for(lambda: s.query(sql)["n"][0].as_py() == before + 1234, what="the new file in the answer")
        assert s.query(sql)["n"][0].as_py() == oracle(root).execute(sql).fetchall()[0][0]
    finally:
        s.stop()


def test_a_plan_is_only_reused_for_the_same_table_access(dataset, tmp_path):
    s, run = two_callers(dataset, tmp_path)
    try:
        sql = "SELECT count(*) AS n FROM requests"
        expected = run(b"alice-token", sql)
        assert run(b"alice-token", sql).equals(expected)
        assert counts(s)[0] == 1
        # Same statement, a caller who may not read the table: missing for them.
        with pytest.raises(pa.ArrowKeyError):
            run(b"svc-token", sql)
        assert counts(s)[0] == 1
    finally:
        s.stop()


def test_the_cache_holds_its_weight_and_no_more(dataset, tmp_path):
    # One entry's room: 256 units. Each plan here weighs over 42 (its 14 columns scanned
    # and filtered, as planned and as optimized), so at most 6 of the 12 fit at once.
    s = Server(["--data-dir", str(dataset), "--plan-cache-entries", "1"], tmp_path)
    con = oracle(dataset)
    try:
        for bound in range(0, 900, 75):
            sql = f"SELECT count(*) AS n FROM requests WHERE latency_ms > {bound}"
            assert rows(s.query(sql)) == [tuple(r) for r in con.execute(sql).fetchall()], sql
        hits, misses, entries = counts(s)
        assert hits == 0 and 1 <= entries <= 6, counts(s)
    finally:
        s.stop()


def keyed_table(root):
    """200,000 rows sorted on `key` (each pinned batch a narrow key range), as
    `root/keyed/part-0.parquet` and an unpinned copy `root/files/part-0.parquet`; 48,000
    rows of 200 columns as `root/wide/part-0.parquet`."""
    import pyarrow.parquet as pq

    n = 200_000
    table = pa.table({
        "key": pa.array(range(n), pa.int64()),
        "label": pa.array([f"label-{i % 97:02d}" for i in range(n)]),
        "amount": pa.array([(i * 7919) % 1000 for i in range(n)], pa.int64()),
    })
    for name in ("keyed", "files"):
        (root / name).mkdir(parents=True)
        pq.write_table(table, root / name / "part-0.parquet", row_group_size=50_000)
    wide = pa.table({f"c{i}": pa.array(range(i, i + 48_000), pa.int64()) for i in range(200)})
    (root / "wide").mkdir(parents=True)
    pq.write_table(wide, root / "wide" / "part-0.parquet")
    return root


# Small queries over a pinned table: their physical plans are kept and run again.
PINNED_SMALL = [
    "SELECT key, label, amount FROM keyed WHERE key >= 120000 AND key < 121000 ORDER BY key",
    "SELECT key, label FROM keyed WHERE key >= 49990 AND key < 50010 AND label <> 'label-03'",
    "SELECT label, count(*) AS n, sum(amount) AS s FROM keyed WHERE key BETWEEN 70000 AND 72000 "
    "GROUP BY label ORDER BY label",
    "SELECT count(*) AS n, min(key) AS lo, max(amount) AS hi FROM keyed WHERE key < 500",
    "SELECT count(*) AS n FROM (SELECT key FROM keyed WHERE key >= 199000 LIMIT 5) AS t",
    # One batch of 200 columns: 200 arrays.
    "SELECT c0, c1, c199 FROM wide WHERE c0 >= 100 AND c0 < 110",
]
# Planned for every query: a scan of files; a join (its build side is state of a run); a
# top-k (its dynamic filter is); a scan holding more arrays than a small query's (six
# batches of 200 columns).
PINNED_REPLANNED = [
    "SELECT key, label FROM files WHERE key >= 120000 AND key < 120100 ORDER BY key",
    "SELECT a.key, b.label FROM keyed a JOIN keyed b ON a.key = b.key "
    "WHERE a.key >= 1000 AND a.key < 1010 AND b.key >= 1000 AND b.key < 1010 ORDER BY a.key",
    "SELECT key, amount FROM keyed WHERE key < 3000 ORDER BY amount DESC, key LIMIT 3",
    "SELECT count(*) AS n, sum(c7) AS s FROM wide WHERE c0 >= 0",
]


def test_kept_physical_plans_of_pinned_scans_run_again_with_their_own_reports(tmp_path):
    """Where every scan of a kept plan reads a pinned table and the plan is small, its physical
    plan is kept too and each query runs a fresh copy: answers equal DuckDB's over the same
    file, run after run and by concurrent clients; each run's scan report (pinned batches
    pruned and scanned, rows skipped) is counted as when it was planned; scans of files,
    joins and plans holding the whole table are planned again for every query."""
    from concurrent.futures import ThreadPoolExecutor

    import duckdb

    root = keyed_table(tmp_path / "data")
    s = Server(["--data-dir", str(root), "--pin-table", "keyed", "--pin-table", "wide"], tmp_path / "server")
    con = duckdb.connect()
    scan_metrics = ("quiver_scan_pinned_batches_pruned_total", "quiver_scan_pinned_batches_scanned_total",
                    "quiver_scan_pinned_rows_skipped_total")

    for name in ("keyed", "files", "wide"):
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{root / name / 'part-0.parquet'}')")

    def expected(sql):
        return sorted(tuple(r) for r in con.execute(sql).fetchall())

    def scans():
        m = s.metrics()
        return tuple(m.get(name) for name in scan_metrics)

    def physical_hits():
        return s.metrics().get("quiver_plan_cache_physical_hits_total")

    try:
        for sql in PINNED_SMALL:
            want = expected(sql)
            before = scans()
            assert sorted(rows(s.query(sql))) == want, sql
            first = tuple(b - a for a, b in zip(before, scans()))
            hits = physical_hits()
            for run in range(3):
                before = scans()
                assert sorted(rows(s.query(sql))) == want, (sql, run)
                # The run's own scan report, as its first run's.
                assert tuple(b - a for a, b in zip(before, scans())) == first, (sql, run)
            assert physical_hits() == hits + 3, sql
            # Concurrent copies of one kept plan.
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: sorted(rows(s.query(sql))), range(16)))
            assert all(a == want for a in answers), sql
            assert physical_hits() == hits + 3 + 16, sql
        for sql in PINNED_REPLANNED:
            want = expected(sql)
            hits = physical_hits()
            for run in range(3):
                assert sorted(rows(s.query(sql))) == want, (sql, run)
            assert physical_hits() == hits, sql
            # Still kept as a logical plan.
            assert s.metrics().get("quiver_plan_cache_hits_total") >= 2
    finally:
        s.stop()
