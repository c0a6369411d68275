"""Flight RPCs, errors and live refresh against the real binary."""

import json
import shutil
import time

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import DAYS, Server, make_requests, write_atomically


def test_list_flights(server, dataset):
    infos = {tuple(i.descriptor.path): i for i in server.client.list_flights()}
    assert set(infos) == {(b"requests",), (b"services",)}
    requests = infos[(b"requests",)]
    files = list((dataset / "requests").rglob("*.parquet"))
    assert requests.total_records == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert requests.total_bytes > 0
    assert "day" in requests.schema.names and "retries" in requests.schema.names
    # The endpoint's ticket runs SELECT * on the table.
    table = server.client.do_get(requests.endpoints[0].ticket).read_all()
    assert table.num_rows == requests.total_records


def test_get_flight_info_and_schema(server):
    descriptor = flight.FlightDescriptor.for_command(b"SELECT service, COUNT(*) AS n FROM requests GROUP BY service")
    info = server.client.get_flight_info(descriptor)
    assert info.schema.names == ["service", "n"]
    assert info.schema.field("service").type == pa.string()
    table = server.client.do_get(info.endpoints[0].ticket).read_all()
    assert table.schema.equals(info.schema)
    assert table.num_rows == 3 + 0  # api, auth, web (the NULL-day partition is service=web)

    schema = server.client.get_schema(flight.FlightDescriptor.for_path("services")).schema
    assert schema.names == ["service", "team", "tier"]


def test_refresh_action_and_list_actions(server):
    actions = [a.type for a in server.client.list_actions()]
    assert actions == [
        "refresh",
        "list-queries",
        "cancel-query",
        "CancelFlightInfo",
        "CreatePreparedStatement",
        "ClosePreparedStatement",
        "CancelQuery",
    ]
    result = list(server.client.do_action(flight.Action("refresh", b"")))
    body = json.loads(result[0].body.to_pybytes())
    assert body["failed"] == []


@pytest.mark.parametrize(
    "ticket,exc,needle",
    [
        (b"SELECT * FROM missing_table", pa.ArrowKeyError, "available tables: requests, services"),
        (b"SELEKT 1", pa.ArrowInvalid, "SELEKT"),
        (b"SELECT no_such_column FROM requests", pa.ArrowInvalid, "no_such_column"),
        (b"INSERT INTO services VALUES ('x', 'y', 'z')", pa.ArrowInvalid, "INSERT INTO is not allowed"),
        (b"DROP TABLE services", pa.ArrowInvalid, "DROP TABLE is not allowed"),
        (b"CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc/'", pa.ArrowInvalid, "CREATE EXTERNAL TABLE"),
        (b"COPY services TO '/tmp/quiver-leak.parquet'", pa.ArrowInvalid, "COPY is not allowed"),
        (b"SET datafusion.execution.batch_size = 1", pa.ArrowInvalid, "SET is not allowed"),
        (b"SELECT * FROM '/etc/passwd'", pa.ArrowInvalid, "path"),
        (b"\xff\xfe\x00garbage", pa.ArrowInvalid, "UTF-8"),
        (b"", pa.ArrowInvalid, "empty"),
    ],
)
def test_errors_have_the_right_status(server, ticket, exc, needle):
    with pytest.raises(exc) as info:
        server.client.do_get(flight.Ticket(ticket)).read_all()
    assert needle in str(info.value)


def test_huge_garbage_ticket_gets_the_transport_limit_and_server_survives(server):
    with pytest.raises(pa.ArrowException) as info:
        server.client.do_get(flight.Ticket(b"\x07" * (6 * 1024 * 1024))).read_all()
    assert "too large" in str(info.value) or "exceeds" in str(info.value)
    assert server.query("SELECT COUNT(*) AS n FROM services").column("n")[0].as_py() == 4


def test_unknown_action_and_unsupported_rpcs(server):
    with pytest.raises(pa.ArrowInvalid, match="available actions: refresh"):
        list(server.client.do_action(flight.Action("explode", b"")))
    # DoPut only binds Flight SQL parameters; an upload is refused as read-only.
    with pytest.raises(pa.ArrowInvalid, match="read-only"):
        writer, _ = server.client.do_put(
            flight.FlightDescriptor.for_path("services"), pa.schema([("a", pa.int32())])
        )
        writer.write_table(pa.table({"a": pa.array([1], pa.int32())}))
        writer.close()
    with pytest.raises(pa.ArrowNotImplementedError):
        writer, reader = server.client.do_exchange(flight.FlightDescriptor.for_command(b"SELECT 1"))
        writer.done_writing()
        reader.read_all()
    assert server.query("SELECT COUNT(*) AS n FROM services").column("n")[0].as_py() == 4


def test_partition_added_while_running_is_seen(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    server = Server(["--data-dir", str(data), "--refresh-interval", "1s"], tmp_path)
    try:
        before = server.query("SELECT COUNT(*) AS n FROM requests").column("n")[0].as_py()
        new = make_requests(__import__("random").Random(7), DAYS[-1], "billing", 1234, True)
        # Half-written and hidden files that must never be read.
        part = data / "requests" / f"day={DAYS[-1]}" / "service=billing"
        part.mkdir(parents=True)
        (part / "part-1.parquet.tmp").write_bytes(b"PAR1 half written")
        (part / ".part-2.parquet").write_bytes(b"hidden")
        (part / "_SUCCESS").write_bytes(b"")
        written = time.monotonic()
        write_atomically(new, part / "part-0.parquet")
        while True:
            n = server.query("SELECT COUNT(*) AS n FROM requests").column("n")[0].as_py()
            if n == before + 1234:
                break
            assert n == before, "a partial count means a half-read partition"
            assert time.monotonic() - written < 15, "the new partition was not seen within the refresh interval"
            time.sleep(0.1)
        billing = server.query("SELECT COUNT(*) AS n FROM requests WHERE service = 'billing'").column("n")[0].as_py()
        assert billing == 1234
    finally:
        server.stop()


def test_corrupt_files_are_skipped_at_start_and_fail_only_their_queries(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    # Corrupt before start: skipped with a warning naming it.
    bad = data / "requests" / f"day={DAYS[0]}" / "service=api" / "part-9.parquet"
    bad.write_bytes(b"this is not a parquet file")
    server = Server(["--data-dir", str(data), "--refresh-interval", "1h"], tmp_path)
    try:
        total = server.query("SELECT COUNT(*) AS n FROM requests").column("n")[0].as_py()
        assert total > 0
        assert "part-9.parquet" in server.logs()
        # A file that turns corrupt later fails only the queries that read it.
        victim = data / "requests" / f"day={DAYS[1]}" / "service=auth" / "part-0.parquet"
        size = victim.stat().st_size
        with open(victim, "r+b") as f:
            f.truncate(size // 2)  # replaced in place by a broken writer
        with pytest.raises(pa.ArrowException) as info:
            server.query(f"SELECT * FROM requests WHERE day = DATE '{DAYS[1]}' AND service = 'auth'")
        assert "part-0.parquet" in str(info.value) or "service=auth" in str(info.value), str(info.value)
        other = server.query(f"SELECT COUNT(*) AS n FROM requests WHERE day = DATE '{DAYS[2]}'")
        assert other.column("n")[0].as_py() > 0
    finally:
        server.stop()
