"""A hostile client against the real binary: every request here once crashed, wedged or
ballooned the server. Each test checks that the process is alive, that `SELECT 1` answers
within a couple of seconds afterwards, that memory stays within a stated bound, and that
the error is the right gRPC status (pyarrow's exception class) naming the limit hit.

Results that do come back are checked against DuckDB computing the same expression."""

import json
import threading
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import Server, rss_bytes, wait_for
from test_admission import cancel_flight_info_body, cancel_status
from test_flight_sql import FLIGHT_SQL, QUERY_TICKET, field_bytes, field_varint, pack_any
from test_transport import hash_password

MiB = 1 << 20


def alive_and_answering(server: Server, within: float = 2.0):
    """The process runs and `SELECT 1` comes back within `within` seconds."""
    assert server.proc.poll() is None, f"the server died:\n{server.logs()[-4000:]}"
    client = flight.connect(f"grpc://{server.addr}")
    try:
        start = time.monotonic()
        options = flight.FlightCallOptions(timeout=within + 5)
        table = client.do_get(flight.Ticket(b"SELECT 1 AS one"), options).read_all()
        took = time.monotonic() - start
        assert table.column("one").to_pylist() == [1]
        assert took < within, f"SELECT 1 took {took:.2f}s"
    finally:
        client.close()


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


