"""`--pin-table`: a table served from memory answers like the files, reserves its size from
the query memory pool (and says so in the metrics), refuses to start when it does not fit,
and reloads when new files land. Oracle: DuckDB over pyarrow.dataset of the same files."""

import subprocess
import time

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import DAYS, REPO, Server, make_requests, quiver_binary, requests_dataset, wait_for, write_atomically

QUERIES = [
    "SELECT COUNT(*) AS n FROM requests",
    "SELECT service, COUNT(*) AS n, SUM(status) AS s FROM requests GROUP BY service ORDER BY service",
    # Partition filters: a pinned table leaves them to DataFusion, which must still apply them.
    f"SELECT COUNT(*) AS n FROM requests WHERE day = DATE '{DAYS[1]}' AND service = 'api'",
    "SELECT COUNT(*) AS n FROM requests WHERE day IS NULL",
    "SELECT request_id, latency_ms FROM requests WHERE status = 503 ORDER BY request_id, latency_ms LIMIT 50",
]


@pytest.fixture(scope="module")
def pinned(dataset, tmp_path_factory):
    s = Server(["--data-dir", str(dataset), "--pin-table", "requests"], tmp_path_factory.mktemp("pinned"))
    yield s
    s.stop()


def oracle(dataset):
    con = duckdb.connect()
    requests = requests_dataset(dataset)  # noqa: F841 (DuckDB finds Python variables by name)
    con.register("requests", requests)
    return con


@pytest.mark.parametrize("sql", QUERIES)
def test_pinned_table_answers_like_the_files(pinned, server, dataset, sql):
    got = pinned.query(sql)
    assert got.equals(server.query(sql)), sql
    expected = oracle(dataset).execute(sql).fetchall()
    assert [tuple(r.values()) for r in got.to_pylist()] == [tuple(r) for r in expected]


def test_pinned_bytes_are_reserved_and_exported(pinned):
    m = pinned.metrics()
    pinned_bytes = m.get("quiver_catalog_pinned_bytes")
    assert pinned_bytes > 0
    # Idle: the pool holds exactly the pinned table.
    assert m.get("quiver_memory_pool_reserved_bytes") == pinned_bytes
    # Strings were read as views and are held expanded, as they are sent.
    schema = pinned.query("SELECT * FROM requests LIMIT 1").schema
    assert schema.field("request_id").type == pa.string()


