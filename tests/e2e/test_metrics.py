"""The Prometheus endpoint of the real binary, scraped over HTTP and parsed by
prometheus_client; figures are checked against what the pyarrow client received, against
pyarrow.dataset and the file system, and the scrape against `promtool check metrics`."""

import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import grpc
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import Metrics, Server, requests_dataset, rss_bytes, wait_for

# Every family the server promises, present from start-up (issue 5's names).
FAMILIES = [
    "quiver_rpc_requests_total",
    "quiver_rpc_duration_seconds",
    "quiver_rpc_in_flight",
    "quiver_rpc_streams_aborted_total",
    "quiver_queries_total",
    "quiver_queries_active",
    "quiver_queries_queued",
    "quiver_query_planning_seconds",
    "quiver_query_first_batch_seconds",
    "quiver_query_duration_seconds",
    "quiver_query_rows_sent_total",
    "quiver_query_batches_sent_total",
    "quiver_query_bytes_sent_total",
    "quiver_table_scans_total",
    "quiver_scan_files_scanned_total",
    "quiver_scan_files_pruned_total",
    "quiver_scan_row_groups_scanned_total",
    "quiver_scan_row_groups_pruned_total",
    "quiver_scan_pages_pruned_total",
    "quiver_scan_bytes_total",
    "quiver_scan_pinned_batches_scanned_total",
    "quiver_scan_pinned_batches_pruned_total",
    "quiver_scan_pinned_rows_skipped_total",
    "quiver_result_cache_hits_total",
    "quiver_result_cache_misses_total",
    "quiver_result_cache_evictions_total",
    "quiver_result_cache_bytes",
    "quiver_result_cache_entries",
    "quiver_plan_cache_hits_total",
    "quiver_plan_cache_misses_total",
    "quiver_plan_cache_entries",
    "quiver_chunk_cache_hits_total",
    "quiver_chunk_cache_misses_total",
    "quiver_chunk_cache_inserts_total",
    "quiver_chunk_cache_evictions_total",
    "quiver_chunk_cache_bytes",
    "quiver_row_group_cache_hits_total",
    "quiver_row_group_cache_misses_total",
    "quiver_row_group_cache_inserts_total",
    "quiver_row_group_cache_evictions_total",
    "quiver_row_group_cache_read_bytes_total",
    "quiver_row_group_cache_bytes",
    "quiver_memory_pool_reserved_bytes",
    "quiver_memory_pool_peak_bytes",
    "quiver_memory_pool_limit_bytes",
    "quiver_memory_pool_allocated_bytes_total",
    "quiver_memory_pool_freed_bytes_total",
    "quiver_spill_bytes_total",
    "quiver_spill_files_total",
    "quiver_jemalloc_allocated_bytes",
    "quiver_jemalloc_active_bytes",
    "quiver_jemalloc_resident_bytes",
    "quiver_jemalloc_mapped_bytes",
    "quiver_jemalloc_retained_bytes",
    "quiver_mmap_mapped_bytes",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "quiver_catalog_tables",
    "quiver_catalog_files",
    "quiver_catalog_bytes",
    "quiver_catalog_partitions",
    "quiver_catalog_last_refresh_timestamp_seconds",
    "quiver_cpu_runtime_stalled",
    "quiver_cpu_runtime_probe_wait_seconds",
    "quiver_memory_hard_limit_bytes",
    "quiver_memory_hard_limit_exceeded",
    "quiver_memory_guard_cancelled_total",
]

FLIGHT_METHODS = {
    "Handshake", "ListFlights", "GetFlightInfo", "PollFlightInfo", "GetSchema", "DoGet",
    "DoPut", "DoExchange", "DoAction", "ListActions", "Health.Check", "Health.Watch", "other",
}
GRPC_CODES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
}
OUTCOMES = {"success", "error", "cancelled", "rejected", "timeout"}

# Sorted on the server and streamed: it holds pool memory for as long as it streams.
LONG_SORT = "SELECT value FROM generate_series(1, 3000000) ORDER BY value DESC"


@pytest.fixture(scope="module")
def mserver(dataset, tmp_path_factory):
    s = Server(["--data-dir", str(dataset)], tmp_path_factory.mktemp("metrics"))
    yield s
    s.stop()
    assert s.proc.returncode == 0


def family_present(m: Metrics, family: str) -> bool:
    """A family is present when it has a sample (a histogram through its _count)."""
    names = m.names()
    return any(n in names for n in (family, family + "_count"))