class PeakRss:
    """Samples a process's RSS every 20 ms in the background."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_bytes(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def chain(term: str, op: str, n: int) -> str:
    return op.join([term] * n)


# --- 1. statement depth --------------------------------------------------------------

DEPTH = 1000  # the default --max-sql-depth


def depth_shapes():
    """(name, SQL with n terms) pairs; each term adds one level of nesting."""
    return [
        ("1+1", lambda n: f"SELECT {chain('1', ' + ', n)} AS v"),
        ("col+col", lambda n: f"SELECT sum({chain('status', ' + ', n)}) AS v FROM requests"),
        ("OR chain", lambda n: f"SELECT count(*) AS v FROM requests WHERE {' OR '.join(f'status = {i}' for i in range(n))}"),
        ("|| chain", lambda n: f"SELECT length({chain(repr('a'), ' || ', n)}) AS v"),
    ]


@pytest.fixture(scope="module")
def hostile(dataset, tmp_path_factory):
    s = Server(["--data-dir", str(dataset), "--refresh-interval", "0s"], tmp_path_factory.mktemp("hostile"))
    yield s
    s.stop()
    assert s.proc.returncode == 0


def duck(dataset: Path, sql: str):
    con = duckdb.connect()
    # DuckDB's own default is the same 1000 levels; the oracle needs a little more.
    con.execute("SET max_expression_depth TO 5000")
    con.execute(
        f"CREATE VIEW requests AS SELECT * FROM read_parquet('{dataset}/requests/**/*.parquet', hive_partitioning = true, union_by_name = true)"
    )
    return con.execute(sql).fetchall()


@pytest.mark.parametrize("shape", depth_shapes(), ids=lambda s: s[0])
def test_statements_at_the_depth_limit_plan_and_one_deeper_are_refused_on_every_rpc(hostile, dataset, shape):
    name, make = shape
    # The edge: the deepest statement the default limits allow plans and runs, with the
    # same answer DuckDB gives. Terms nest one level each, plus the function or
    # aggregate around them.
    at_limit = None
    for n in range(DEPTH - 3, DEPTH + 1):
        try:
            got = hostile.query(make(n))
        except flight.FlightError as e:  # noqa: PERF203
            raise AssertionError(f"{name}: {n} terms failed: {e}") from e
        except pa.ArrowInvalid as e:
            assert "--max-sql-depth" in str(e), e
            break
        at_limit = (n, got)
    assert at_limit is not None, f"{name}: nothing near the limit planned"
    n, got = at_limit
    assert n >= DEPTH - 2, f"{name}: only {n} terms planned"
    assert got.column("v").to_pylist() == [row[0] for row in duck(dataset, make(n))]
    too_deep = make(DEPTH + 5)

    with pytest.raises(pa.ArrowInvalid, match="--max-sql-depth"):
        hostile.query(too_deep)
    descriptor = flight.FlightDescriptor.for_command(too_deep.encode())
    with pytest.raises(pa.ArrowInvalid, match="--max-sql-depth"):
        hostile.client.get_flight_info(descriptor)
    with pytest.raises(pa.ArrowInvalid, match="--max-sql-depth"):
        hostile.client.get_schema(descriptor)
    with pytest.raises(pa.ArrowInvalid, match="--max-sql-depth"):
        hostile.client.get_flight_info(flight.FlightDescriptor.for_command(pack_any(FLIGHT_SQL + "CommandStatementQuery", field_bytes(1, too_deep.encode()))))
    with flightsql.connect(f"grpc://{hostile.addr}", autocommit=True) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error, match="--max-sql-depth"):
            cur.adbc_prepare(too_deep)
    alive_and_answering(hostile)


def test_long_chains_of_every_kind_are_refused_and_the_largest_statement_does_not_crash(hostile):
    shapes = [
        chain("SELECT 1", " UNION ALL ", 2000),
        "SELECT 1 FROM " + chain("services", " CROSS JOIN ", 1500),
        "WITH " + ", ".join(f"c{i} AS (SELECT {i} AS x)" for i in range(1200)) + " SELECT 1",
        "SELECT " + chain("CAST(1 AS BIGINT)", " * ", 3000),
        "SELECT " + chain("'a'", " || ", 5000),
        "SELECT 1 WHERE " + chain("true", " AND ", 5000),
        # Up to --max-sql-size: one operator chain of half a million terms.
        "SELECT " + chain("1", "+", (1 << 20) // 2 - 8),
    ]
    for sql in shapes:
        with pytest.raises(pa.ArrowInvalid, match="--max-sql-(depth|set-operations|relations)"):
            hostile.query(sql)
        assert hostile.proc.poll() is None, sql[:80]
    with pytest.raises(pa.ArrowInvalid, match="--max-sql-size"):
        hostile.query("SELECT " + chain("1", "+", 600_000))
    # The same limits on Flight SQL statements.
    big = "SELECT " + chain("1", "+", 600_000)
    with pytest.raises(pa.ArrowInvalid, match="--max-sql-size"):
        hostile.client.get_flight_info(flight.FlightDescriptor.for_command(pack_any(FLIGHT_SQL + "CommandStatementQuery", field_bytes(1, big.encode()))))
    alive_and_answering(hostile)


def test_set_operations_at_their_limit_plan(hostile):
    # The default --max-sql-set-operations is 500: 501 SELECTs.
    got = hostile.query(chain("SELECT 1 AS v", " UNION ALL ", 501))
    assert got.num_rows == 501
    with pytest.raises(pa.ArrowInvalid, match="--max-sql-set-operations"):
        hostile.query(chain("SELECT 1 AS v", " UNION ALL ", 502))


# --- 2. placeholders -------------------------------------------------------------------


def test_huge_placeholder_numbers_are_refused_without_allocating(hostile):
    rss = rss_bytes(hostile.proc.pid)
    with PeakRss(hostile.proc.pid) as peak:
        with flightsql.connect(f"grpc://{hostile.addr}", autocommit=True) as conn, conn.cursor() as cur:
            for sql in ["SELECT $100000000000000", "SELECT $3000000", "SELECT $2", "SELECT ?3000000", "SELECT $99999999999999999999999"]:
                with pytest.raises(adbc_driver_manager.Error, match="placeholder"):
                    cur.adbc_prepare(sql)
            # Still works as before for real statements.
            cur.execute("SELECT CAST($1 AS BIGINT) + CAST($2 AS BIGINT) AS v", (1, 2))
            assert cur.fetch_arrow_table().column("v").to_pylist() == [3]
    assert peak.peak - rss < 64 * MiB, f"RSS grew by {(peak.peak - rss) >> 20} MiB"
    alive_and_answering(hostile)


# --- 3. work that never yields ---------------------------------------------------------


def test_a_deadline_stops_a_query_that_computes_without_yielding(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--cpu-stall-threshold", "3s"], tmp_path)
    try:
        client = flight.connect(f"grpc://{server.addr}")
        # A cross join feeding an aggregate: before the yield points above amplifying
        # operators, this ran for minutes inside one poll.
        sql = "SELECT count(*) AS n FROM requests a CROSS JOIN requests b CROSS JOIN generate_series(1, 2)"
        start = time.monotonic()
        with pytest.raises(flight.FlightTimedOutError):
            client.do_get(flight.Ticket(sql.encode()), flight.FlightCallOptions(timeout=2)).read_all()
        assert time.monotonic() - start < 6
        alive_and_answering(server)
        # It has really stopped: out of the listing, slot and pool, CPU quiet.
        wait_for(lambda: list_queries(server) == [], timeout=10, what="the query to leave list-queries")
        m = server.metrics()
        assert m.get("quiver_queries_active") == 0
        assert m.get("quiver_memory_pool_reserved_bytes") == 0
        assert m.get("quiver_cpu_runtime_stalled") == 0
        client.close()
    finally:
        server.stop()


def list_queries(server: Server) -> list:
    results = list(server.client.do_action(flight.Action("list-queries", b"")))
    return json.loads(results[0].body.to_pybytes())


# --- 4. memory outside the pool ----------------------------------------------------------

# With --memory-limit 64MiB the process guard defaults to 2 x 64 MiB + 256 MiB allocated;
# RSS adds the binary, thread stacks and allocator slack on top of the baseline.
RSS_BOUND = 640 * MiB


def test_functions_that_amplify_are_capped_and_rss_stays_bounded(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--memory-limit", "64MiB"], tmp_path)
    try:
        server.query("SELECT 1")
        baseline = rss_bytes(server.proc.pid)
        hostile = [
            "SELECT length(repeat('x', 800000000))",
            "SELECT length(repeat(repeat('x', 100000), 100000))",
            "SELECT length(lpad('x', 800000000))",
            "SELECT length(rpad('x', 800000000, 'yz'))",
            "SELECT cardinality(range(1, 1000000000))",
            "SELECT cardinality(generate_series(1, 1000000000))",
            "SELECT cardinality(array_repeat(1, 1000000000))",
            "SELECT length(replace(repeat('a', 100000), 'a', repeat('b', 100000)))",
            # Constants (folded into the plan) are capped at 1/256: 1 MiB.
            "SELECT length(repeat('x', 2000000))",
            # Each part within the cap, the whole over it.
            "SELECT length(concat(repeat('x', 1000000), repeat('x', 1000000)))",
            "SELECT length(repeat('x', 1000000) || repeat('x', 1000000))",
            # Per batch: a column of one 1 MB value, concatenated 300 times.
            "SELECT length(" + " || ".join(["s"] * 300) + ") FROM (SELECT repeat('x', 1000000) || value::varchar AS s FROM generate_series(1, 1))",
            # Per batch, over columns: 8192 rows of 40 kB.
            "SELECT max(length(repeat('x', 40000) || value::varchar)) FROM generate_series(1, 100000)",
            "SELECT length(repeat(status::varchar, 100000000)) FROM requests",
        ]
        with PeakRss(server.proc.pid) as peak:
            for sql in hostile:
                # RESOURCE_EXHAUSTED, which pyarrow raises as ArrowInvalid.
                with pytest.raises(pa.ArrowInvalid, match="--max-function-output"):
                    server.query(sql)
            # EXPLAIN constant-folds too: the cap stops the fold (the optimizer reports
            # the failed rule in the plan) instead of allocating.
            plan = server.query("EXPLAIN SELECT length(repeat('x', 800000000))")
            assert "--max-function-output" in str(plan.to_pylist()) or plan.num_rows > 0
        assert peak.peak - baseline < RSS_BOUND, f"RSS grew by {(peak.peak - baseline) >> 20} MiB"
        # Within the cap, the same functions give DuckDB's answers.
        for sql, expected in [
            ("SELECT length(repeat('ab', 1000)) AS v", 2000),
            ("SELECT length(lpad('x', 500, 'yz')) AS v", 500),
            ("SELECT cardinality(range(1, 1001)) AS v", 1000),
            ("SELECT length('ab' || 'cd') AS v", 4),
        ]:
            assert server.query(sql).column("v").to_pylist() == [expected]
            assert duckdb.sql(sql.replace("cardinality(range", "len(range")).fetchall()[0][0] == expected
        # `||` keeps its column name and NULL semantics.
        t = server.query("SELECT 'a' || 'b', NULL || 'b' AS n")
        assert t.schema.names[0] == "Utf8(\"a\") || Utf8(\"b\")"
        assert t.column("n").to_pylist() == [None]
        alive_and_answering(server)
    finally:
        server.stop()


def test_the_memory_guard_refuses_work_and_cancels_the_largest_query(dataset, tmp_path):
    # The pool (default: half the machine) lets this aggregate grow; the process guard at
    # 300 MiB allocated must stop it. One-row batches: the query yields every 128 rows of
    # 1 MB, so it overshoots the guard by at most ~128 MB before the cancel lands.
    server = Server(
        [
            "--data-dir", str(dataset),
            "--memory-hard-limit", "300MiB",
            "--datafusion-config", "datafusion.execution.batch_size=1",
        ],
        tmp_path,
    )
    try:
        server.query("SELECT 1")
        baseline = rss_bytes(server.proc.pid)
        sql = "SELECT length(array_to_string(array_agg(repeat('x', 1000000) || value::varchar), '')) FROM generate_series(1, 3000)"
        with PeakRss(server.proc.pid) as peak:
            with pytest.raises(pa.ArrowInvalid, match="--memory-hard-limit"):
                server.query(sql)
        assert peak.peak - baseline < 1024 * MiB, f"RSS grew by {(peak.peak - baseline) >> 20} MiB"
        wait_for(lambda: server.metrics().get("quiver_memory_hard_limit_exceeded") == 0, timeout=10, what="memory to fall back")
        m = server.metrics()
        assert m.get("quiver_memory_guard_cancelled_total") >= 1
        assert m.get("quiver_memory_pool_reserved_bytes") == 0
        alive_and_answering(server)
    finally:
        server.stop()


# --- 5. handshake floods ---------------------------------------------------------------


def test_a_flood_of_bad_logins_is_bounded_and_a_valid_login_gets_through(dataset, tmp_path):
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f"""
[[users]]
name = "alice"
password = "{hash_password('correct horse')}"

