"""The memory pool through the real binary: a sort larger than --memory-limit spills and returns
the right rows, or (with spilling off) fails with RESOURCE_EXHAUSTED naming the consumers, and
the server goes on serving."""

import pyarrow as pa
import pytest

from conftest import Server

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
