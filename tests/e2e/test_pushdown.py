"""`--filter-pushdown`: which filters a Parquet scan evaluates inside the decoder, read
from the scan summary (rows the reader's filters dropped) of each query, with every answer
equal to DuckDB's over the same files.

`runtime` (the default) leaves the query's own filters to after decoding, except those
DataFusion's statistics estimate to pass under 0.5% of the rows, and pushes the runtime
filter a join builds into the scan that only it filters; `all` pushes every filter, `none`
none."""

import json
import random
import re
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import Server

STATIC = "SELECT count(*) AS n, sum(v) AS s FROM facts WHERE v < 0.25"
# The build side (one dimension row) makes a runtime filter on facts.key.
JOIN = "SELECT count(*) AS n, sum(f.v) AS s FROM facts f JOIN dims d ON f.key = d.key WHERE d.name = 'name-7'"
# Estimated from the table's min/max of key (0..999) to pass 0.1% of the rows.
SELECTIVE = "SELECT count(*) AS n, sum(v) AS s FROM facts WHERE key = 7"
# A runtime filter that passes about 45% of facts (keys 0-4, 10-49, 100-499): measured in
# the decoder for its first batches, then no longer evaluated there (`query/measured.rs`).
WIDE_JOIN = "SELECT count(*) AS n, sum(f.v) AS s FROM facts f JOIN dims d ON f.key = d.key WHERE d.name < 'name-5'"
QUERIES = (STATIC, JOIN, SELECTIVE, WIDE_JOIN)
# String equalities, which min/max cannot estimate: by the distinct values the column's
# dictionary pages hold, tag = ... passes 1/500 of the rows, kind = ... 1/4.
RARE_TAG = "SELECT count(*) AS n, sum(v) AS s FROM facts WHERE tag = 'tag-0007'"
COMMON_KIND = "SELECT count(*) AS n, sum(v) AS s FROM facts WHERE kind = 'kind-1'"


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("pushdown")
    rng = random.Random(11)
    n = 200_000
    (root / "facts").mkdir()
    (root / "dims").mkdir()
    pq.write_table(
        pa.table({
            "key": pa.array([rng.randrange(1000) for _ in range(n)], pa.int64()),
            # Multiples of 1/1024: sums are exact in any order.
            "v": pa.array([rng.randrange(1024) / 1024 for _ in range(n)], pa.float64()),
            # Dictionary-encoded (pyarrow's default): 500 and 4 distinct values.
            "tag": [f"tag-{rng.randrange(500):04d}" for _ in range(n)],
            "kind": [f"kind-{rng.randrange(4)}" for _ in range(n)],
        }),
        root / "facts" / "part-0.parquet",
        row_group_size=50_000,
    )
    pq.write_table(
        pa.table({"key": pa.array(range(1000), pa.int64()), "name": [f"name-{k}" for k in range(1000)]}),
        root / "dims" / "part-0.parquet",
    )
    return root


def run(tables, tmp_path, mode, queries=QUERIES):
    args = ["--data-dir", str(tables), "--log-filter", "quiver=debug,info"]
    if mode:
        args += ["--filter-pushdown", mode]
    s = Server(args, tmp_path / (mode or "default"))
    con = duckdb.connect()
    try:
        for sql in queries:
            got = s.query(sql)
            duck = sql.replace("facts", f"read_parquet('{tables}/facts/*.parquet')").replace(
                "dims", f"read_parquet('{tables}/dims/*.parquet')")
            assert [tuple(r.values()) for r in got.to_pylist()] == con.execute(duck).fetchall(), sql
        deadline = time.monotonic() + 10
        while len(found := re.findall(r"scan summary.*?summary=(\{[^}]*\})", s.logs())) < len(queries):
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.05)
        return [json.loads(x)["rows_pruned_filter"] for x in found]
    finally:
        s.stop()