[[users]]
name = "bob"
password = "{hash_password('battery staple')}"
"""
    )
    server = Server(["--data-dir", str(dataset), "--auth-file", str(auth)], tmp_path, connect=False)
    try:
        time.sleep(0.5)
        rss, threads = rss_bytes(server.proc.pid), threads_of(server.proc.pid)
        stop = threading.Event()
        outcomes = {"unauthenticated": 0, "unavailable": 0, "other": []}
        lock = threading.Lock()

        def attacker(i):
            client = flight.connect(f"grpc://{server.addr}")
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    client.authenticate_basic_token(f"mallory{i}-{n}" if i % 2 else "alice", f"guess-{n}")
                    with lock:
                        outcomes["other"].append("a bad password was accepted")
                except flight.FlightUnauthenticatedError:
                    with lock:
                        outcomes["unauthenticated"] += 1
                except flight.FlightUnavailableError:
                    with lock:
                        outcomes["unavailable"] += 1
                except Exception as e:  # noqa: BLE001
                    with lock:
                        outcomes["other"].append(repr(e))
            client.close()

        attackers = [threading.Thread(target=attacker, args=(i,)) for i in range(100)]
        with PeakRss(server.proc.pid) as peak:
            for t in attackers:
                t.start()
            time.sleep(2)
            peak_threads = threads_of(server.proc.pid)
            # A valid login during the flood: "alice" is being guessed at, so she backs
            # off; a user nobody attacks logs in promptly.
            good = flight.connect(f"grpc://{server.addr}")
            # Alice is being guessed at: she is most likely in backoff now (refused without
            # a password check); the race where her backoff just expired may let her in.
            try:
                good.authenticate_basic_token("alice", "correct horse")
            except flight.FlightUnauthenticatedError as e:
                assert "too many failed logins" in str(e)
            except flight.FlightUnavailableError:
                pass
            start = time.monotonic()
            header = None
            for _ in range(3):
                try:
                    header = good.authenticate_basic_token("bob", "battery staple")
                    break
                except flight.FlightUnavailableError:
                    time.sleep(0.2)
            took = time.monotonic() - start
            stop.set()
            for t in attackers:
                t.join()
        assert header is not None, "bob could not log in during the flood"
        assert took < 5, f"bob's login took {took:.1f}s during the flood"
        options = flight.FlightCallOptions(headers=[header])
        assert good.do_get(flight.Ticket(b"SELECT 1 AS one"), options).read_all().num_rows == 1
        good.close()
        assert outcomes["other"] == []
        assert outcomes["unauthenticated"] > 0
        growth = peak.peak - rss
        # Each password check holds ~19 MiB; at most one per CPU run at once.
        assert growth < 256 * MiB, f"RSS grew by {growth >> 20} MiB"
        assert peak_threads - threads < 40, f"threads went from {threads} to {peak_threads}"
        m = server.metrics()
        assert m.get("quiver_auth_failures_total", reason="bad_credentials") > 0
        assert m.get("quiver_auth_failures_total", reason="backoff") > 0
        alive = flight.connect(f"grpc://{server.addr}")
        header = alive.authenticate_basic_token("bob", "battery staple")
        alive.close()
    finally:
        server.stop()


# --- 6. retained memory ----------------------------------------------------------------


def test_ids_and_prepared_statements_are_bounded_and_every_path_applies_the_size_limit(dataset, tmp_path):
    server = Server(
        ["--data-dir", str(dataset), "--max-prepared-statement-bytes", "1MiB", "--max-sql-size", "256KiB"],
        tmp_path,
    )
    try:
        client = server.client
        # A 3.9 MB query id in a forged ticket: refused, not kept.
        body = field_varint(1, 1) + field_bytes(2, b"SELECT 1") + field_bytes(3, b"x" * 3_900_000)
        forged = pack_any(QUERY_TICKET, body)
        with pytest.raises(pa.ArrowInvalid, match="query id"):
            client.do_get(flight.Ticket(forged)).read_all()
        with pytest.raises(pa.ArrowInvalid, match="query id"):
            list(client.do_action(flight.Action("cancel-query", b"y" * 100_000)))
        rss = rss_bytes(server.proc.pid)
        info = flight.FlightInfo(
            pa.schema([]), flight.FlightDescriptor.for_command(b"x"), [flight.FlightEndpoint(forged, [])], -1, -1
        )
        for _ in range(50):
            action = flight.Action("CancelFlightInfo", cancel_flight_info_body(info))
            assert cancel_status(list(client.do_action(action))) == 3  # NOT_CANCELLABLE
        assert rss_bytes(server.proc.pid) - rss < 64 * MiB

        big = "SELECT 1 AS v /*" + "x" * 200_000 + "*/"
        with flightsql.connect(f"grpc://{server.addr}", autocommit=True) as conn:
            # Five 200 KB statements in a 1 MiB budget: the oldest are closed, the newest work.
            cursors = []
            for _ in range(8):
                cur = conn.cursor()
                cur.adbc_prepare(big)
                cursors.append(cur)
            # The oldest handle was closed by the budget; running it says so.
            with pytest.raises(adbc_driver_manager.Error, match="max-prepared-statement-bytes"):
                cursors[0].adbc_statement.execute_query()
            cursors[-1].execute(big)
            assert cursors[-1].fetch_arrow_table().column("v").to_pylist() == [1]
            for cur in cursors:
                cur.close()
            # Over --max-sql-size on the Flight SQL paths too.
            with conn.cursor() as cur:
                with pytest.raises(adbc_driver_manager.Error, match="--max-sql-size"):
                    cur.execute("SELECT 1 /*" + "x" * 300_000 + "*/")
            with conn.cursor() as cur:
                with pytest.raises(adbc_driver_manager.Error, match="--max-sql-size"):
                    cur.adbc_prepare("SELECT 1 /*" + "x" * 300_000 + "*/")
            # Parameters: more than one row is refused.
            with conn.cursor() as cur:
                with pytest.raises(adbc_driver_manager.Error, match="one row"):
                    cur.execute("SELECT $1 AS v", pa.table({"p": list(range(1000))}))
        alive_and_answering(server)
    finally:
        server.stop()


# --- 7. planning RPCs are admitted -----------------------------------------------------


def test_planning_rpcs_wait_for_a_slot_like_queries(dataset, tmp_path):
    server = Server(
        ["--data-dir", str(dataset), "--max-concurrent-queries", "1", "--max-queued-queries", "0", "--shutdown-grace", "1s"],
        tmp_path,
    )
    try:
        # Hold the one slot with a stream nobody reads.
        reader = server.client.do_get(flight.Ticket(b"SELECT value, repeat('x', 1000) FROM generate_series(1, 200000)"))
        reader.read_chunk()
        descriptor = flight.FlightDescriptor.for_command(b"SELECT 1")
        other = flight.connect(f"grpc://{server.addr}")
        with pytest.raises(flight.FlightUnavailableError, match="--max-concurrent-queries"):
            other.get_flight_info(descriptor)
        # pyarrow's get_schema raises UNAVAILABLE as a plain OSError.
        with pytest.raises(OSError, match="--max-concurrent-queries"):
            other.get_schema(descriptor)
        with flightsql.connect(f"grpc://{server.addr}", autocommit=True) as conn, conn.cursor() as cur:
            with pytest.raises(adbc_driver_manager.Error, match="--max-concurrent-queries"):
                cur.adbc_prepare("SELECT 1")
        reader.cancel()
        other.close()
        wait_for(lambda: server.metrics().get("quiver_queries_active") == 0, what="the slot to free")
        alive_and_answering(server)
    finally:
        server.stop()
