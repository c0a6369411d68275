"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/). Run from the
repository root with the test venv: `.venv/bin/python fuzz/seeds.py`. The seeds are
committed; this script says where each came from."""

import hashlib
import pathlib
import sys

import pyarrow as pa

ROOT = pathlib.Path(__file__).parent / "corpus"


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from test_flight_sql import field_bytes, field_varint, pack_any  # noqa: E402


QUERY_TICKET = "type.googleapis.com/quiver.v1.QueryTicket"
SQL_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."


def write(target: str, name: str, data: bytes):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


SQL = {
    "select_one": "SELECT 1",
    "aggregate": "SELECT service, count(*), avg(latency_ms) FROM requests WHERE status >= 500 GROUP BY service ORDER BY 2 DESC LIMIT 10",
    "join_cte": "WITH s AS (SELECT DISTINCT service FROM requests) SELECT * FROM s JOIN requests r USING (service) WHERE r.day = '2026-01-01'",
    "window": "SELECT service, row_number() OVER (PARTITION BY service ORDER BY latency_ms DESC) FROM requests",
    "subqueries": "SELECT * FROM requests WHERE status IN (SELECT status FROM requests WHERE latency_ms > (SELECT avg(latency_ms) FROM requests))",
    "set_ops": "SELECT 1 UNION ALL SELECT 2 EXCEPT SELECT 3 INTERSECT SELECT 4",
    "placeholders": "SELECT * FROM requests WHERE status = $1 AND service = $2",
    "explain": "EXPLAIN ANALYZE SELECT count(*) FROM requests",
    "information_schema": "SELECT table_name, column_name FROM information_schema.columns",
    "functions": "SELECT repeat('x', 10), lpad('a', 5, 'b'), concat('a', 'b') || 'c', range(1, 5), array_repeat(1, 3)",
    "write": "INSERT INTO requests VALUES (1)",
    "path": "SELECT * FROM '/etc/passwd'",
    "deep": "SELECT " + "+".join(["1"] * 50),
}

for name, sql in SQL.items():
    write("fuzz_sql", name, sql.encode())
    write("fuzz_ticket", "sql_" + name, sql.encode())

# Quiver tickets (proto/quiver/v1/ticket.proto): version (1), sql (2), query_id (3),
# timeout_ms (4), compression (5).
ticket = field_varint(1, 1) + field_bytes(2, b"SELECT 1") + field_bytes(3, b"0123456789abcdef") + field_varint(4, 5000) + field_varint(5, 3)
write("fuzz_ticket", "query_ticket", pack_any(QUERY_TICKET, ticket))
write("fuzz_ticket", "query_ticket_bad_version", pack_any(QUERY_TICKET, field_varint(1, 9) + field_bytes(2, b"SELECT 1")))
write("fuzz_ticket", "statement_query", pack_any(SQL_PREFIX + "CommandStatementQuery", field_bytes(1, b"SELECT 1")))
write("fuzz_ticket", "ticket_statement", pack_any(SQL_PREFIX + "TicketStatementQuery", field_bytes(1, pack_any(QUERY_TICKET, ticket))))
write("fuzz_ticket", "unknown_any", pack_any("type.googleapis.com/foo.Bar", b"\x08\x01"))

# Flight SQL: the first byte picks the message type (fuzz/src/lib.rs FLIGHT_SQL_TYPES).
write("fuzz_flight_sql", "statement_query", b"\x00" + field_bytes(1, b"SELECT 1"))
write("fuzz_flight_sql", "ticket_statement", b"\x01" + field_bytes(1, pack_any(QUERY_TICKET, ticket)))
write("fuzz_flight_sql", "prepared", b"\x02" + field_bytes(1, b"handle"))
write("fuzz_flight_sql", "get_tables", b"\x05" + field_bytes(1, b"datafusion") + field_bytes(2, b"pub%") + field_bytes(3, b"req%") + field_varint(5, 1))
write("fuzz_flight_sql", "sql_info", b"\x07" + field_varint(1, 0) + field_varint(1, 1))
write("fuzz_flight_sql", "cross_reference", b"\x0c" + field_bytes(3, b"a") + field_bytes(6, b"b"))
write("fuzz_flight_sql", "create_prepared", b"\x11" + field_bytes(1, b"SELECT $1"))

# Authorization headers.
write("fuzz_auth", "bearer_good", b"Bearer fuzz-token")
write("fuzz_auth", "bearer_bad", b"Bearer nope")
write("fuzz_auth", "basic", b"Basic YWxpY2U6cHc=")
write("fuzz_auth", "basic_unpadded", b"Basic YWxpY2U6cHc")
write("fuzz_auth", "basic_no_colon", b"Basic YWxpY2U=")
write("fuzz_auth", "other_scheme", b"Digest x")


# DoPut: FlightData messages as IPC header|||body pairs, from pyarrow's own encoding.
def messages(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    pieces = []
    for message in reader:
        pieces += [message.metadata.to_pybytes(), message.body.to_pybytes() if message.body else b""]
    return b"|||".join(pieces)


write("fuzz_do_put", "one_row", messages(pa.record_batch({"a": pa.array([7], pa.int64()), "b": ["x"]})))
write("fuzz_do_put", "two_rows", messages(pa.record_batch({"a": pa.array([1, 2], pa.int64())})))
write("fuzz_do_put", "types", messages(pa.record_batch({"a": ["12"], "b": [1.5], "c": pa.array([None], pa.int32()), "d": [3.25]})))
write("fuzz_do_put", "no_rows", messages(pa.record_batch({"a": pa.array([], pa.int64())})))
print("seeds written under", ROOT, hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ROOT.rglob("*")) if p.is_file())).hexdigest()[:12])
