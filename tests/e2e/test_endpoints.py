"""`--endpoints-per-query`: GetFlightInfo splits a scan's result over several endpoints,
each a slice of the scanned files, which clients fetch separately (ADBC in parallel).
Oracle: pyarrow.dataset reading the same files, and the same server with one endpoint."""

import random
import shutil

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from conftest import DAYS, Server, make_requests, requests_dataset, wait_for, write_atomically
from test_flight_sql import field_bytes, field_varint, pack_any, statement_query, varint

QUERY_TICKET = "type.googleapis.com/quiver.v1.QueryTicket"
COLUMNS = ["request_id", "day", "service", "status", "latency_ms", "ts"]
SCAN = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE status >= 400"
KEYS = ["request_id", "day", "ts"]


def rows(table: pa.Table) -> list:
    return table.select(COLUMNS).sort_by([(k, "ascending") for k in KEYS]).to_pylist()


def oracle(root) -> pa.Table:
    return requests_dataset(root).to_table(columns=COLUMNS, filter=pc.field("status") >= 400)


def fetch_each(client: flight.FlightClient, info: flight.FlightInfo) -> list:
    return [client.do_get(e.ticket).read_all() for e in info.endpoints]


@pytest.fixture(scope="module")
def split(dataset, tmp_path_factory):
    s = Server(["--data-dir", str(dataset), "--endpoints-per-query", "4"], tmp_path_factory.mktemp("split"))
    yield s
    s.stop()


def test_a_scan_splits_into_slices_that_return_every_row_once(split, dataset):
    info = split.client.get_flight_info(flight.FlightDescriptor.for_command(SCAN.encode()))
    assert len(info.endpoints) == 4
    assert not info.ordered
    # Each endpoint its own query, with its own id (CancelFlightInfo reaches each).
    assert len({e.ticket.ticket for e in info.endpoints}) == 4
    parts = fetch_each(split.client, info)
    assert all(p.num_rows > 0 for p in parts), [p.num_rows for p in parts]
    combined = pa.concat_tables(parts)
    expected = oracle(dataset)
    assert expected.num_rows > 5000
    assert combined.num_rows == expected.num_rows
    # The same multiset of rows: none lost, none in two slices.
    assert rows(combined) == rows(expected)


def test_adbc_fetches_the_endpoints_and_equals_one_endpoint(split, server, dataset):
    def adbc(s):
        with flightsql.connect(f"grpc://{s.addr}", autocommit=True) as conn, conn.cursor() as cur:
            partitions, _schema = cur.adbc_execute_partitions(SCAN)
            cur.execute(SCAN)
            return len(partitions), cur.fetch_arrow_table()

    before = split.metrics().get("quiver_queries_total", outcome="success")
    n_split, from_split = adbc(split)
    after = split.metrics().get("quiver_queries_total", outcome="success")
    n_single, from_single = adbc(server)
    assert (n_split, n_single) == (4, 1)
    # The driver ran every endpoint's query (4 DoGets), nothing more.
    assert after - before == 4
    assert from_split.num_rows == from_single.num_rows == oracle(dataset).num_rows
    assert rows(from_split) == rows(from_single) == rows(oracle(dataset))


def test_adbc_prepared_statements_with_parameters_split(split, dataset):
    sql = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE status >= ? AND service <> ?"
    with flightsql.connect(f"grpc://{split.addr}", autocommit=True) as conn, conn.cursor() as cur:
        partitions, _schema = cur.adbc_execute_partitions(sql, (400, "web"))
        cur.execute(sql, (400, "web"))
        table = cur.fetch_arrow_table()
    assert len(partitions) == 4
    expected = requests_dataset(dataset).to_table(
        columns=COLUMNS, filter=(pc.field("status") >= 400) & (pc.field("service") != "web")
    )
    assert expected.num_rows > 1000
    assert rows(table) == rows(expected)


def test_flight_sql_statements_split_too(split, dataset):
    info = split.client.get_flight_info(flight.FlightDescriptor.for_command(statement_query(SCAN)))
    assert len(info.endpoints) == 4
    assert rows(pa.concat_tables(fetch_each(split.client, info))) == rows(oracle(dataset))


@pytest.mark.parametrize(
    "sql, ordered",
    [
        ("SELECT service, COUNT(*) AS n FROM requests GROUP BY service", False),
        ("SELECT request_id FROM requests WHERE status >= 500 ORDER BY request_id", True),
        ("SELECT request_id FROM requests LIMIT 10", False),
        ("SELECT r.request_id, s.team FROM requests r JOIN services s ON r.service = s.service", False),
        ("SELECT 1 AS one", False),
    ],
)
def test_aggregates_sorts_limits_and_joins_keep_one_endpoint(split, sql, ordered):
    info = split.client.get_flight_info(flight.FlightDescriptor.for_command(sql.encode()))
    assert len(info.endpoints) == 1
    assert info.ordered == ordered
    assert split.client.do_get(info.endpoints[0].ticket).read_all().num_rows > 0


def test_a_table_of_one_file_keeps_one_endpoint(split):
    info = split.client.get_flight_info(flight.FlightDescriptor.for_command(b"SELECT * FROM services"))
    assert len(info.endpoints) == 1


