"""The memory pool through the real binary: a sort larger than --memory-limit spills and returns
the right rows, or (with spilling off) fails with RESOURCE_EXHAUSTED naming the consumers, and
the server goes on serving."""

import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import Server, rss_bytes, wait_for

# ~23 MB of rows to sort; the answer is known in closed form.
BIG_SORT = "SELECT value, repeat('x', 100) AS s FROM generate_series(1, 200000) ORDER BY s DESC, value DESC"
SMALL_RESERVATION = ["--datafusion-config", "datafusion.execution.sort_spill_reservation_bytes=262144"]


def test_a_sort_over_the_limit_spills_and_returns_the_right_rows(dataset, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    server = Server(["--data-dir", str(dataset), "--memory-limit", "4MiB", "--spill-dir", str(spill), *SMALL_RESERVATION], tmp_path)
    try:
        got = server.query(BIG_SORT)
        assert got.num_rows == 200_000
        assert got["value"].to_pylist() == list(range(200_000, 0, -1))
        # The metrics saw the spill, and the pool stayed within its limit.
        m = wait_for(lambda: (m := server.metrics()).get("quiver_queries_active") == 0 and m, what="the query to end")
        assert m.get("quiver_spill_files_total") > 0
        assert m.get("quiver_spill_bytes_total") > 0
        assert m.get("quiver_memory_pool_limit_bytes") == 4 << 20
        assert 0 < m.get("quiver_memory_pool_peak_bytes") <= 4 << 20
        assert m.get("quiver_memory_pool_reserved_bytes") == 0
        assert m.get("quiver_spill_disk_bytes") == 0, "spill files are deleted when the query ends"
        assert not [p for p in spill.rglob("*") if p.is_file()]
    finally:
        server.stop()


def test_without_spill_it_fails_with_resource_exhausted_and_the_server_goes_on(dataset, tmp_path):
    server = Server(
        ["--data-dir", str(dataset), "--memory-limit", "2MiB", "--max-spill-size", "0", "--memory-pool", "greedy", *SMALL_RESERVATION],
        tmp_path,
    )
    try:
        # RESOURCE_EXHAUSTED, which pyarrow raises as ArrowInvalid.
        with pytest.raises(pa.ArrowInvalid, match="consumers"):
            server.query(BIG_SORT)
        assert server.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_rss_stays_bounded_while_a_result_larger_than_the_limit_streams_to_a_slow_reader(dataset, tmp_path):
    # ~1.2 GB of result rows, 40x the memory limit; the reader takes its time.
    rows, width = 1_200_000, 1000
    server = Server(["--data-dir", str(dataset), "--memory-limit", "32MiB"], tmp_path)
    try:
        server.query("SELECT 1")
        baseline = rss_bytes(server.proc.pid)
        reader = server.client.do_get(flight.Ticket(f"SELECT value, repeat('x', {width}) AS s FROM generate_series(1, {rows})".encode()))
        got = peak = 0
        for i, chunk in enumerate(reader):
            got += chunk.data.num_rows
            if i % 10 == 0:
                time.sleep(0.05)
                peak = max(peak, rss_bytes(server.proc.pid))
        assert got == rows
        growth = peak - baseline
        # The send path buffers a couple of ~2 MiB messages per stream, plus the batch
        # being encoded and HTTP/2 windows: far below the result's size.
        assert growth < 256 << 20, f"RSS grew by {growth >> 20} MiB streaming {rows * width >> 20} MiB"
        m = server.metrics()
        assert m.get("quiver_query_rows_sent_total") == rows + 1
        assert m.get("quiver_query_bytes_sent_total") >= rows * width
    finally:
        server.stop()