def promtool_check(text: str):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; scripts/test.sh installs it)")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_family_is_there_from_start_up_and_promtool_accepts_the_scrape(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        first = server.metrics()
        missing = [f for f in FAMILIES if not family_present(first, f)]
        assert not missing, f"families missing at start-up: {missing}"
        # Known label values are initialised: every method, every table, every outcome.
        assert first.get("quiver_rpc_requests_total", method="DoGet", code="OK") == 0
        assert first.get("quiver_table_scans_total", table="requests") == 0
        assert first.get("quiver_table_scans_total", table="services") == 0
        for outcome in OUTCOMES:
            assert first.get("quiver_queries_total", outcome=outcome) == 0
        for family in first.families.values():
            assert family.documentation, f"{family.name} has no help text"
        promtool_check(first.text)

        server.query("SELECT count(*) FROM requests")
        with pytest.raises(pa.ArrowInvalid):
            server.query("SELEC nonsense")
        promtool_check(server.scrape_text())
    finally:
        server.stop()


def test_healthz_answers_ok(mserver):
    assert mserver.http_get("/healthz") == (200, "ok\n")
    status, _ = mserver.http_get("/no-such-page")
    assert status == 404


def wait_query_recorded(server, before: Metrics, outcome: str) -> Metrics:
    """The next scrape in which one more query ended with `outcome` and none is active
    (the server records a query when its task ends, just after the client saw the end)."""

    def done():
        m = server.metrics()
        ended = m.get("quiver_queries_total", outcome=outcome) == before.get("quiver_queries_total", outcome=outcome) + 1
        idle = m.get("quiver_queries_active") == 0 and m.get("quiver_rpc_in_flight", method="DoGet") == 0
        return m if ended and idle else None

    return wait_for(done, what=f"a query recorded as {outcome}")


def test_rows_batches_and_bytes_sent_are_what_the_client_received(mserver, dataset):
    sql = "SELECT * FROM requests WHERE status >= 400"
    before = mserver.metrics()
    reader = mserver.client.do_get(flight.Ticket(sql.encode()))
    rows = batches = buffer_bytes = 0
    for chunk in reader:
        rows += chunk.data.num_rows
        batches += 1
        buffer_bytes += chunk.data.get_total_buffer_size()
    after = wait_query_recorded(mserver, before, "success")

    def delta(name, **labels):
        return after.get(name, **labels) - before.get(name, **labels)

    # Oracle for the rows: DuckDB over the same files.
    expected = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{dataset}/requests/**/*.parquet', hive_partitioning=true) WHERE status >= 400"
    ).fetchone()[0]
    assert rows == expected
    assert delta("quiver_query_rows_sent_total") == rows
    assert delta("quiver_query_batches_sent_total") == batches
    # Message bytes are the IPC bodies (the buffers the client got, 8-byte aligned) plus
    # small headers.
    sent = delta("quiver_query_bytes_sent_total")
    assert buffer_bytes <= sent <= 1.2 * buffer_bytes + 64 * 1024, (sent, buffer_bytes)
    assert delta("quiver_rpc_requests_total", method="DoGet", code="OK") == 1
    assert delta("quiver_table_scans_total", table="requests") == 1
    assert delta("quiver_table_scans_total", table="services") == 0
    for histogram in ["quiver_query_planning_seconds", "quiver_query_first_batch_seconds", "quiver_query_duration_seconds"]:
        assert delta(histogram + "_count") == 1, histogram
    assert delta("quiver_rpc_duration_seconds_count", method="DoGet") == 1
    assert after.get("quiver_query_first_batch_seconds_sum") - before.get("quiver_query_first_batch_seconds_sum") <= delta(
        "quiver_query_duration_seconds_sum"
    )
    # Nothing held once the query is over: the pool's books balance.
    assert after.get("quiver_memory_pool_reserved_bytes") == 0
    assert after.get("quiver_memory_pool_allocated_bytes_total") == after.get("quiver_memory_pool_freed_bytes_total")


def test_a_failed_query_is_counted_with_its_grpc_code(mserver):
    before = mserver.metrics()
    with pytest.raises(pa.ArrowInvalid):
        mserver.query("SELECT no_such_column FROM requests")
    after = wait_query_recorded(mserver, before, "error")
    assert (
        after.get("quiver_rpc_requests_total", method="DoGet", code="INVALID_ARGUMENT")
        == before.get("quiver_rpc_requests_total", method="DoGet", code="INVALID_ARGUMENT") + 1
    )
    assert after.get("quiver_query_rows_sent_total") == before.get("quiver_query_rows_sent_total")


