"""`--chunk-cache-size`: decompressed column chunks kept for later scans. Every answer, read
from the file, from the cache, or from a mix of both, equals DuckDB's over the same file;
what the cache did is read from the server's Prometheus metrics."""

import random

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import Server, wait_for, write_atomically

ROWS = 120_000
ROW_GROUP = 30_000

QUERIES = [
    # Key ranges on the sorted key: the page index picks pages, the row filter rows.
    "SELECT * FROM t WHERE k >= 10000 AND k < 10750 ORDER BY k",
    "SELECT * FROM t WHERE k >= 61000 AND k < 61400 ORDER BY k",
    # Whole-table aggregates over every column kind, nulls included.
    "SELECT count(*) AS n, count(note) AS notes, sum(price) AS s, min(word) AS lo, max(word) AS hi,"
    " count(DISTINCT word) AS words, sum(CAST(flag AS INT)) AS flags FROM t",
    "SELECT word, count(*) AS n, sum(k) AS ks FROM t GROUP BY word ORDER BY word LIMIT 20",
    "SELECT k, note FROM t WHERE note LIKE '%77%' ORDER BY k",
]


def make_table(seed: int) -> pa.Table:
    rng = random.Random(seed)
    words = [f"word-{i:04d}-{'x' * (i % 13)}" for i in range(900)]
    return pa.table(
        {
            "k": pa.array(range(ROWS), pa.int64()),
            "price": pa.array([rng.randrange(1, 10**6) for _ in range(ROWS)], pa.int64()),
            "word": pa.array([rng.choice(words) for _ in range(ROWS)]),
            "note": pa.array([None if i % 7 == 0 else f"note {rng.randrange(10**9)} {i}" for i in range(ROWS)]),
            "flag": pa.array([rng.random() < 0.3 for _ in range(ROWS)]),
        }
    )


def write(table: pa.Table, path, compression: str, page_version: str, row_group: int = ROW_GROUP) -> None:
    write_atomically(
        table,
        path,
        compression=compression,
        row_group_size=row_group,
        data_page_size=32 * 1024,
        data_page_version=page_version,
        write_page_index=True,
    )


def expected(path, sql: str) -> list:
    con = duckdb.connect()
    con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{path}')")
    return con.execute(sql).fetchall()


def answer(s: Server, sql: str) -> list:
    return [tuple(r.values()) for r in s.query(sql).to_pylist()]


def answer_after_refresh(s: Server, sql: str):
    """The answer, or None while the server still lists the file it replaced (it then
    refuses with UNAVAILABLE, retryable, instead of reading the new file as the old)."""
    try:
        return answer(s, sql)
    except flight.FlightUnavailableError:
        return None


def cache_stats(s: Server, family: str) -> dict:
    """A cache's counters (`quiver_{family}_...`) from one scrape."""
    m = s.metrics()
    names = ("hits_total", "misses_total", "inserts_total", "evictions_total", "bytes")
    return {n: m.get(f"quiver_{family}_{n}") for n in names}


def stats(s: Server) -> dict:
    return cache_stats(s, "chunk_cache")


def assert_evicts_and_holds_its_size(s: Server, family: str, size: int) -> None:
    """The cache has kept some entries, dropped others, and is back under its size (moka
    evicts just after inserts)."""
    after = wait_for(
        lambda: (lambda st: st if st["evictions_total"] > 0 else None)(cache_stats(s, family)), what="evictions"
    )
    assert after["inserts_total"] > 0, after
    assert wait_for(lambda: cache_stats(s, family)["bytes"] <= size, what=f"the cache under its size: {cache_stats(s, family)}")


def assert_a_query_takes_memory_back(s: Server, family: str, path, min_held: int) -> None:
    """Scans of `t` fill the cache past `min_held` bytes (three do, or a few more where
    the cache fills in the background); grouping by every note then needs more of the
    pool than the cache left free: the cache gives memory back instead of the query
    spilling or failing, and the answer equals DuckDB's."""

    def filled():
        assert s.query("SELECT * FROM t").num_rows == ROWS
        return (held := cache_stats(s, family))["bytes"] > min_held and held

    held = wait_for(filled, what=f"the {family} to fill")
    assert held["bytes"] > min_held and held["evictions_total"] == 0, held
    sql = "SELECT note, count(*) AS n FROM t GROUP BY note ORDER BY n DESC, note LIMIT 5"
    assert answer(s, sql) == expected(path, sql)
    after = cache_stats(s, family)
    assert after["evictions_total"] > 0 and after["bytes"] < held["bytes"], (held, after)


