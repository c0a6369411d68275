"""Admission control, deadlines, cancellation and graceful shutdown through the real binary
and the real pyarrow client; every ending is checked on the server's own gauges and pool
(scraped from /metrics) and on its CPU time (from /proc)."""

import hashlib
import json
import signal
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import Server, wait_for

# Holds pool memory while it streams, and streams for long enough to be caught mid-way.
LONG_SORT = "SELECT value FROM generate_series(1, 3000000) ORDER BY value DESC"
# ~20 MB of rows: more than the send path buffers, so a slow reader holds its slot.
WIDE = "SELECT value, repeat('x', 1000) AS s FROM generate_series(1, 20000)"
# Seconds of CPU before its one row: a query that is slow to its first batch.
SLOW_FIRST_BATCH = "SELECT sum(value % 7) FROM generate_series(1, 20000000000)"


def assert_idle(server: Server):
    """No query active or queued, nothing in the pool, and no task left on the query
    runtime (a query's work that outlived it would still be there)."""
    m = wait_for(
        lambda: (m := server.metrics()).get("quiver_queries_active") == 0
        and m.get("quiver_queries_queued") == 0
        and m.get("quiver_memory_pool_reserved_bytes") == 0
        and m.get("quiver_cpu_runtime_alive_tasks") == 0
        and m,
        what="the server to return to idle",
    )
    assert m.get("quiver_memory_pool_allocated_bytes_total") == m.get("quiver_memory_pool_freed_bytes_total")


def outcome_delta(server: Server, before, outcome: str) -> float:
    return server.metrics().get("quiver_queries_total", outcome=outcome) - before.get("quiver_queries_total", outcome=outcome)


def list_queries(client, options=None) -> list:
    results = list(client.do_action(flight.Action("list-queries", b""), options or flight.FlightCallOptions()))
    assert len(results) == 1
    return json.loads(results[0].body.to_pybytes())


