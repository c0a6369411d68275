"""Flight SQL and Quiver's own tickets, through real clients on the one port.

ADBC's Flight SQL driver (the Go driver from PyPI, through its DB-API) runs statements,
prepared statements with parameters and the metadata calls; pyarrow.flight sends the
three ticket forms, with the protobuf messages encoded here by hand from the published
.proto definitions (not by Quiver's code). Results are compared with plain SQL tickets and
with pyarrow.dataset reading the same files.
"""

import datetime as dt
import decimal
import time

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from conftest import DAYS, Server, requests_dataset
from test_transport import auth_file  # noqa: F401 (a fixture)

FLIGHT_SQL = "type.googleapis.com/arrow.flight.protocol.sql."
QUERY_TICKET = "type.googleapis.com/quiver.v1.QueryTicket"
# Many seconds of CPU before its one row.
SLOW = "SELECT sum(value % 7) FROM generate_series(1, 20000000000)"


# --- protobuf, by hand -------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def pack_any(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any {string type_url = 1; bytes value = 2;}"""
    return field_bytes(1, type_url.encode()) + field_bytes(2, value)


def query_ticket(sql: str, timeout_ms=None, compression=None, distribution=None, no_result_cache=None) -> bytes:
    """quiver.v1.QueryTicket, as proto/quiver/v1/ticket.proto defines it."""
    body = field_varint(1, 1) + field_bytes(2, sql.encode())
    if timeout_ms is not None:
        body += field_varint(4, timeout_ms)
    if compression is not None:
        body += field_varint(5, compression)
    if distribution is not None:
        body += field_varint(6, distribution)
    if no_result_cache is not None:
        body += field_varint(11, int(no_result_cache))
    return pack_any(QUERY_TICKET, body)


def statement_query(sql: str) -> bytes:
    """arrow.flight.protocol.sql.CommandStatementQuery {string query = 1;}"""
    return pack_any(FLIGHT_SQL + "CommandStatementQuery", field_bytes(1, sql.encode()))


# --- helpers -------------------------------------------------------------------------


def connect(server: Server, **db_kwargs):
    return flightsql.connect(f"grpc://{server.addr}", db_kwargs=db_kwargs or None, autocommit=True)


def adbc_query(server: Server, sql: str, params=None) -> pa.Table:
    with connect(server) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetch_arrow_table()


def sorted_rows(table: pa.Table, keys) -> list:
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


# --- tests ---------------------------------------------------------------------------


def test_adbc_results_in_arrow_and_pandas_equal_plain_tickets_and_the_dataset(server, dataset):
    columns = ["request_id", "day", "service", "status", "latency_ms", "cost_usd", "ts", "user_id"]
    sql = f"SELECT {', '.join(columns)} FROM requests WHERE status >= 500"
    keys = ["request_id", "day", "ts"]
    with connect(server) as conn, conn.cursor() as cur:
        before = server.metrics()
        cur.execute(sql)
        arrow = cur.fetch_arrow_table()
        cur.execute(sql)
        frame = cur.fetch_df()
        after = server.metrics()
    # Flight SQL queries are counted with the rest, through the same RPCs.
    assert after.get("quiver_queries_total", outcome="success") - before.get("quiver_queries_total", outcome="success") == 2
    assert after.get("quiver_rpc_requests_total", method="DoGet", code="OK") - before.get(
        "quiver_rpc_requests_total", method="DoGet", code="OK"
    ) == 2
    plain = server.query(sql)
    oracle = requests_dataset(dataset).to_table(columns=columns, filter=pc.field("status") >= 500)
    assert oracle.num_rows > 1000
    assert arrow.schema == plain.schema
    assert sorted_rows(arrow, keys) == sorted_rows(plain, keys) == sorted_rows(oracle, keys)
    # pandas, through the driver's own conversion.
    assert len(frame) == oracle.num_rows
    assert sorted(frame["request_id"]) == sorted(oracle["request_id"].to_pylist())
    assert frame["status"].min() >= 500
    assert frame["latency_ms"].sum() == pytest.approx(pc.sum(oracle["latency_ms"]).as_py())