@pytest.mark.parametrize("compression,page_version", [("snappy", "1.0"), ("zstd", "2.0")])
def test_answers_from_the_cache_equal_duckdb(tmp_path, compression, page_version):
    path = tmp_path / "t.parquet"
    write(make_table(1), path, compression, page_version)
    s = Server(["--table", f"t={path}", "--chunk-cache-size", "64MiB"], tmp_path / "server")
    try:
        # The file is scanned as two byte ranges (each row group belongs to the range
        # holding its first column's first page): cached chunks must not move a row group
        # out of its range.
        plan = "\n".join(s.query("EXPLAIN " + QUERIES[2]).column("plan").to_pylist())
        assert "file_groups={2 groups" in plan, plan
        for sql in QUERIES:
            want = expected(path, sql)
            # First read: remembered; second: decompressed into the cache; third: read
            # from it. Every one equals DuckDB.
            for run in range(3):
                assert answer(s, sql) == want, (sql, run)
        # Every query again, now that the cache holds chunks each of them reads (a
        # filtered scan decodes with another reader than the one that read the footer).
        for sql in QUERIES:
            assert answer(s, sql) == expected(path, sql), sql
        after = stats(s)
        assert after["inserts_total"] > 0 and after["hits_total"] > 0, after
        assert 0 < after["bytes"] <= 64 * 2**20, after
        # The cache's bytes are reserved from the query pool while kept.
        assert s.metrics().get("quiver_memory_pool_reserved_bytes") >= after["bytes"]
        # A scan served wholly from the cache reads no compressed chunk.
        sql = QUERIES[2]
        before = stats(s)
        assert answer(s, sql) == expected(path, sql)
        now = stats(s)
        assert now["misses_total"] == before["misses_total"], (before, now)
        # Four columns of each row group (the first, k, stays in its file, see
        # chunk_cache.rs: FIXED_COLUMN).
        assert now["hits_total"] == before["hits_total"] + 4 * (ROWS // ROW_GROUP), (before, now)
    finally:
        s.stop()


def test_off_by_default(tmp_path):
    path = tmp_path / "t.parquet"
    write(make_table(2), path, "snappy", "1.0")
    s = Server(["--table", f"t={path}"], tmp_path / "server")
    try:
        for _ in range(3):
            assert answer(s, QUERIES[0]) == expected(path, QUERIES[0])
        assert set(stats(s).values()) == {0}
    finally:
        s.stop()


def test_a_replaced_file_is_never_answered_from_old_chunks(tmp_path):
    path = tmp_path / "t.parquet"
    write(make_table(3), path, "snappy", "1.0")
    s = Server(["--table", f"t={path}", "--chunk-cache-size", "64MiB", "--refresh-interval", "1s"], tmp_path / "server")
    sql = QUERIES[2]
    try:
        for _ in range(3):
            old = answer(s, sql)
        assert stats(s)["hits_total"] > 0
        # Same path, same size class, other values.
        write(make_table(4), path, "snappy", "1.0")
        new = expected(path, sql)
        assert new != old
        wait_for(lambda: answer_after_refresh(s, sql) == new, what="the new file's answer")
        for _ in range(3):
            assert answer(s, sql) == new
    finally:
        s.stop()


def test_the_cache_holds_its_size(tmp_path):
    path = tmp_path / "t.parquet"
    write(make_table(5), path, "zstd", "1.0", row_group=10_000)
    size = 768 << 10
    s = Server(["--table", f"t={path}", "--chunk-cache-size", str(size)], tmp_path / "server")
    try:
        sql = "SELECT * FROM t ORDER BY k"
        want = expected(path, sql)
        for _ in range(4):
            assert answer(s, sql) == want
        # 12 row groups, each with about 97 KB of chunks up to an eighth of the cache
        # (price, word, flag; note is larger and never kept).
        assert_evicts_and_holds_its_size(s, "chunk_cache", size)
    finally:
        s.stop()


def test_queries_take_memory_back_from_the_cache(tmp_path):
    path = tmp_path / "t.parquet"
    write(make_table(6), path, "zstd", "1.0")
    s = Server(
        ["--table", f"t={path}", "--chunk-cache-size", "8MiB", "--memory-limit", "18MiB"],
        tmp_path / "server",
    )
    try:
        # Grouping by every note takes about 16 MiB of the pool.
        assert_a_query_takes_memory_back(s, "chunk_cache", path, 2 * 2**20)
    finally:
        s.stop()