def test_overload_gives_only_successes_and_unavailable_and_the_server_recovers(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--max-concurrent-queries", "2", "--max-queued-queries", "2"], tmp_path)
    try:
        before = server.metrics()
        results = [None] * 10
        start = threading.Barrier(10)

        def slow_query(i):
            client = flight.connect(f"grpc://{server.addr}")
            start.wait()
            try:
                reader = client.do_get(flight.Ticket(WIDE.encode()))
                rows = reader.read_chunk().data.num_rows
                time.sleep(1.0)  # a slow reader: holds its slot
                rows += reader.read_all().num_rows
                results[i] = ("ok", rows)
            except flight.FlightUnavailableError as e:
                results[i] = ("unavailable", str(e))
            except Exception as e:  # anything else fails the test below
                results[i] = ("other", repr(e))
            finally:
                client.close()

        threads = [threading.Thread(target=slow_query, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        peak_queued = 0
        while any(t.is_alive() for t in threads):
            m = server.metrics()
            assert m.get("quiver_queries_active") <= 2
            peak_queued = max(peak_queued, m.get("quiver_queries_queued"))
            time.sleep(0.05)
        for t in threads:
            t.join()

        kinds = [r[0] for r in results]
        assert set(kinds) <= {"ok", "unavailable"}, results
        assert kinds.count("ok") >= 2, results
        assert kinds.count("unavailable") >= 1, results
        assert all(r[1] == 20000 for r in results if r[0] == "ok")
        for kind, message in results:
            if kind == "unavailable":
                assert "--max-queued-queries" in message, message
        assert peak_queued <= 2
        assert outcome_delta(server, before, "rejected") == kinds.count("unavailable")
        assert outcome_delta(server, before, "success") == kinds.count("ok")
        # Recovered: idle, and serving.
        assert_idle(server)
        assert server.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4
    finally:
        server.stop()


def test_a_queued_query_that_waits_too_long_is_rejected(dataset, tmp_path):
    server = Server(
        ["--data-dir", str(dataset), "--max-concurrent-queries", "1", "--queue-timeout", "500ms"], tmp_path
    )
    try:
        holder = server.client.do_get(flight.Ticket(LONG_SORT.encode()))
        holder.read_chunk()
        with pytest.raises(flight.FlightUnavailableError, match="--queue-timeout"):
            server.query("SELECT 1")
        holder.cancel()
        assert_idle(server)
    finally:
        server.stop()


def test_the_servers_query_timeout_stops_a_stream_and_frees_everything(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--query-timeout", "1s"], tmp_path)
    try:
        before = server.metrics()
        reader = server.client.do_get(flight.Ticket(LONG_SORT.encode()))
        reader.read_chunk()
        time.sleep(1.5)
        with pytest.raises(flight.FlightTimedOutError, match=r"the query exceeded its deadline of 1s \(--query-timeout\)"):
            reader.read_all()
        assert outcome_delta(server, before, "timeout") == 1
        assert_idle(server)
    finally:
        server.stop()


def test_the_clients_grpc_timeout_stops_the_query(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        before = server.metrics()
        options = flight.FlightCallOptions(timeout=1.0)
        reader = server.client.do_get(flight.Ticket(LONG_SORT.encode()), options)
        reader.read_chunk()
        time.sleep(1.5)
        with pytest.raises(flight.FlightTimedOutError):
            reader.read_all()
        # The server stopped it on its own deadline or on the client's cancel.
        wait_for(
            lambda: outcome_delta(server, before, "timeout") + outcome_delta(server, before, "cancelled") == 1,
            what="the query to be recorded as stopped",
        )
        assert_idle(server)
    finally:
        server.stop()


def test_an_idle_stream_is_closed_while_its_client_stays_connected(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--stream-idle-timeout", "1s"], tmp_path)
    try:
        before = server.metrics()
        reader = server.client.do_get(flight.Ticket(LONG_SORT.encode()))
        reader.read_chunk()
        # The client stops reading; the server stops the query and frees its memory
        # without waiting for it.
        wait_for(lambda: outcome_delta(server, before, "timeout") == 1, what="the idle stream to be stopped")
        assert_idle(server)
        with pytest.raises(flight.FlightTimedOutError, match="--stream-idle-timeout"):
            reader.read_all()
    finally:
        server.stop()


def test_a_query_slow_to_its_first_batch_is_stopped_and_stops_computing(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--first-batch-timeout", "1s"], tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(flight.FlightTimedOutError, match=r"the first batch exceeded its deadline of 1s \(--first-batch-timeout\)"):
            server.query(SLOW_FIRST_BATCH)
        assert time.monotonic() - started < 10
        assert_idle(server)
    finally:
        server.stop()


def test_list_and_cancel_queries_with_do_action(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        reader = server.client.do_get(flight.Ticket(LONG_SORT.encode()))
        reader.read_chunk()
        # The send loop counts a batch just after handing it to the network: under load the
        # client can read it first.
        queries = wait_for(
            lambda: (qs := list_queries(server.client)) and qs[0]["rows_sent"] > 0 and qs,
            what="the first batch to be counted",
        )
        assert len(queries) == 1
        q = queries[0]
        assert isinstance(q["id"], str) and q["id"]
        assert q["state"] == "running" and q["user"] is None
        assert q["sql"] == LONG_SORT
        assert q["rows_sent"] > 0
        assert q["memory_reserved_bytes"] > 0, "the sort holds pool memory"
        assert q["started"].endswith("Z") and q["elapsed_seconds"] >= 0

        with pytest.raises(pa.ArrowInvalid, match="no query with id"):
            list(server.client.do_action(flight.Action("cancel-query", b"no-such-id")))
        list(server.client.do_action(flight.Action("cancel-query", q["id"].encode())))
        # ABORTED, which pyarrow raises as FlightInternalError (CANCELLED would be a KeyboardInterrupt).
        with pytest.raises(flight.FlightInternalError, match="cancel-query"):
            reader.read_all()
        wait_for(lambda: list_queries(server.client) == [], what="the list to empty")
        assert_idle(server)
    finally:
        server.stop()


def test_users_see_and_cancel_only_their_own_queries_and_admins_all(dataset, tmp_path):
    auth = tmp_path / "auth.toml"
    tokens = {"alice": "alice-token", "bob": "bob-token", "ops": "ops-token"}
    auth.write_text(
        "".join(
            f'[[tokens]]\nname = "{name}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
            + ("admin = true\n" if name == "ops" else "")
            for name, token in tokens.items()
        )
    )
    server = Server(["--data-dir", str(dataset), "--auth-file", str(auth)], tmp_path)
    as_ = {name: flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {t}".encode())]) for name, t in tokens.items()}
    try:
        reader = server.client.do_get(flight.Ticket(LONG_SORT.encode()), as_["alice"])
        reader.read_chunk()
        (mine,) = list_queries(server.client, as_["alice"])
        assert mine["user"] == "alice"
        assert list_queries(server.client, as_["bob"]) == []
        assert [q["id"] for q in list_queries(server.client, as_["ops"])] == [mine["id"]]
        with pytest.raises(flight.FlightUnauthenticatedError):
            list_queries(server.client)
        with pytest.raises(flight.FlightUnauthorizedError, match="another user"):
            list(server.client.do_action(flight.Action("cancel-query", mine["id"].encode()), as_["bob"]))
        list(server.client.do_action(flight.Action("cancel-query", mine["id"].encode()), as_["ops"]))
        with pytest.raises(flight.FlightInternalError, match="cancelled by ops"):
            reader.read_all()
        assert_idle(server)
    finally:
        server.stop()


def cancel_flight_info_body(info: flight.FlightInfo) -> bytes:
    """A CancelFlightInfoRequest {FlightInfo info = 1;}, encoded by hand (pyarrow has no
    client method for it)."""
    payload = info.serialize()
    n, varint = len(payload), bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        varint.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x0a" + bytes(varint) + payload


def cancel_status(results) -> int:
    """CancelFlightInfoResult {CancelStatus status = 1;}: 1 CANCELLED, 3 NOT_CANCELLABLE."""
    (result,) = results
    body = result.body.to_pybytes()
    assert body[:1] == b"\x08"
    return body[1]


def test_cancel_flight_info_stops_a_running_query_and_voids_an_unredeemed_ticket(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        client = server.client
        info = client.get_flight_info(flight.FlightDescriptor.for_command(LONG_SORT))
        reader = client.do_get(info.endpoints[0].ticket)
        reader.read_chunk()
        action = flight.Action("CancelFlightInfo", cancel_flight_info_body(info))
        assert cancel_status(list(client.do_action(action))) == 1
        with pytest.raises(flight.FlightInternalError, match=r"cancelled by a client \(CancelFlightInfo\)"):
            reader.read_all()

        # Cancelled before its ticket is redeemed: the ticket fails when it arrives.
        info = client.get_flight_info(flight.FlightDescriptor.for_command("SELECT 1"))
        action = flight.Action("CancelFlightInfo", cancel_flight_info_body(info))
        assert cancel_status(list(client.do_action(action))) == 1
        with pytest.raises(flight.FlightInternalError, match="before it was redeemed"):
            client.do_get(info.endpoints[0].ticket).read_all()
        # A plain SQL ticket names no query: not cancellable.
        plain = flight.FlightInfo(
            pa.schema([]), flight.FlightDescriptor.for_command("SELECT 1"), [flight.FlightEndpoint(b"SELECT 1", [])], -1, -1
        )
        action = flight.Action("CancelFlightInfo", cancel_flight_info_body(plain))
        assert cancel_status(list(client.do_action(action))) == 3
        assert_idle(server)
    finally:
        server.stop()


def test_sigterm_lets_a_stream_finish_within_the_grace_and_exits_0(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--shutdown-grace", "10s"], tmp_path)
    try:
        reader = server.client.do_get(flight.Ticket(WIDE.encode()))
        rows = reader.read_chunk().data.num_rows
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        rows += reader.read_all().num_rows
        assert rows == 20000
        server.client.close()
        assert server.proc.wait(timeout=15) == 0
    finally:
        server.stop()


def test_sigterm_cancels_a_stream_that_outlives_the_grace_and_exits_0(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--shutdown-grace", "1s"], tmp_path)
    try:
        reader = server.client.do_get(flight.Ticket(LONG_SORT.encode()))
        reader.read_chunk()
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        time.sleep(2.0)
        with pytest.raises(flight.FlightUnavailableError, match="shutting down"):
            reader.read_all()
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 1 + 5 + 5
    finally:
        server.stop()