def test_a_table_too_big_for_the_pool_stops_start_up(dataset, tmp_path):
    out = subprocess.run(
        [str(quiver_binary()), "serve", "--data-dir", str(dataset), "--pin-table", "requests",
         "--memory-limit", "64KiB", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "pinning table 'requests'" in out.stderr and "--memory-limit" in out.stderr
    out = subprocess.run(
        [str(quiver_binary()), "serve", "--data-dir", str(dataset), "--pin-table", "nope",
         "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0 and "--pin-table nope: no such table" in out.stderr


def test_new_files_are_loaded_into_the_pinned_table(dataset, tmp_path):
    import random
    import shutil

    root = tmp_path / "data"
    shutil.copytree(dataset / "requests", root / "requests")
    s = Server(["--data-dir", str(root), "--pin-table", "requests", "--refresh-interval", "1s"], tmp_path)
    try:
        before = s.query("SELECT COUNT(*) AS n FROM requests")["n"][0].as_py()
        bytes_before = s.metrics().get("quiver_catalog_pinned_bytes")
        new = make_requests(random.Random(7), DAYS[-1], "billing", 1234, True)
        write_atomically(new, root / "requests" / f"day={DAYS[-1]}" / "service=billing" / "part-0.parquet")
        wait_for(lambda: s.query("SELECT COUNT(*) AS n FROM requests")["n"][0].as_py() == before + 1234,
                 what="the new partition in the pinned table")
        assert s.metrics().get("quiver_catalog_pinned_bytes") > bytes_before
        assert s.query("SELECT COUNT(*) AS n FROM requests WHERE service = 'billing'")["n"][0].as_py() == 1234
    finally:
        s.stop()


def test_both_send_paths_send_pinned_batches_whole(dataset, tmp_path):
    """Pinned batches live in one allocation each (held in their IPC layout, so the
    zero-copy path sends a message body as one chunk). The standard path must not take the
    allocation's size for each column's and cut batches into small messages: both paths
    deliver the same batches, equal to the files. A 64 KiB message limit (each batch's
    rows take less, its allocation's size times its columns more) makes the difference."""
    args = ["--data-dir", str(dataset), "--pin-table", "requests", "--max-flight-data-size", "64KiB"]
    for name in ("zero-copy", "standard"):
        (tmp_path / name).mkdir()
    pinned = Server(args, tmp_path / "zero-copy")
    standard = Server([*args, "--send-path", "standard"], tmp_path / "standard")
    try:
        sql = "SELECT * FROM requests"
        zero_copy_batches = [c.data for c in pinned.client.do_get(flight.Ticket(sql.encode()))]
        standard_batches = [c.data for c in standard.client.do_get(flight.Ticket(sql.encode()))]
        # Partitions interleave in any order: compare the batch sizes as multisets.
        assert sorted(b.num_rows for b in zero_copy_batches) == sorted(b.num_rows for b in standard_batches)
        key = [(name, "ascending") for name in zero_copy_batches[0].schema.names]
        got = pa.Table.from_batches(zero_copy_batches).sort_by(key)
        assert got.equals(pa.Table.from_batches(standard_batches).sort_by(key))
        expected = oracle(dataset).execute(sql).to_arrow_table()
        assert got.num_rows == expected.num_rows
        assert got.select(expected.column_names).cast(expected.schema).equals(expected.sort_by(key))
    finally:
        pinned.stop()
        standard.stop()


def test_a_selective_query_skips_pinned_batches(tmp_path):
    """A pinned table keeps min/max and null counts per batch, so a key range reads only the
    batches that overlap it (as row-group statistics do for the files), and the answer is
    still every matching row. Oracle: DuckDB over the same file."""
    import json
    import re

    import pyarrow.parquet as pq

    n = 200_000
    table = pa.table({
        # Sorted: each batch covers a narrow range of keys.
        "key": pa.array(range(n), pa.int64()),
        "label": pa.array([f"label-{i % 977:04d}" for i in range(n)]),
        "note": pa.array([None if i % 50_000 == 7 else "x" * (i % 90) for i in range(n)]),
    })
    (tmp_path / "data" / "keyed").mkdir(parents=True)
    path = tmp_path / "data" / "keyed" / "part-0.parquet"
    pq.write_table(table, path, row_group_size=50_000)
    s = Server(["--data-dir", str(tmp_path / "data"), "--pin-table", "keyed", "--log-filter", "quiver=debug,info"],
               tmp_path / "server")
    con = duckdb.connect()
    queries = [
        "SELECT key, label FROM keyed WHERE key >= 120000 AND key < 121000 ORDER BY key",
        "SELECT count(*) AS n FROM keyed WHERE key BETWEEN 49990 AND 50010",
        "SELECT key FROM keyed WHERE note IS NULL ORDER BY key",
        "SELECT count(*) AS n FROM keyed WHERE key % 1000 = 3",
        "SELECT count(*) AS n FROM keyed WHERE key < 0 OR key > 199990",
        "SELECT count(*) AS n FROM keyed WHERE label = 'label-0042'",
    ]
    try:
        for sql in queries:
            got = s.query(sql)
            expected = con.execute(sql.replace("FROM keyed", f"FROM read_parquet('{path}')")).fetchall()
            assert [tuple(r.values()) for r in got.to_pylist()] == [tuple(r) for r in expected], sql
        deadline = time.monotonic() + 10
        while len(summaries := re.findall(r"scan summary.*?summary=(\{[^}]*\})", s.logs())) < len(queries):
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.05)
        summaries = [json.loads(m) for m in summaries]
        total = summaries[0]["batches_total"]
        # The Parquet reader's batches (8192 rows by default) over 200000 rows.
        assert total >= 200_000 // 8192, summaries[0]
        # A range of 1000 keys overlaps at most two batches; one of 21 keys across a row
        # group boundary at most two.
        assert total - summaries[0]["batches_pruned"] <= 2, summaries[0]
        assert total - summaries[1]["batches_pruned"] <= 2, summaries[1]
        # NULL notes are in at most 4 batches: the null counts say which.
        assert total - summaries[2]["batches_pruned"] <= 4, summaries[2]
        # Statistics cannot decide `key % 1000 = 3`: every batch is read.
        assert summaries[3]["batches_pruned"] == 0, summaries[3]
        assert total - summaries[4]["batches_pruned"] <= 1, summaries[4]
        # Within a batch read, the sorted key narrows the rows passed on to the range's:
        # the rows skipped are those of the batches read minus the rows that match.
        # Batches are the reader's (8192 rows, never across a row group of 50000).
        batches = [(g + b, min(8192, 50_000 - b)) for g in range(0, n, 50_000) for b in range(0, 50_000, 8192)]
        assert len(batches) == total
        for summary, (lo, hi) in ((summaries[0], (120_000, 121_000)), (summaries[1], (49_990, 50_011))):
            read = sum(size for start, size in batches if start < hi and start + size > lo)
            assert summary["batch_rows_skipped"] == read - (hi - lo), summary
        # The other filters bound no sorted column (an OR is not a range).
        assert all(x["batch_rows_skipped"] == 0 for x in summaries[2:]), summaries
        m = s.metrics()
        assert m.get("quiver_scan_pinned_rows_skipped_total") == sum(x["batch_rows_skipped"] for x in summaries)
        assert m.get("quiver_scan_pinned_batches_pruned_total") == sum(x["batches_pruned"] for x in summaries)
        assert m.get("quiver_scan_pinned_batches_scanned_total") == sum(
            x["batches_total"] - x["batches_pruned"] for x in summaries)
        assert m.get("quiver_table_scans_total", table="keyed") == len(queries)
    finally:
        s.stop()


def test_a_key_range_is_sent_as_the_pinned_slices_it_spans(tmp_path):
    """A key range across two pinned batches reaches the client as those two slices (no
    copy gathers them into one batch), while a filter keeping a few rows of every batch
    still gathers them. Oracle: DuckDB over the same file."""
    import pyarrow.parquet as pq

    n = 50_000
    table = pa.table({"key": pa.array(range(n), pa.int64()), "label": [f"label-{i % 977}" for i in range(n)]})
    (tmp_path / "data" / "keyed").mkdir(parents=True)
    path = tmp_path / "data" / "keyed" / "part-0.parquet"
    pq.write_table(table, path)
    s = Server(["--data-dir", str(tmp_path / "data"), "--pin-table", "keyed"], tmp_path / "server")
    con = duckdb.connect()
    try:
        def check(sql):
            got = s.query(sql)
            expected = con.execute(sql.replace("FROM keyed", f"FROM read_parquet('{path}')") + " ORDER BY key")
            assert sorted(got.to_pylist(), key=lambda r: r["key"]) == [
                dict(zip(("key", "label"), r)) for r in expected.fetchall()], sql
            return sorted(len(c) for c in got["key"].chunks)

        # Batches of 8192 rows: keys 7000..8191 in the first, 8192..9999 in the second.
        assert check("SELECT key, label FROM keyed WHERE key >= 7000 AND key < 10000") == [1192, 1808]
        # 50 rows from each of 7 batches: gathered, not sent 7 times.
        assert len(check("SELECT key, label FROM keyed WHERE key % 1000 = 3")) <= 2
    finally:
        s.stop()


def test_key_ranges_on_a_sorted_pinned_column_are_applied_by_the_table(tmp_path):
    """Comparisons of a column sorted in every pinned batch with a literal of its type are
    applied by the table itself, which cuts each batch to exactly the rows in range: the
    plan has no filter above the scan. Keys repeat (runs across batch boundaries), every
    operator and both operand orders are tried. Oracle: DuckDB over the same file."""
    import pyarrow.parquet as pq

    n = 30_000
    table = pa.table({
        "key": pa.array([i // 3 for i in range(n)], pa.int64()),
        "label": [f"label-{i % 977}" for i in range(n)],
    })
    (tmp_path / "data" / "keyed").mkdir(parents=True)
    path = tmp_path / "data" / "keyed" / "part-0.parquet"
    pq.write_table(table, path, row_group_size=4_000)
    s = Server(["--data-dir", str(tmp_path / "data"), "--pin-table", "keyed"], tmp_path / "server")
    con = duckdb.connect()
    # 8192-row batches: key 2730 spans the first two (rows 8190..8192).
    exact = [
        f"key {op} {v}" for v in (-1, 0, 2730, 2731, 5000, 9999, 10000) for op in ("=", "<", "<=", ">", ">=")
    ] + [f"{v} {op} key" for v in (2730, 9999) for op in ("<", ">=")] + [
        "key BETWEEN 2729 AND 2731",
        "key >= 100 AND key < 6000",
    ]
    others = [
        "key >= 100 AND label = 'label-5'",
        "key % 7 = 3",
        "key = 5 OR key = 9000",
        "key <> 2730",
        "key >= 100.5",
    ]
    try:
        def check(where):
            sql = f"SELECT key, label FROM keyed WHERE {where} ORDER BY key, label"
            got = [tuple(r.values()) for r in s.query(sql).to_pylist()]
            assert got == con.execute(sql.replace("FROM keyed", f"FROM read_parquet('{path}')")).fetchall(), where
            plan = " ".join(s.query(f"EXPLAIN {sql}").column("plan").to_pylist())
            return "FilterExec" in plan

        for where in exact:
            assert not check(where), f"{where}: filtered again above the table"
        for where in others:
            assert check(where), f"{where}: no filter above the table"
    finally:
        s.stop()


def test_pinned_tpch_equals_duckdb_and_joins_build_on_the_smaller_side(tmp_path):
    """TPC-H with lineitem and orders pinned answers like DuckDB over the files, and the
    joins are planned from the pinned tables' column bounds as from Parquet footers: in
    Q4 the 3-month slice of orders is the hash table and lineitem probes it (without
    the bounds DataFusion built it from lineitem, 2.4x slower at SF1)."""
    import re
    import sys

    sys.path.insert(0, str(REPO / "benches"))
    from harness import generate_tpch, tpch_tables
    from tpch import DuckDB, same
    from tpch_queries import QUERIES

    data = generate_tpch(0.01, tmp_path / "tpch")
    s = Server([*tpch_tables(data), "--pin-table", "lineitem", "--pin-table", "orders"], tmp_path / "server")
    duck = DuckDB(data, 2)
    try:
        for number, sql in sorted(QUERIES.items()):
            assert (diff := same(duck.run(sql), s.query(sql))) is None, (number, diff)
        plan = "\n".join(str(v) for v in s.query("EXPLAIN " + QUERIES[4]).column("plan").to_pylist())
        join = plan.index("HashJoinExec")
        # A join's first input (printed first) is the side its hash table is built from.
        build = re.search(r"FilterExec: ([^\n]*)", plan[join:])
        assert build and "o_orderdate" in build.group(1), plan
    finally:
        duck.close()
        s.stop()