def test_by_default_runtime_and_selective_filters_run_in_the_decoder(tables, tmp_path):
    static, join, selective, wide = run(tables, tmp_path, None)
    # v < 0.25 passes a quarter of the rows: evaluated after decoding.
    assert static == 0
    # name-7's key is in about 1 fact row in 1000: the decoder drops the rest.
    assert join > 150_000, join
    # key = 7, estimated at 0.1% of the rows: in the decoder too.
    assert selective > 150_000, selective
    # The wide filter drops 55% of the rows it is evaluated on: of the first 65536 rows
    # (plus the batches decoded meanwhile, and one in 16 later), not of all 200000.
    assert 20_000 < wide < 70_000, wide
    again = run(tables, tmp_path, "runtime")
    assert again[:3] == [static, join, selective] and 20_000 < again[3] < 70_000, again


def test_all_and_none(tables, tmp_path):
    static, join, selective, wide = run(tables, tmp_path, "all")
    assert static > 100_000 and join > 150_000 and selective > 150_000, (static, join, selective)
    # `all` evaluates every filter on every row: 55% of 200000 dropped.
    assert 100_000 < wide < 120_000, wide
    assert run(tables, tmp_path, "none") == [0, 0, 0, 0]


def test_a_rare_string_equality_runs_in_the_decoder(tables, tmp_path):
    rare, common = run(tables, tmp_path, None, (RARE_TAG, COMMON_KIND))
    # About 400 of 200000 rows pass tag = 'tag-0007': the decoder drops the rest.
    assert rare > 190_000, rare
    # kind = 'kind-1' passes a quarter: evaluated after decoding.
    assert common == 0, common


def physical_plan(s: Server, sql: str) -> str:
    rows = s.query("EXPLAIN " + sql).to_pylist()
    return next(r["plan"] for r in rows if r["plan_type"] == "physical_plan")


# Selective filters over the shared `requests` dataset: files written before and after a
# column was added (`retries`), Hive partitions, NULLs.
EVOLVED_SELECTIVE = [
    "SELECT request_id, day, service, retries, latency_ms FROM requests WHERE user_id = 17 ORDER BY request_id",
    "SELECT count(*) AS n, min(latency_ms) AS lo, max(retries) AS r FROM requests WHERE user_id = 4242 AND retries = 2",
    "SELECT request_id, status FROM requests WHERE user_id = 7 AND service = 'api' ORDER BY request_id",
]
# Not estimated under 0.5% of the rows: not evaluated in the decoder, filtered above its
# scan, answered the same.
KEPT_ABOVE = "SELECT request_id, error FROM requests WHERE user_id = 4999 AND error IS NULL ORDER BY request_id"


def test_a_selective_filter_in_the_decoder_leaves_no_filter_above_its_scan(tables, dataset, tmp_path):
    """A filter the decoder evaluates whole is not evaluated again above the scan, and the
    scan passes on only the columns the query reads (a wide filter column is not decoded a
    second time for the re-check). Answers against DuckDB, over files with and without a
    later column and over Hive partitions."""
    from test_result_cache import oracle

    s = Server(["--data-dir", str(tables)], tmp_path / "facts")
    try:
        plan = physical_plan(s, RARE_TAG)
        assert "FilterExec" not in plan, plan
        scan = next(line for line in plan.splitlines() if "DataSourceExec" in line)
        assert "projection=[v]" in scan, scan
        # A filter passing a quarter of the rows stays above its scan.
        assert "FilterExec" in physical_plan(s, COMMON_KIND)
    finally:
        s.stop()
    s = Server(["--data-dir", str(dataset)], tmp_path / "requests")
    duck = oracle(dataset)
    try:
        for sql in [*EVOLVED_SELECTIVE, KEPT_ABOVE]:
            assert ("FilterExec" in physical_plan(s, sql)) == (sql == KEPT_ABOVE), sql
            got = [tuple(r.values()) for r in s.query(sql).to_pylist()]
            assert got == [tuple(r) for r in duck.execute(sql).fetchall()], sql
    finally:
        s.stop()