def test_adbc_prepared_statements_bind_parameters_of_every_common_type(server, dataset):
    sql = (
        "SELECT COUNT(*) AS n, SUM(latency_ms) AS total FROM requests "
        "WHERE service = ? AND day = ? AND status >= ? AND latency_ms > ? AND cost_usd < ? AND ts < ?"
    )
    table = requests_dataset(dataset)
    cases = [
        ("api", DAYS[1], 200, 100.5, decimal.Decimal("50.25"), dt.datetime(2026, 1, 2, 18, tzinfo=dt.timezone.utc)),
        ("web", DAYS[3], 404, 0.0, decimal.Decimal("99.9999"), dt.datetime(2026, 1, 4, 12, tzinfo=dt.timezone.utc)),
    ]
    with connect(server) as conn, conn.cursor() as cur:
        for service, day, status, latency, cost, ts in cases:
            # The same SQL twice: the driver keeps its prepared statement and rebinds.
            cur.execute(sql, (service, day, status, latency, cost, ts))
            (n, total) = cur.fetchone()
            matching = table.to_table(
                filter=(pc.field("service") == service)
                & (pc.field("day") == pa.scalar(day, pa.date32()))
                & (pc.field("status") >= status)
                & (pc.field("latency_ms") > latency)
                & (pc.field("cost_usd") < pa.scalar(cost, pa.decimal128(12, 4)))
                & (pc.field("ts") < pa.scalar(ts, pa.timestamp("us", tz="UTC")))
            )
            assert 0 < n == matching.num_rows
            assert total == pytest.approx(pc.sum(matching["latency_ms"]).as_py())
            # The same query with literals, as a plain ticket.
            literal = server.query(
                "SELECT COUNT(*) AS n FROM requests WHERE service = '{}' AND day = DATE '{}' AND status >= {} "
                "AND latency_ms > {} AND cost_usd < {} AND ts < TIMESTAMP '{}'".format(
                    service, day, status, latency, cost, ts.strftime("%Y-%m-%dT%H:%M:%SZ")
                )
            )
            assert literal.column("n")[0].as_py() == n
        # A value that cannot take the parameter's type fails with a message, and the
        # connection keeps working.
        with pytest.raises(adbc_driver_manager.Error, match=r"parameter \$3"):
            cur.execute(sql, ("api", DAYS[1], "lots", 1.0, decimal.Decimal("1"), cases[0][5]))
            cur.fetchall()
        cur.execute("SELECT COUNT(*) FROM services")
        assert cur.fetchone() == (4,)


def test_adbc_get_objects_table_schema_info_and_table_types(server, dataset):
    oracle = requests_dataset(dataset).schema
    with connect(server) as conn:
        objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
        catalogs = {c["catalog_name"]: c for c in objects}
        schemas = {s["db_schema_name"]: s for s in catalogs["datafusion"]["catalog_db_schemas"]}
        tables = {t["table_name"]: t for t in schemas["public"]["db_schema_tables"]}
        assert {"requests", "services"} <= set(tables)
        assert tables["requests"]["table_type"] == "TABLE"
        columns = [c["column_name"] for c in tables["requests"]["table_columns"]]
        assert sorted(columns) == sorted(oracle.names)

        schema = conn.adbc_get_table_schema("requests")
        # What a plain Flight client sees for the same table.
        plain = server.client.get_schema(flight.FlightDescriptor.for_path("requests")).schema
        assert schema == plain
        for field in oracle:
            assert schema.field(field.name).type == field.type, field.name

        info = conn.adbc_get_info()
        assert info["vendor_name"] == "Quiver"
        assert info["vendor_version"]
        assert "TABLE" in conn.adbc_get_table_types()


def test_adbc_username_and_password(dataset, tmp_path, auth_file):  # noqa: F811
    server = Server(["--data-dir", str(dataset), "--auth-file", str(auth_file)], tmp_path, connect=False)
    try:
        with connect(server, username="alice", password="correct horse") as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM services WHERE service = ?", ("api",))
            assert cur.fetchone() == (1,)
            cur.execute("SELECT service FROM services ORDER BY service")
            assert [r[0] for r in cur.fetchall()] == ["api", "auth", "billing", "web"]
        with pytest.raises(adbc_driver_manager.Error, match="(?i)unauthenticated|password"):
            with connect(server, username="alice", password="wrong") as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
        with pytest.raises(adbc_driver_manager.Error, match="(?i)unauthenticated"):
            with connect(server) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_updates_and_ingestion_are_refused_as_read_only(server):
    with connect(server) as conn, conn.cursor() as cur:
        cur.adbc_statement.set_sql_query("DELETE FROM services")
        with pytest.raises(adbc_driver_manager.Error, match="read-only"):
            cur.adbc_statement.execute_update()
        with pytest.raises(adbc_driver_manager.Error, match="read-only"):
            cur.adbc_ingest("uploads", pa.table({"a": [1, 2]}), mode="create")
        with pytest.raises(adbc_driver_manager.Error, match="not allowed"):
            cur.execute("DROP TABLE services")
            cur.fetchall()
        cur.execute("SELECT COUNT(*) FROM services")
        assert cur.fetchone() == (4,)


