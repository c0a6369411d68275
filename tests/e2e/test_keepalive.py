"""The schema arrives as soon as the query is planned, and a long computation keeps its
stream alive with empty batches (`--stream-keepalive`), on both send paths and through
Flight SQL, without changing the answer."""

import json
import time

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import Server, wait_for

# Summing a long series computes for seconds and sends one row at the end; the sum has a
# closed form, the oracle.
N = 1_500_000_000
SQL = f"SELECT sum(value) AS s FROM generate_series(1, {N})"
EXPECTED = N * (N + 1) // 2


def listed(server: Server) -> list:
    results = list(server.client.do_action(flight.Action("list-queries", b"")))
    return json.loads(results[0].body.to_pybytes())


@pytest.mark.parametrize("send_path", ["zero-copy", "standard"])
def test_schema_first_then_keepalives_then_the_answer(dataset, tmp_path, send_path):
    args = ["--data-dir", str(dataset), "--stream-keepalive", "200ms"]
    if send_path == "standard":
        args += ["--ipc-compression", "zstd"]  # compressed results take the standard path
    server = Server(args, tmp_path)
    try:
        reader = server.client.do_get(flight.Ticket(SQL.encode()))
        # do_get returned: the schema is here while the sum is still being computed.
        assert reader.schema.names == ["s"]
        running = [q for q in listed(server) if q["sql"] == SQL]
        assert running and running[0]["rows_sent"] == 0, running
        batches = []
        started = time.monotonic()
        while True:
            try:
                batches.append(reader.read_chunk().data)
            except StopIteration:
                break
        took = time.monotonic() - started
        rows = [b.num_rows for b in batches]
        assert rows[-1] == 1, rows
        empty = rows[:-1]
        assert empty and set(empty) == {0}, rows
        # About one keep-alive per 200 ms of computing (generously bounded both ways).
        assert len(empty) >= max(1, int(took / 0.2 * 0.3)), (len(empty), took)
        assert len(empty) <= took / 0.2 + 2, (len(empty), took)
        assert pa.Table.from_batches(batches)["s"].to_pylist() == [EXPECTED]
        # Keep-alives are not batches of rows, and the first batch is the one with the sum.
        wait_for(lambda: not [q for q in listed(server) if q["sql"] == SQL], what="the query to end")
        metrics = server.metrics()
        assert metrics.get("quiver_query_rows_sent_total") == 1
        assert metrics.get("quiver_query_batches_sent_total") == 1
    finally:
        server.stop()


def test_flight_sql_clients_read_through_keepalives(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset), "--stream-keepalive", "200ms"], tmp_path)
    try:
        with flightsql.connect(f"grpc://{server.addr}", autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(SQL)
            assert cur.fetch_arrow_table()["s"].to_pylist() == [EXPECTED]
    finally:
        server.stop()
