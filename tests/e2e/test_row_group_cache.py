"""`--row-group-cache-size`: row groups read twice are decoded into memory, and later scans
take their rows from there (the Parquet scan skipping them). Every answer, from the files,
from the cache, or from a mix of both, equals DuckDB's over the same files; what the cache
did is read from the server's Prometheus metrics. By default only lookups (scans that read
at most an eighth of a file's row groups) use it; most tests here let every scan in
(`--row-group-cache-admit all`). Row groups are decoded into the cache in the background
(the read that asks takes them from the file), so tests wait for the inserts they expect."""

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import Server, requests_dataset, wait_for, write_atomically
# The same table, oracle and client as the chunk cache's tests.
from test_chunk_cache import (
    ROW_GROUP,
    ROWS,
    answer,
    assert_a_query_takes_memory_back,
    assert_evicts_and_holds_its_size,
    cache_stats,
    expected,
    make_table,
)

# Key ranges on the sorted key (one row group each, then one across two), whole-table
# aggregates (a count with no filter must not count cached rows twice), string filters.
QUERIES = [
    "SELECT * FROM t WHERE k >= 10000 AND k < 10750 ORDER BY k",
    "SELECT * FROM t WHERE k >= 61000 AND k < 61400 ORDER BY k",
    "SELECT * FROM t WHERE k >= 29500 AND k < 30600 ORDER BY k",
    "SELECT count(*) AS n FROM t",
    "SELECT count(*) AS n, count(note) AS notes, sum(price) AS s, min(word) AS lo, max(word) AS hi,"
    " count(DISTINCT word) AS words, sum(CAST(flag AS INT)) AS flags FROM t",
    "SELECT word, count(*) AS n, sum(k) AS ks FROM t WHERE k < 45000 GROUP BY word ORDER BY word LIMIT 20",
    "SELECT k, note FROM t WHERE note LIKE '%77%' AND k BETWEEN 5000 AND 40000 ORDER BY k",
    "SELECT k FROM t WHERE k = 90001",
    # Cached string columns go out as slices of offset arrays kept beside them
    # (`wire::views::ViewTwins`); NULLIF keeps a column's views with other validity.
    "SELECT k, NULLIF(word, 'word-0001-x') AS w, note FROM t WHERE k >= 20000 AND k < 20300 ORDER BY k",
]


# Every scan fills and uses the cache.
ALL = ["--row-group-cache-admit", "all"]


def write(table: pa.Table, path, row_group: int = ROW_GROUP) -> None:
    write_atomically(table, path, compression="snappy", row_group_size=row_group, write_page_index=True)


def stats(s: Server) -> dict:
    return cache_stats(s, "row_group_cache")


def test_answers_from_the_cache_equal_duckdb(tmp_path):
    path = tmp_path / "t.parquet"
    write(make_table(1), path)
    s = Server(["--table", f"t={path}", "--row-group-cache-size", "256MiB", *ALL], tmp_path / "server")
    try:
        for sql in QUERIES:
            want = expected(path, sql)
            # First read: remembered; second: decoded into the cache; third: from it.
            for run in range(3):
                assert answer(s, sql) == want, (sql, run)
        # Every query again, now that the cache holds what the others read too: scans
        # that take some row groups from memory and the others from the file.
        for sql in QUERIES:
            assert answer(s, sql) == expected(path, sql), sql
        # Counts read every row group: again until the whole table is cached (two row
        # groups go in per scan, eight at once), each answer equal to DuckDB's.
        count = QUERIES[3]
        after = wait_for(
            lambda: answer(s, count) == expected(path, count)
            and (st := stats(s))["inserts_total"] == ROWS // ROW_GROUP and st,
            what="every row group cached",
        )
        assert after["hits_total"] > 0, after
        assert 0 < after["bytes"] <= 256 * 2**20, after
        # The cache's bytes are reserved from the query pool while kept.
        assert s.metrics().get("quiver_memory_pool_reserved_bytes") >= after["bytes"]
        # A scan of the whole table reads no row group from the file.
        sql = QUERIES[4]
        assert answer(s, sql) == expected(path, sql)
        now = stats(s)
        assert now["misses_total"] == after["misses_total"], (after, now)
        assert now["hits_total"] == after["hits_total"] + ROWS // ROW_GROUP, (after, now)
        # A key range reads only its own row group (pruned by the footer's statistics).
        assert answer(s, QUERIES[0]) == expected(path, QUERIES[0])
        assert stats(s)["hits_total"] == now["hits_total"] + 1
    finally:
        s.stop()