def test_an_abandoned_stream_is_counted_and_everything_returns_to_idle(mserver):
    before = mserver.metrics()
    client = flight.connect(f"grpc://{mserver.addr}")
    reader = client.do_get(flight.Ticket(LONG_SORT.encode()))
    first = reader.read_chunk()
    assert first.data.num_rows > 0
    during = mserver.metrics()
    assert during.get("quiver_queries_active") == 1
    assert during.get("quiver_rpc_in_flight", method="DoGet") == 1
    assert during.get("quiver_memory_pool_reserved_bytes") > 0, "the sort holds memory while it streams"
    assert during.get("quiver_memory_pool_peak_bytes") >= during.get("quiver_memory_pool_reserved_bytes")
    # The client goes away mid-stream.
    reader.cancel()
    client.close()

    after = wait_query_recorded(mserver, before, "cancelled")
    assert (
        after.get("quiver_rpc_streams_aborted_total", method="DoGet")
        == before.get("quiver_rpc_streams_aborted_total", method="DoGet") + 1
    )
    assert (
        after.get("quiver_rpc_requests_total", method="DoGet", code="CANCELLED")
        == before.get("quiver_rpc_requests_total", method="DoGet", code="CANCELLED") + 1
    )
    idle = wait_for(
        lambda: (m := mserver.metrics()).get("quiver_memory_pool_reserved_bytes") == 0 and m,
        what="the pool to return to idle",
    )
    assert idle.get("quiver_memory_pool_allocated_bytes_total") == idle.get("quiver_memory_pool_freed_bytes_total")
    # Fewer rows were sent than the query would have produced.
    assert idle.get("quiver_query_rows_sent_total") - before.get("quiver_query_rows_sent_total") < 3_000_000


def test_a_client_process_that_dies_mid_stream_is_counted_and_frees_everything(mserver):
    before = mserver.metrics()
    # A separate client process reads one batch and exits without closing anything: the
    # server sees the connection drop, not a cancel.
    script = (
        "import os, sys, pyarrow.flight as f\n"
        f"r = f.connect('grpc://{mserver.addr}').do_get(f.Ticket({LONG_SORT!r}.encode()))\n"
        "r.read_chunk(); print('read', flush=True); os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "read", out.stderr
    after = wait_query_recorded(mserver, before, "cancelled")
    assert (
        after.get("quiver_rpc_streams_aborted_total", method="DoGet")
        == before.get("quiver_rpc_streams_aborted_total", method="DoGet") + 1
    )
    idle = wait_for(
        lambda: (m := mserver.metrics()).get("quiver_memory_pool_reserved_bytes") == 0 and m,
        what="the pool to return to idle",
    )
    assert idle.get("quiver_memory_pool_allocated_bytes_total") == idle.get("quiver_memory_pool_freed_bytes_total")
    # The server goes on serving.
    assert mserver.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4


def test_pushdown_counters_match_pyarrow_dataset(mserver, dataset):
    day, service = "2026-01-02", "api"
    sql = f"SELECT request_id FROM requests WHERE day = DATE '{day}' AND service = '{service}'"
    # Oracle: the files pyarrow.dataset keeps for the same partition filter, and their
    # row groups from the Parquet footers.
    dataset_ = requests_dataset(dataset)
    expr = (ds.field("day") == dt.date.fromisoformat(day)) & (ds.field("service") == service)
    kept = [f.path for f in dataset_.get_fragments(filter=expr)]
    all_files = list(dataset_.files)
    row_groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in kept)
    assert len(kept) == 1 and row_groups > 1

    before = mserver.metrics()
    got = mserver.query(sql)
    after = wait_query_recorded(mserver, before, "success")

    def delta(name):
        return after.get(name) - before.get(name)

    assert got.num_rows == dataset_.count_rows(filter=expr)
    assert delta("quiver_scan_files_scanned_total") == len(kept)
    assert delta("quiver_scan_files_pruned_total") == len(all_files) - len(kept)
    assert delta("quiver_scan_row_groups_scanned_total") == row_groups
    assert delta("quiver_scan_row_groups_pruned_total") == 0
    # Only one column of one file was read.
    assert 0 < delta("quiver_scan_bytes_total") < os.path.getsize(kept[0])


def test_catalog_figures_match_the_files_on_disk(mserver, dataset):
    m = mserver.metrics()
    files = [p for p in Path(dataset).rglob("*.parquet")]
    partitions = {p.parent for p in files if "=" in p.parent.name}
    assert m.get("quiver_catalog_tables") == 2
    assert m.get("quiver_catalog_files") == len(files)
    assert m.get("quiver_catalog_bytes") == sum(p.stat().st_size for p in files)
    assert m.get("quiver_catalog_partitions") == len(partitions)
    assert m.get("quiver_catalog_rows") == requests_dataset(dataset).count_rows() + 4
    newest_file = max(p.stat().st_mtime for p in files)
    assert m.get("quiver_catalog_last_refresh_timestamp_seconds") >= newest_file


