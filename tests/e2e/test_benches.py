"""The benchmark harness in smoke mode (tiny scale, one run), so it never rots: every TPC-H
query's result through Quiver and DataFusion must equal DuckDB's, and every throughput source
must deliver the whole table. Timings are printed, never asserted."""

import subprocess
import sys

import pytest

from conftest import REPO, quiver_binary


def run_bench(script: str, tmp_path, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, str(REPO / "benches" / script), "--quiver", str(quiver_binary()), "--smoke", "--cache", str(tmp_path),
         *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_tpch_smoke_matches_duckdb(tmp_path):
    out = run_bench("tpch.py", tmp_path)
    assert all(f"| Q{q} |" in out for q in range(1, 23)), out
    assert "geomean" in out


def test_kept_streams_smoke_matches_pyarrow(tmp_path):
    """Key ranges on kept connections: answers checked against pyarrow's slices."""
    out = run_bench("kept_streams.py", tmp_path)
    assert "| pyarrow C++ server (from memory, slices) |" in out and "(pinned table) |" in out, out


def test_events_smoke_matches_duckdb(tmp_path):
    """The second dataset (wide strings, sorted keys, low and high selectivity)."""
    out = run_bench("tpch.py", tmp_path, "--dataset", "events")
    assert all(f"| Q{q} |" in out for q in range(1, 13)), out
    assert "events (100000 rows)" in out and "geomean" in out


def test_s3_smoke_matches_duckdb_cold_and_warm(tmp_path):
    out = run_bench("s3.py", tmp_path)
    assert all(f"| Q{q} |" in out for q in range(1, 23)), out
    assert "geomean" in out


def test_throughput_smoke_delivers_every_row(tmp_path):
    out = run_bench("throughput.py", tmp_path)
    assert "pyarrow server, 64k rows" in out and "bytes on the wire" in out, out


def test_concurrency_smoke_has_no_errors(tmp_path):
    out = run_bench("concurrency.py", tmp_path)
    assert "| 100 |" in out and "pyarrow C++ server" in out, out
    assert "quiver (pinned table)" in out and "key range" in out, out


def test_pruning_smoke_reads_the_same_bytes_at_every_size(tmp_path):
    out = run_bench("pruning.py", tmp_path)
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| one partition")]
    # Same files and bytes at 1x and 4x: pruning, not luck.
    assert len(rows) == 2 and rows[0][6:8] == rows[1][6:8], out


@pytest.mark.timeout(1800)  # cargo may have to link the bench binary first
def test_criterion_micro_benchmarks_run():
    """criterion's test mode runs every micro-benchmark once (the build is the workspace
    build the tests already made, so cargo only runs it)."""
    out = subprocess.run(
        ["cargo", "bench", "--workspace", "--bench", "hot_paths", "--", "--test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for group in ("ticket_decode/query_ticket", "flight_encode/64k_rows/zstd", "expand_views/64k_rows/utf8view_to_utf8", "flight_encode/8k_rows/baseline_memcpy"):
        assert f"Testing {group}" in out.stdout, out.stdout


def test_send_path_allocates_and_copies_next_to_nothing(tmp_path):
    """benches' send_copies on TPC-H lineitem: jemalloc's per-thread counters around each
    encoder. The zero-copy path must send the same bytes as the standard one while
    allocating under 2% of them (per-message IPC metadata and what a stream allocates
    once, such as its first gathering blocks: 1.35% of this 10 MB file, 0.81% of SF1 in
    docs/benchmarks.md) and copying under 1%; sending a pinned table (batches
    laid out with their messages) allocates under 1% and copies only the schema message; the standard
    path allocates every body byte at least twice. Counts of bytes, not timings."""
    sys.path.insert(0, str(REPO / "benches"))
    from harness import generate_tpch

    lineitem = generate_tpch(0.01, tmp_path) / "lineitem.parquet"
    out = subprocess.run(
        [str(quiver_binary().parent / "send_copies"), "--parquet", str(lineitem), "--runs", "1", "--batch-rows", "8192"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {
        cells[2].split(" (")[0]: cells
        for cells in ([c.strip() for c in line.split("|")] for line in out.stdout.splitlines())
        if len(cells) > 7 and cells[1] == "8192"
    }
    standard, zero_copy, pinned = rows["standard"], rows["zero-copy"], rows["zero-copy, pinned table"]
    assert standard[3] == zero_copy[3] == pinned[3], out.stdout  # MB sent
    assert float(standard[4]) >= 2.0, out.stdout
    assert float(zero_copy[4]) < 0.02, out.stdout
    assert float(zero_copy[5]) < 0.01, out.stdout
    assert float(pinned[4]) < 0.01, out.stdout
    assert float(pinned[5]) < 0.001, out.stdout  # the schema message only


def test_soak_smoke_crashes_nothing_and_leaks_nothing(tmp_path):
    """benches/soak.py --smoke: rounds of checked queries, kills, cancels, deadlines,
    replaced files, bursts past the queue and bad logins; it fails (exit 1) on a wrong
    answer, an unexpected error, a pool that does not drain or growing fds/RSS."""
    out = run_bench("soak.py", tmp_path)
    assert "FAIL" not in out, out
    assert "| 5 x 3s |" in out, out
    events = next(line for line in out.splitlines() if line.startswith("events: "))
    for event in ["killed mid-stream", "cancelled", "timed out", "replaced and refreshed", "burst ran", "bad login"]:
        assert event in events, out


def test_cluster_smoke_matches_duckdb(tmp_path):
    out = run_bench("cluster.py", tmp_path)
    assert all(f"| Q{q} |" in out for q in range(1, 23)), out
    assert "speed-up, geomean" in out
