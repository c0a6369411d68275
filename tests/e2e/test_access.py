"""Per-table authorization (`tables = [...]` in the auth file): a table a caller may not
read does not exist for them, on every path, in the same words as a missing table."""

import hashlib
import json
import signal

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import Server, requests_dataset, wait_for
from test_transport import hash_password

ALICE = (b"authorization", b"Bearer alice-token")
SERVICES_ONLY = (b"authorization", b"Bearer services-token")
NOTHING = (b"authorization", b"Bearer nothing-token")


@pytest.fixture(scope="module")
def restricted(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    auth = tmp / "auth.toml"

    def token(name, secret, tables=None):
        line = f'[[tokens]]\nname = "{name}"\nsha256 = "{hashlib.sha256(secret).hexdigest()}"\n'
        if tables is not None:
            line += "tables = [" + ", ".join(f'"{t}"' for t in tables) + "]\n"
        return line

    auth.write_text(
        token("alice", b"alice-token")
        + token("svc", b"services-token", ["serv*"])
        + token("nobody", b"nothing-token", [])
        + f'[[users]]\nname = "carol"\npassword = "{hash_password("carol pw")}"\ntables = ["services"]\n'
    )
    server = Server(["--data-dir", str(dataset), "--auth-file", str(auth)], tmp, connect=False)
    yield server
    server.stop()


def client(server):
    return flight.connect(f"grpc://{server.addr}")


def query(server, header, sql):
    return client(server).do_get(flight.Ticket(sql.encode()), flight.FlightCallOptions(headers=[header])).read_all()


def not_found(server, header, sql):
    with pytest.raises(pa.ArrowKeyError) as denied:
        query(server, header, sql)
    return str(denied.value)


def test_a_denied_table_is_missing_through_every_statement_shape(restricted, dataset):
    # The unrestricted token reads both, and equals the oracle.
    assert query(restricted, ALICE, "SELECT count(*) AS n FROM requests")["n"][0].as_py() == requests_dataset(dataset).count_rows()
    services = query(restricted, SERVICES_ONLY, "SELECT service FROM services ORDER BY service")
    assert services["service"].to_pylist() == sorted(pq.read_table(dataset / "services" / "services.parquet")["service"].to_pylist())

    missing = not_found(restricted, SERVICES_ONLY, "SELECT * FROM no_such_table")
    for sql in [
        "SELECT * FROM requests",
        "SELECT count(*) FROM public.requests",
        "SELECT count(*) FROM datafusion.public.requests",
        "WITH r AS (SELECT * FROM requests) SELECT count(*) FROM r",
        "SELECT * FROM services WHERE service IN (SELECT service FROM requests)",
        "SELECT * FROM services WHERE EXISTS (SELECT 1 FROM requests)",
        "SELECT (SELECT max(status) FROM requests) AS m FROM services",
        "SELECT * FROM services UNION ALL SELECT service, service, service FROM requests",
        "SELECT * FROM services JOIN requests USING (service)",
        "EXPLAIN SELECT * FROM requests",
        "SELECT count(*) FROM (SELECT * FROM (SELECT * FROM requests))",
    ]:
        message = not_found(restricted, SERVICES_ONLY, sql)
        assert "table 'requests' not found" in message or "requests" in message, (sql, message)
        # Same words as a table that does not exist: the list offered is what the caller sees.
        assert "available tables: services" in message, (sql, message)
        assert "available tables: services" in missing
    # information_schema and SHOW TABLES show only what the caller may read.
    names = query(restricted, SERVICES_ONLY, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    assert names["table_name"].to_pylist() == ["services"]
    columns = query(restricted, SERVICES_ONLY, "SELECT DISTINCT table_name FROM information_schema.columns WHERE table_schema = 'public'")
    assert columns["table_name"].to_pylist() == ["services"]
    shown = query(restricted, SERVICES_ONLY, "SHOW TABLES")
    assert "requests" not in shown.column("table_name").to_pylist()
    # An empty list reads nothing, and computes what needs no table.
    assert query(restricted, NOTHING, "SELECT 1 AS one")["one"].to_pylist() == [1]
    assert "available tables: " in not_found(restricted, NOTHING, "SELECT * FROM services")


def test_descriptors_listings_and_schemas_hide_denied_tables(restricted):
    options = flight.FlightCallOptions(headers=[SERVICES_ONLY])
    c = client(restricted)
    listed = [info.descriptor.path[0].decode() for info in c.list_flights(options=options)]
    assert listed == ["services"]
    everything = [info.descriptor.path[0].decode() for info in c.list_flights(options=flight.FlightCallOptions(headers=[ALICE]))]
    assert sorted(everything) == ["requests", "services"]
    with pytest.raises(pa.ArrowKeyError, match="available tables: services"):
        c.get_flight_info(flight.FlightDescriptor.for_path("requests"), options)
    with pytest.raises(pa.ArrowKeyError, match="available tables: services"):
        c.get_schema(flight.FlightDescriptor.for_path("requests"), options)
    with pytest.raises(pa.ArrowKeyError, match="available tables: services"):
        c.get_flight_info(flight.FlightDescriptor.for_command(b"SELECT * FROM requests"), options)
    info = c.get_flight_info(flight.FlightDescriptor.for_path("services"), options)
    assert c.do_get(info.endpoints[0].ticket, options).read_all().num_rows == 4


def test_flight_sql_metadata_and_statements_respect_the_list(restricted):
    with flightsql.connect(f"grpc://{restricted.addr}", db_kwargs={"username": "carol", "password": "carol pw"}, autocommit=True) as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        tables = sorted(
            t["table_name"]
            for catalog in objects
            for schema in catalog["catalog_db_schemas"] or []
            for t in schema["db_schema_tables"] or []
        )
        assert tables == ["services"]
        # The driver looks the table up with GetTables: a denied table is as absent as a
        # missing one.
        with pytest.raises(adbc_driver_manager.Error) as denied:
            conn.adbc_get_table_schema("requests")
        with pytest.raises(adbc_driver_manager.Error) as missing:
            conn.adbc_get_table_schema("no_such_table")
        assert str(denied.value) == str(missing.value)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM services")
            assert cur.fetchone() == (4,)
            with pytest.raises(adbc_driver_manager.Error, match="available tables: services"):
                cur.execute("SELECT count(*) FROM requests")
                cur.fetchall()
            # Prepared statements too (planned at prepare, checked again when run).
            with pytest.raises(adbc_driver_manager.Error, match="available tables: services"):
                cur.execute("SELECT count(*) FROM requests WHERE status = ?", (200,))
                cur.fetchall()


# --- the audit log ----------------------------------------------------------------------


def audit_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_audit_log_records_queries_and_logins_without_secrets_and_reopens_on_sighup(dataset, tmp_path):
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[users]]\nname = "carol"\npassword = "{hash_password("s3cret-pw")}"\ntables = ["services"]\n'
        f'[[tokens]]\nname = "bot"\nsha256 = "{hashlib.sha256(b"tok-abc-123").hexdigest()}"\n'
    )
    log = tmp_path / "audit.log"
    server = Server(["--data-dir", str(dataset), "--auth-file", str(auth), "--audit-log", str(log)], tmp_path, connect=False)
    try:
        c = client(server)
        with pytest.raises(flight.FlightUnauthenticatedError):
            c.authenticate_basic_token("carol", "wrong-pw")
        header = c.authenticate_basic_token("carol", "s3cret-pw")
        carol = flight.FlightCallOptions(headers=[header])
        bot = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer tok-abc-123")])
        ok = c.do_get(flight.Ticket(b"SELECT service, team FROM services ORDER BY team"), carol).read_all()
        with pytest.raises(pa.ArrowKeyError):
            c.do_get(flight.Ticket(b"SELECT * FROM requests"), carol).read_all()
        with pytest.raises(flight.FlightUnauthenticatedError):
            c.do_get(flight.Ticket(b"SELECT 1"), flight.FlightCallOptions(headers=[(b"authorization", b"Bearer not-a-token")])).read_all()
        long_sql = "SELECT '" + "x" * 5000 + "' AS s"
        assert c.do_get(flight.Ticket(long_sql.encode()), bot).read_all().num_rows == 1
        joined = c.do_get(flight.Ticket(b"SELECT r.status, s.team FROM requests r JOIN services s USING (service) ORDER BY r.latency_ms DESC LIMIT 7"), bot).read_all()
        assert joined.num_rows == 7

        wait_for(lambda: len([l for l in audit_lines(log) if l["event"] == "query"]) >= 4, what="four query lines")
        # logrotate: move the file away, SIGHUP, and the next lines go to a new file.
        rotated = tmp_path / "audit.log.1"
        log.rename(rotated)
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "audit log reopened" in server.logs(), what="the reopen")
        c.do_get(flight.Ticket(b"SELECT 2 AS two"), bot).read_all()
        wait_for(lambda: log.exists() and len(audit_lines(log)) == 1, what="a line in the new file")
    finally:
        server.stop()

    text = rotated.read_text() + log.read_text()
    for secret in ["s3cret-pw", "wrong-pw", "tok-abc-123", "not-a-token", header[1].decode().split()[-1]]:
        assert secret not in text
    lines = audit_lines(rotated)
    for line in lines:
        assert line["time"].endswith("Z") and "T" in line["time"]
        assert line["peer"].startswith("127.0.0.1:")
    auths = [l for l in lines if l["event"] == "auth"]
    assert [(a["rpc"], a["user"], a["outcome"], a["code"]) for a in auths[:2]] == [
        ("Handshake", "carol", "failure", "UNAUTHENTICATED"),
        ("Handshake", "carol", "success", "OK"),
    ]
    assert any(a["rpc"] == "DoGet" and a["outcome"] == "failure" and a["user"] is None and "unknown bearer token" in a["reason"] for a in auths)
    queries = [l for l in lines if l["event"] == "query"]
    first, denied, long_one, join = queries
    assert (first["user"], first["rpc"], first["outcome"], first["code"]) == ("carol", "DoGet", "success", "OK")
    assert first["tables"] == ["services"] and first["rows"] == ok.num_rows and first["bytes"] > 0
    assert first["sql"] == "SELECT service, team FROM services ORDER BY team" and not first["sql_truncated"]
    assert first["duration_ms"] > 0 and len(first["query_id"]) == 16
    assert (denied["outcome"], denied["code"], denied["rows"]) == ("error", "NOT_FOUND", 0)
    assert long_one["user"] == "bot" and long_one["sql_truncated"] and long_one["sql_bytes"] == len(long_sql)
    assert len(long_one["sql"].encode()) == 4096 and long_sql.startswith(long_one["sql"])
    assert join["tables"] == ["requests", "services"] and join["rows"] == 7
    assert join["peak_memory_bytes"] > 0, "a join and a sort reserve memory"
    [after] = audit_lines(log)
    assert after["sql"] == "SELECT 2 AS two" and after["code"] == "OK"