def test_mmap_bytes_are_the_files_mapped(dataset, tmp_path):
    files = list(Path(dataset).rglob("*.parquet"))
    for io in ["mmap", "pread"]:
        (tmp_path / io).mkdir()
        server = Server(["--data-dir", str(dataset), "--io", io], tmp_path / io)
        try:
            server.query("SELECT * FROM requests")
            m = server.metrics()
            # Loading the catalog read every footer through a mapping, and the cache keeps
            # them: every file of both tables, whole, and nothing else. pread maps nothing.
            expected_bytes = sum(p.stat().st_size for p in files) if io == "mmap" else 0
            expected_files = len(files) if io == "mmap" else 0
            assert m.get("quiver_mmap_mapped_bytes") == expected_bytes, io
            assert m.get("quiver_mmap_mapped_files") == expected_files, io
            assert m.get("quiver_mmap_cached_bytes") == expected_bytes, io
            if io == "mmap":
                assert m.get("quiver_mmap_cache_hits_total") > 0
        finally:
            server.stop()


def test_allocator_and_process_figures_agree_with_the_kernel(mserver):
    mserver.query("SELECT * FROM requests")
    m = mserver.metrics()
    allocated = m.get("quiver_jemalloc_allocated_bytes")
    active = m.get("quiver_jemalloc_active_bytes")
    mapped = m.get("quiver_jemalloc_mapped_bytes")
    resident = m.get("quiver_jemalloc_resident_bytes")
    # jemalloc's documented relations between its statistics.
    assert 0 < allocated <= active <= mapped
    assert active <= resident
    # The process collector reads /proc like we do; RSS moves a little between reads.
    kernel = rss_bytes(mserver.proc.pid)
    assert 0.7 * kernel <= m.get("process_resident_memory_bytes") <= 1.3 * kernel
    # jemalloc's resident pages are part of the process's resident set.
    assert resident <= 1.1 * m.get("process_resident_memory_bytes")
    fds = len(os.listdir(f"/proc/{mserver.proc.pid}/fd"))
    assert abs(m.get("process_open_fds") - fds) <= 5
    # The prometheus crate counts CPU in whole seconds.
    fields = Path(f"/proc/{mserver.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert cpu - 1.5 <= m.get("process_cpu_seconds_total") <= cpu


def test_label_values_come_from_bounded_sets_only(mserver):
    marker = "zq_marker_7f3a"
    with pytest.raises(pa.ArrowException):
        mserver.query(f"SELECT '{marker}' FROM {marker}")
    mserver.query(f"SELECT '{marker}' AS x")
    # A call to a method that does not exist, from a raw gRPC channel.
    with grpc.insecure_channel(mserver.addr) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(f"/{marker}.Service/{marker}")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    m = wait_for(
        lambda: (m := mserver.metrics()).get("quiver_rpc_requests_total", method="other", code="UNIMPLEMENTED") >= 1 and m,
        what="the unknown call to be recorded",
    )
    assert marker not in m.text
    tables = {"requests", "services"}
    allowed = {"method": FLIGHT_METHODS, "code": GRPC_CODES, "outcome": OUTCOMES, "table": tables, "version": None}
    for (name, labels) in m.samples:
        if not name.startswith("quiver_"):
            continue
        for key, value in labels:
            if key == "le":
                continue
            assert key in allowed, f"{name} has an unexpected label {key}"
            if allowed[key] is not None:
                assert value in allowed[key], f"{name}{{{key}={value!r}}}"


def test_concurrent_scrapes_during_queries_stay_consistent(mserver):
    """Counters never go backwards across scrapes taken while queries run."""
    errors = []

    def run_queries():
        try:
            client = flight.connect(f"grpc://{mserver.addr}")
            for _ in range(5):
                client.do_get(flight.Ticket(b"SELECT * FROM requests")).read_all()
            client.close()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run_queries) for _ in range(2)]
    for t in threads:
        t.start()
    counters = ["quiver_query_rows_sent_total", "quiver_memory_pool_allocated_bytes_total", "quiver_scan_bytes_total"]
    last = {c: 0.0 for c in counters}
    while any(t.is_alive() for t in threads):
        m = mserver.metrics()
        for c in counters:
            assert m.get(c) >= last[c], c
            last[c] = m.get(c)
    for t in threads:
        t.join()
    assert not errors, errors
    idle = wait_for(lambda: (m := mserver.metrics()).get("quiver_queries_active") == 0 and m, what="no active query")
    assert idle.get("quiver_memory_pool_allocated_bytes_total") == idle.get("quiver_memory_pool_freed_bytes_total")