def test_pinned_tables_split_by_batch(dataset, tmp_path_factory):
    s = Server(
        ["--data-dir", str(dataset), "--pin-table", "requests", "--endpoints-per-query", "3"],
        tmp_path_factory.mktemp("pinned-split"),
    )
    try:
        info = s.client.get_flight_info(flight.FlightDescriptor.for_command(SCAN.encode()))
        assert len(info.endpoints) == 3
        assert rows(pa.concat_tables(fetch_each(s.client, info))) == rows(oracle(dataset))
    finally:
        s.stop()


def sliced_ticket(sql: str, index: int, count: int, fingerprint: int = 0) -> bytes:
    body = field_varint(1, 1) + field_bytes(2, sql.encode())
    body += field_varint(7, index) + field_varint(8, count)
    body += varint(9 << 3 | 1) + fingerprint.to_bytes(8, "little")  # fixed64
    return pack_any(QUERY_TICKET, body)


def test_forged_slices_are_refused(split):
    # INVALID_ARGUMENT arrives as ArrowInvalid, ABORTED as FlightInternalError.
    with pytest.raises(pa.ArrowInvalid, match="slice 4 of 4 is out of range"):
        split.client.do_get(flight.Ticket(sliced_ticket(SCAN, 4, 4))).read_all()
    with pytest.raises(pa.ArrowInvalid, match="cannot be split into slices"):
        split.client.do_get(flight.Ticket(sliced_ticket("SELECT COUNT(*) FROM requests", 0, 2))).read_all()
    # A fingerprint of other files: refused, not answered from these.
    with pytest.raises(flight.FlightInternalError, match="changed since GetFlightInfo"):
        split.client.do_get(flight.Ticket(sliced_ticket(SCAN, 0, 2, fingerprint=12345))).read_all()
    assert split.query("SELECT COUNT(*) AS n FROM requests").column("n")[0].as_py() > 0


def test_endpoints_planned_before_a_refresh_are_refused_after_it(dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset / "requests", root / "requests")
    s = Server(["--data-dir", str(root), "--endpoints-per-query", "2"], tmp_path / "srv")
    try:
        info = s.client.get_flight_info(flight.FlightDescriptor.for_command(SCAN.encode()))
        assert len(info.endpoints) == 2
        first = s.client.do_get(info.endpoints[0].ticket).read_all()
        new = make_requests(random.Random(7), DAYS[3], "mail", 500, True)
        write_atomically(new, root / "requests" / f"day={DAYS[3]}" / "service=mail" / "part-0.parquet")
        list(s.client.do_action(flight.Action("refresh", b"")))
        wait_for(lambda: s.query("SELECT COUNT(*) AS n FROM requests WHERE service = 'mail'").column("n")[0].as_py() == 500)
        # The second slice would read the new version: it fails rather than mix versions.
        with pytest.raises(flight.FlightInternalError, match="changed since GetFlightInfo"):
            s.client.do_get(info.endpoints[1].ticket).read_all()
        # New endpoints cover the new file.
        again = s.client.get_flight_info(flight.FlightDescriptor.for_command(SCAN.encode()))
        combined = pa.concat_tables(fetch_each(s.client, again))
        assert combined.num_rows == oracle(root).num_rows > first.num_rows
    finally:
        s.stop()


def test_corrupt_parameters_in_a_ticket_are_refused_and_the_server_stays_up(split, dataset):
    """Field 10 carries client bytes (Arrow IPC): every corruption of a valid one, including
    lengths claiming ~9 EB, is refused INVALID_ARGUMENT or runs; none crashes or allocates."""
    sql = "SELECT COUNT(*) AS n FROM requests WHERE status >= $1"
    sink = pa.BufferOutputStream()
    batch = pa.record_batch([pa.array([400], pa.int64())], names=["$1"])
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    params = sink.getvalue().to_pybytes()

    def ticket(parameters: bytes) -> flight.Ticket:
        body = field_varint(1, 1) + field_bytes(2, sql.encode()) + field_bytes(10, parameters)
        return flight.Ticket(pack_any(QUERY_TICKET, body))

    expected = requests_dataset(dataset).to_table(filter=pc.field("status") >= 400).num_rows
    assert split.client.do_get(ticket(params)).read_all().column("n")[0].as_py() == expected
    refused = 0
    for at in range(len(params)):
        corrupt = bytearray(params)
        corrupt[at : at + 8] = b"\x7f" * len(corrupt[at : at + 8])
        try:
            split.client.do_get(ticket(bytes(corrupt))).read_all()
        except pa.ArrowInvalid:
            refused += 1
        except (flight.FlightError, pa.ArrowException):
            pass  # a value that decodes but the statement cannot take
    assert refused > len(params) // 4
    with pytest.raises(pa.ArrowInvalid, match="not one row of Arrow IPC"):
        split.client.do_get(ticket(params[: len(params) // 2])).read_all()
    assert split.client.do_get(ticket(params)).read_all().column("n")[0].as_py() == expected
    assert split.proc.poll() is None