def test_a_partitioned_table_with_evolving_schema_equals_duckdb(dataset, tmp_path):
    """Partition columns, a NULL partition and files without a later column, all from the
    cache."""
    oracle = duckdb.connect()
    oracle.execute("SET TimeZone = 'UTC'")
    requests = requests_dataset(dataset)  # noqa: F841 (DuckDB finds Python variables by name)
    oracle.register("requests", requests)
    queries = [
        "SELECT day, service, count(*) AS n, sum(status) AS st, count(retries) AS r FROM requests"
        " GROUP BY day, service ORDER BY day NULLS FIRST, service",
        "SELECT request_id, retries, day FROM requests WHERE service = 'api' AND status = 503"
        " ORDER BY request_id",
        "SELECT count(*) AS n FROM requests",
        "SELECT count(*) AS n FROM requests WHERE day IS NULL",
    ]
    s = Server(
        ["--data-dir", str(dataset), "--row-group-cache-size", "256MiB", *ALL],
        tmp_path / "server",
    )
    try:
        for sql in queries:
            want = oracle.execute(sql).fetchall()
            for run in range(3):
                assert answer(s, sql) == want, (sql, run)
        # Once decoded (in the background), rows come from the cache, still right.
        count = queries[2]
        want = oracle.execute(count).fetchall()
        wait_for(lambda: answer(s, count) == want and stats(s)["hits_total"] > 0, what="a hit")
    finally:
        s.stop()


def test_scan_counters_count_row_groups_read_from_the_cache(tmp_path):
    """A query reads the same row groups whether they come from the file, are decoded
    into the cache by it, or come from the cache: the scan counters say so, with the
    row groups the footer's statistics rule out as pruned (the oracle: pyarrow's footer
    statistics), and bytes read from the file only while some row group is not cached."""
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    write(make_table(4), path)
    lo, hi = 29500, 30600
    sql = f"SELECT * FROM t WHERE k >= {lo} AND k < {hi} ORDER BY k"
    metadata = pq.ParquetFile(path).metadata
    groups = [metadata.row_group(i).column(0).statistics for i in range(metadata.num_row_groups)]
    overlapping = sum(1 for g in groups if g.max >= lo and g.min < hi)
    assert overlapping == 2 and len(groups) == 4
    s = Server(["--table", f"t={path}", "--row-group-cache-size", "256MiB", *ALL], tmp_path / "server")
    try:
        want = expected(path, sql)
        counters = ("files_scanned", "row_groups_scanned", "row_groups_pruned", "bytes")
        for run in range(4):
            before = s.metrics()
            assert answer(s, sql) == want, run
            after = wait_for(
                lambda: (m := s.metrics()).get("quiver_queries_total", outcome="success")
                > before.get("quiver_queries_total", outcome="success")
                # The second read's decodes, in the background.
                and (run != 1 or m.get("quiver_row_group_cache_inserts_total") == 2)
                and m,
                what="the query's counters",
            )
            delta = {c: after.get(f"quiver_scan_{c}_total") - before.get(f"quiver_scan_{c}_total") for c in counters}
            cache = {c: after.get(f"quiver_row_group_cache_{c}_total") - before.get(f"quiver_row_group_cache_{c}_total")
                     for c in ("hits", "inserts")}
            # File ranges as DataFusion opens them (it splits a file over its partitions);
            # a file whose row groups all come from the cache counts once.
            assert delta["files_scanned"] >= 1, (run, delta)
            assert delta["row_groups_scanned"] == overlapping, (run, delta)
            assert delta["row_groups_pruned"] == len(groups) - overlapping, (run, delta)
            # Read from the file (runs 0 and 1: the second has both decoded into the
            # cache beside it), then from the cache alone.
            assert cache == [{"hits": 0, "inserts": 0}, {"hits": 0, "inserts": 2},
                             {"hits": 2, "inserts": 0}, {"hits": 2, "inserts": 0}][run], (run, cache)
            assert (delta["bytes"] > 0) == (run < 2), (run, delta)
    finally:
        s.stop()


