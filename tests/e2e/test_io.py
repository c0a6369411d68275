"""Reading through memory maps (and pread): pushdown proven by the scan metrics, and files
deleted, replaced or broken under a running server.

The data is written by pyarrow and the oracle is pyarrow.dataset over the same files; the
byte figures are checked against the files' sizes on disk.
"""

import datetime as dt
import json
import os
import random
import re
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import Server, write_atomically

DAYS = [dt.date(2026, 2, 1) + dt.timedelta(days=i) for i in range(12)]
REGIONS = ["us", "eu", "ap", "sa"]
ROW_GROUPS = 20
ROWS_PER_GROUP = 1000
IO_MODES = ["mmap", "pread"]


def events_table(rng: random.Random, first_seq: int) -> pa.Table:
    n = ROW_GROUPS * ROWS_PER_GROUP
    return pa.table(
        {
            # Sorted within the file: row-group min/max statistics are tight ranges.
            "seq": pa.array(range(first_seq, first_seq + n), pa.int64()),
            "value": pa.array([rng.random() for _ in range(n)], pa.float64()),
            "name": pa.array([f"user-{rng.randrange(100_000):05d}" for _ in range(n)], pa.string()),
        }
    )


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    """48 partitions (12 days x 4 regions), one file each, 20 row groups per file."""
    root = tmp_path_factory.mktemp("io") / "events"
    rng = random.Random(7)
    seq = 0
    for day in DAYS:
        for region in REGIONS:
            table = events_table(rng, seq)
            seq += table.num_rows
            write_atomically(
                table,
                root / f"day={day}" / f"region={region}" / "part-0.parquet",
                row_group_size=ROWS_PER_GROUP,
                write_page_index=True,
            )
    return root


def scan_summaries(server: Server) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"scan summary.*?summary=(\{[^}]*\})", server.logs())]


def wait_for_summaries(server: Server, count: int) -> list[dict]:
    # The summary is logged when the query's task ends, just after the last message.
    import time

    deadline = time.monotonic() + 10
    while len(summaries := scan_summaries(server)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return summaries


@pytest.mark.parametrize("io", IO_MODES)
def test_selective_query_reads_under_one_percent_of_the_table(events, tmp_path, io):
    files = sorted(events.rglob("*.parquet"))
    assert len(files) == 48
    table_bytes = sum(f.stat().st_size for f in files)
    day, region = DAYS[5], "eu"
    # A narrow range of the sorted column inside that one partition.
    oracle_ds = ds.dataset(events, format="parquet", partitioning="hive")
    in_partition = oracle_ds.to_table(
        filter=(pc.field("day") == str(day)) & (pc.field("region") == region), columns=["seq"]
    )
    lo = pc.min(in_partition["seq"]).as_py() + 7 * ROWS_PER_GROUP + 100
    hi = lo + 50
    sql = (
        f"SELECT seq, value, name, day, region FROM events "
        f"WHERE day = DATE '{day}' AND region = '{region}' AND seq BETWEEN {lo} AND {hi} ORDER BY seq"
    )

    server = Server(["--table", f"events={events}", "--io", io, "--log-filter", "quiver=debug,info"], tmp_path)
    try:
        got = server.query(sql)
        summaries = wait_for_summaries(server, 1)
        logs = server.logs()
    finally:
        server.stop()

    expected = oracle_ds.to_table(
        filter=(pc.field("day") == str(day)) & (pc.field("region") == region) & (pc.field("seq") >= lo) & (pc.field("seq") <= hi),
        columns=["seq", "value", "name"],
    ).sort_by("seq")
    assert got.num_rows == hi - lo + 1
    assert got.select(["seq", "value", "name"]).equals(expected)
    assert set(got["region"].to_pylist()) == {region}
    assert set(got["day"].to_pylist()) == {day}

    assert len(summaries) == 1, logs
    s = summaries[0]
    assert s["files_total"] == 48 and s["files_pruned_partition"] == 47, s
    assert s["files_scanned"] == 1, s
    assert s["row_groups_total"] == ROW_GROUPS, s
    assert s["row_groups_pruned_statistics"] == ROW_GROUPS - 1 and s["row_groups_scanned"] == 1, s
    assert 0 < s["bytes_scanned"] < 0.01 * table_bytes, (s, table_bytes)
    # Partition pruning alone would read a 48th of the table: over 2%.
    assert table_bytes / 48 > 0.02 * table_bytes
    # A range of 51 keys is estimated to pass far under 0.5% of the table, so even the
    # default (`--filter-pushdown runtime`) evaluates it in the reader, which matched
    # exactly the range (tests/e2e/test_pushdown.py covers the modes).
    assert s["rows_matched_filter"] == hi - lo + 1, s


def test_both_io_modes_count_the_same_bytes(events, tmp_path):
    sql = "SELECT region, count(*), sum(seq), min(name) FROM events WHERE seq % 7 = 3 GROUP BY region ORDER BY region"
    results, bytes_scanned = {}, {}
    for io in IO_MODES:
        (tmp_path / io).mkdir()
        server = Server(["--table", f"events={events}", "--io", io, "--log-filter", "quiver=debug,info"], tmp_path / io)
        try:
            results[io] = server.query(sql)
            bytes_scanned[io] = wait_for_summaries(server, 1)[0]["bytes_scanned"]
        finally:
            server.stop()
    # The oracle: DuckDB over the same files.
    import duckdb

    expected = duckdb.sql(
        f"SELECT region, count(*), sum(seq), min(name) FROM read_parquet('{events}/*/*/*.parquet', "
        "hive_partitioning = true) WHERE seq % 7 = 3 GROUP BY region ORDER BY region"
    ).fetchall()
    for io in IO_MODES:
        got = [tuple(row.values()) for row in results[io].to_pylist()]
        assert got == [tuple(row) for row in expected], io
    # Both read the same byte ranges: every row group of `seq` and `name` (the filter
    # passes a seventh of the rows, spread over every page), never more than the files.
    files = list(events.rglob("*.parquet"))
    columns = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                if col.path_in_schema in ("seq", "name"):
                    columns += col.total_compressed_size
    total = sum(f.stat().st_size for f in files)
    assert bytes_scanned["mmap"] == bytes_scanned["pread"], bytes_scanned
    assert columns <= bytes_scanned["mmap"] <= total, (bytes_scanned, columns, total)


def small_table(root: Path, n_files: int) -> dict[Path, pa.Table]:
    rng = random.Random(11)
    tables = {}
    for i in range(n_files):
        t = pa.table({"k": pa.array(range(i * 1000, i * 1000 + 1000), pa.int64()), "v": [rng.random() for _ in range(1000)]})
        path = root / f"part={i}" / "data.parquet"
        write_atomically(t, path, row_group_size=250)
        tables[path] = t
    return tables


def count_and_sum(server: Server) -> tuple[int, float]:
    t = server.query("SELECT count(*) AS n, sum(k) AS s FROM t")
    return t["n"][0].as_py(), t["s"][0].as_py()


def refresh(server: Server) -> None:
    list(server.client.do_action(flight.Action("refresh", b"")))


@pytest.mark.parametrize("io", IO_MODES)
def test_files_deleted_replaced_or_broken_under_a_running_server(tmp_path, io):
    root = tmp_path / "t"
    tables = small_table(root, 6)
    paths = sorted(tables)
    server = Server(["--table", f"t={root}", "--io", io, "--refresh-interval", "0s"], tmp_path)
    try:
        assert count_and_sum(server) == (6000, sum(range(6000)))

        # Replaced by rename with other rows: until the catalog refreshes, a clear
        # retryable error naming the file, never the old footer over new bytes.
        replacement = pa.table({"k": pa.array(range(100, 400), pa.int64()), "v": [0.5] * 300})
        write_atomically(replacement, paths[1])
        with pytest.raises(flight.FlightUnavailableError, match=r"data\.parquet changed since the table was listed"):
            count_and_sum(server)
        refresh(server)
        expected = sum(range(6000)) - sum(range(1000, 2000)) + sum(range(100, 400))
        assert count_and_sum(server) == (5300, expected)

        # Deleted: the same, then gone after a refresh.
        os.remove(paths[2])
        with pytest.raises(flight.FlightUnavailableError, match=rf"{paths[2].parent.name}/data\.parquet.*(No such file|not found)"):
            count_and_sum(server)
        refresh(server)
        expected -= sum(range(2000, 3000))
        assert count_and_sum(server) == (4300, expected)

        # A directory or a socket where a file was: refused, named, the server goes on.
        os.remove(paths[3])
        paths[3].mkdir()
        # FAILED_PRECONDITION, which pyarrow raises as ArrowInvalid.
        with pytest.raises((flight.FlightError, pa.ArrowInvalid), match=r"is a directory|changed since"):
            count_and_sum(server)
        os.rmdir(paths[3])
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(paths[3]))
        try:
            with pytest.raises((flight.FlightError, pa.ArrowInvalid), match=r"is a socket|changed since"):
                count_and_sum(server)
        finally:
            sock.close()
            os.remove(paths[3])
        refresh(server)
        expected -= sum(range(3000, 4000))
        assert count_and_sum(server) == (3300, expected)
    finally:
        server.stop()
    assert server.proc.returncode == 0