def test_the_three_ticket_forms_return_the_same_rows(server, dataset):
    sql = "SELECT service, COUNT(*) AS n, SUM(status) AS s FROM requests GROUP BY service ORDER BY service"
    client = server.client
    plain = client.do_get(flight.Ticket(sql.encode())).read_all()
    ours = client.do_get(flight.Ticket(query_ticket(sql))).read_all()
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_query(sql)))
    assert info.endpoints[0].ticket.ticket.startswith(b"\n")  # an Any, of TicketStatementQuery
    assert FLIGHT_SQL.encode() + b"TicketStatementQuery" in info.endpoints[0].ticket.ticket
    flight_sql = client.do_get(info.endpoints[0].ticket).read_all()
    adbc = adbc_query(server, sql)
    assert plain == ours == flight_sql
    assert adbc.to_pylist() == plain.to_pylist()

    oracle = requests_dataset(dataset).to_table(columns=["service", "status"])
    grouped = oracle.group_by("service").aggregate([("status", "count"), ("status", "sum")])
    expected = {r["service"]: (r["status_count"], r["status_sum"]) for r in grouped.to_pylist()}
    assert {r["service"]: (r["n"], r["s"]) for r in plain.to_pylist()} == expected

    # Our ticket through GetFlightInfo keeps its options; Flight SQL's through its own.
    info = client.get_flight_info(flight.FlightDescriptor.for_command(query_ticket(sql)))
    assert client.do_get(info.endpoints[0].ticket).read_all() == plain


def test_ticket_decoding_edge_cases(server):
    client = server.client
    # An Any of a protocol we do not speak is refused, not run as SQL.
    foreign = pack_any("type.googleapis.com/acme.v1.Query", field_bytes(1, b"SELECT 1"))
    with pytest.raises(pa.ArrowInvalid, match="acme.v1.Query"):
        client.do_get(flight.Ticket(foreign)).read_all()
    # SQL text that happens to decode as an (empty) Any is still SQL.
    explain = client.do_get(flight.Ticket(b"EXPLAIN SELECT 1")).read_all()
    assert explain.num_rows >= 1 and "plan" in explain.column_names[1]
    with pytest.raises(pa.ArrowInvalid, match="empty"):
        client.do_get(flight.Ticket(b"")).read_all()
    # A Quiver ticket from the future, and one with an unknown compression.
    future = pack_any(QUERY_TICKET, field_varint(1, 2) + field_bytes(2, b"SELECT 1"))
    with pytest.raises(pa.ArrowInvalid, match="version 2"):
        client.do_get(flight.Ticket(future)).read_all()
    with pytest.raises(pa.ArrowInvalid, match="compression"):
        client.do_get(flight.Ticket(query_ticket("SELECT 1", compression=9))).read_all()
    assert server.query("SELECT 1 AS one").column("one")[0].as_py() == 1


def test_query_ticket_timeout_and_compression(server):
    client = server.client
    started = time.monotonic()
    with pytest.raises(flight.FlightTimedOutError, match="timeout_ms"):
        client.do_get(flight.Ticket(query_ticket(SLOW, timeout_ms=300))).read_all()
    assert time.monotonic() - started < 10

    sql = "SELECT request_id, path, method FROM requests"

    def sent_bytes(ticket: bytes) -> tuple[pa.Table, float]:
        before = server.metrics().get("quiver_query_bytes_sent_total")
        table = client.do_get(flight.Ticket(ticket)).read_all()
        return table, server.metrics().get("quiver_query_bytes_sent_total") - before

    plain, plain_bytes = sent_bytes(sql.encode())
    zstd, zstd_bytes = sent_bytes(query_ticket(sql, compression=3))
    lz4, lz4_bytes = sent_bytes(query_ticket(sql, compression=2))
    keys = ["request_id", "path", "method"]
    assert sorted_rows(plain, keys) == sorted_rows(zstd, keys) == sorted_rows(lz4, keys)
    # Repetitive strings: both codecs must shrink what is sent.
    assert zstd_bytes < 0.5 * plain_bytes, (zstd_bytes, plain_bytes)
    assert lz4_bytes < 0.8 * plain_bytes, (lz4_bytes, plain_bytes)