def test_lookups_only_by_default(tmp_path):
    """Without flags the cache is on for lookups: a key range within one of 16 row groups
    is decoded at its second read and served from memory at its third; scans that read
    more than an eighth of the row groups (a wider range, the whole table) never touch
    it. `--row-group-cache-size 0` turns it off."""
    path = tmp_path / "t.parquet"
    write(make_table(2), path, row_group=ROWS // 16)
    lookup = "SELECT * FROM t WHERE k >= 10000 AND k < 10750 ORDER BY k"
    # Four row groups of 16 (the keys are 0..ROWS, sorted).
    wide = "SELECT * FROM t WHERE k >= 7000 AND k < 24000 ORDER BY k"
    whole = "SELECT count(*) AS n, sum(price) AS s, max(word) AS w FROM t"
    s = Server(["--table", f"t={path}"], tmp_path / "server")
    off = Server(["--table", f"t={path}", "--row-group-cache-size", "0"], tmp_path / "off")
    try:
        for sql in (wide, whole):
            for _ in range(3):
                assert answer(s, sql) == expected(path, sql), sql
        assert set(stats(s).values()) == {0}, stats(s)
        want = expected(path, lookup)
        seen = []
        for run in range(3):
            assert answer(s, lookup) == want
            if run == 1:
                wait_for(lambda: stats(s)["inserts_total"] == 1, what="the decode")
            seen.append({k: stats(s)[k] for k in ("hits_total", "inserts_total")})
        assert seen == [{"hits_total": 0, "inserts_total": 0}, {"hits_total": 0, "inserts_total": 1},
                        {"hits_total": 1, "inserts_total": 1}], seen
        # Served from the cache, the rows are cut to the key range exactly: no filter
        # above the scan. Another filter on them stays, and still filters.
        plan = "\n".join(s.query("EXPLAIN " + lookup).column("plan").to_pylist())
        assert "FilterExec" not in plan and "DataSourceExec: partitions=" in plan, plan
        narrower = "SELECT * FROM t WHERE k >= 10000 AND k < 10750 AND price > 500000 ORDER BY k"
        plan = "\n".join(s.query("EXPLAIN " + narrower).column("plan").to_pylist())
        assert "FilterExec: price@1 > 500000" in plan, plan
        assert answer(s, narrower) == expected(path, narrower)
        # The whole table, with one row group cached: still read from the file alone.
        hits = stats(s)["hits_total"]
        assert answer(s, whole) == expected(path, whole)
        assert stats(s)["hits_total"] == hits
        for _ in range(3):
            assert answer(off, lookup) == want
        assert set(stats(off).values()) == {0}, stats(off)
    finally:
        s.stop()
        off.stop()


def test_new_files_are_answered_at_once(tmp_path):
    """A refresh that publishes files makes a new table version: nothing cached for the
    old one answers for it."""
    root = tmp_path / "data" / "t"
    write(make_table(3), root / "part-0.parquet")
    s = Server(
        ["--table", f"t={root}", "--row-group-cache-size", "256MiB", *ALL, "--refresh-interval", "1s"],
        tmp_path / "server",
    )
    sql = "SELECT count(*) AS n, sum(price) AS s FROM t"
    try:
        old = answer(s, sql)
        wait_for(lambda: answer(s, sql) == old and stats(s)["hits_total"] > 0, what="a hit")
        write(make_table(4), root / "part-1.parquet")
        con = duckdb.connect()
        new = con.execute(f"SELECT count(*) AS n, sum(price) AS s FROM read_parquet('{root}/*.parquet')").fetchall()
        assert new != old
        wait_for(lambda: answer(s, sql) == new, what="the new file's rows")
        for _ in range(3):
            assert answer(s, sql) == new
    finally:
        s.stop()


def test_the_cache_holds_its_size(tmp_path):
    path = tmp_path / "t.parquet"
    write(make_table(5), path, row_group=10_000)
    size = 12 << 20
    s = Server(["--table", f"t={path}", "--row-group-cache-size", str(size), *ALL], tmp_path / "server")
    try:
        sql = "SELECT * FROM t ORDER BY k"
        want = expected(path, sql)
        # Two row groups go in per scan (eight at once): scans until some are evicted.
        wait_for(lambda: answer(s, sql) == want and stats(s)["evictions_total"] > 0, what="evictions")
        # 12 row groups of about 1.3 MB decoded (under an eighth of the cache each), 15 MB
        # in all.
        assert_evicts_and_holds_its_size(s, "row_group_cache", size)
    finally:
        s.stop()


@pytest.mark.parametrize("pool", ["fair", "greedy"])
def test_queries_take_memory_back_from_the_cache(tmp_path, pool):
    path = tmp_path / "t.parquet"
    write(make_table(6), path)
    s = Server(
        [
            "--table", f"t={path}",
            "--row-group-cache-size", "64MiB", *ALL,
            "--memory-limit", "24MiB",
            "--memory-pool", pool,
        ],
        tmp_path / "server",
    )
    try:
        assert_a_query_takes_memory_back(s, "row_group_cache", path, 10 * 2**20)
    finally:
        s.stop()


def test_results_split_over_endpoints_read_their_files(dataset, tmp_path):
    """A result split over endpoints is planned again at each DoGet and must find the
    same pieces: its scans read the files, whatever the cache holds meanwhile."""
    from test_endpoints import SCAN, fetch_each, oracle, rows

    s = Server(
        ["--data-dir", str(dataset), "--endpoints-per-query", "4", "--row-group-cache-size", "256MiB", *ALL],
        tmp_path / "server",
    )
    try:
        expected = rows(oracle(dataset))
        for _ in range(3):
            # Unsplit statements over the same row groups fill the cache in between.
            assert s.query(SCAN).num_rows == len(expected)
            info = s.client.get_flight_info(flight.FlightDescriptor.for_command(SCAN.encode()))
            assert len(info.endpoints) == 4
            assert rows(pa.concat_tables(fetch_each(s.client, info))) == expected
            wait_for(lambda: s.query(SCAN).num_rows == len(expected) and stats(s)["hits_total"] > 0, what="a hit")
    finally:
        s.stop()