@pytest.mark.parametrize("io", IO_MODES)
def test_files_deleted_and_replaced_while_a_query_streams(tmp_path, io):
    root = tmp_path / "t"
    tables = small_table(root, 8)
    expected = pa.concat_tables([tables[p] for p in sorted(tables)])
    server = Server(
        ["--table", f"t={root}", "--io", io, "--refresh-interval", "0s", "--cpu-threads", "1",
         "--datafusion-config", "datafusion.execution.batch_size=100"],
        tmp_path,
    )
    try:
        reader = server.client.do_get(flight.Ticket(b"SELECT k, v FROM t"))
        first = reader.read_chunk().data
        # Mid-stream: every file deleted or replaced by other content.
        for i, path in enumerate(sorted(tables)):
            if i % 2:
                os.remove(path)
            else:
                write_atomically(pa.table({"k": pa.array([-1], pa.int64()), "v": [0.0]}), path)
        try:
            rest = reader.read_all()
            got = pa.Table.from_batches([first]).select(["k", "v"])
            got = pa.concat_tables([got, rest.select(["k", "v"])])
            # Files opened before the change are read as they were; a file opened after
            # it must have failed instead, so a complete result is the original one.
            assert got.sort_by("k").equals(expected.sort_by("k"))
        except flight.FlightError as e:
            assert "t/part=" in str(e), e
            if io == "mmap":
                # Only a file opened after the change can fail: named, retryable. (pread
                # re-opens the path for every read, so a file replaced while it is being
                # read fails too; mmap pins the version it opened.)
                assert isinstance(e, flight.FlightUnavailableError), e
                assert re.search(r"changed since the table was listed|No such file", str(e)), e
        # The server is fine and serves the new state after a refresh.
        refresh(server)
        assert count_and_sum(server) == (4, -4)
    finally:
        server.stop()
    assert server.proc.returncode == 0
