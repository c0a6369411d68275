"""`quiver query`, `quiver tables` and `quiver health` against a real server.

Oracles: DuckDB and pyarrow.dataset over the same files; output files are read back with
pyarrow's own CSV, JSON and Parquet readers.
"""

import json
import os
import re
import socket
import subprocess

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import Server, quiver_binary, requests_dataset
from test_transport import Certs, write_auth_file

GROUPED = "SELECT service, COUNT(*) AS n, SUM(status) AS status_sum FROM requests GROUP BY service ORDER BY service"
ROWS = "SELECT request_id, status, latency_ms, cost_usd, region, user_id, error, day, service FROM requests"


def quiver(*args, env=None, input=None, timeout=120):
    merged = {**os.environ, **(env or {})}
    # The tests pass credentials explicitly; never pick them up from the environment.
    for key in ("QUIVER_SERVER", "QUIVER_USER", "QUIVER_PASSWORD", "QUIVER_TOKEN", "QUIVER_TLS_CA"):
        if not env or key not in env:
            merged.pop(key, None)
    return subprocess.run(
        [str(quiver_binary()), *args], capture_output=True, text=True, env=merged, input=input, timeout=timeout
    )


@pytest.fixture(scope="module")
def oracle(dataset):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    requests = requests_dataset(dataset)  # noqa: F841 (DuckDB finds Python variables by name)
    con.register("requests", requests)
    return con


def url(server) -> str:
    return f"grpc://{server.addr}"


def test_query_prints_an_aligned_table(server, oracle):
    out = quiver("query", "--server", url(server), GROUPED)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    expected = oracle.execute(GROUPED).fetchall()
    # +----+ borders, a header, a separator, one line per row and a closing border.
    assert len(lines) == len(expected) + 4
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header == ["service", "n", "status_sum"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:-1]]
    assert rows == [[str(v) for v in row] for row in expected]
    assert len({len(line) for line in lines}) == 1, "every line has the same width"
    # The summary goes to stderr, never into the result.
    assert f"{len(expected)} rows" in out.stderr


def test_table_output_is_capped_by_max_rows(server, dataset):
    total = requests_dataset(dataset).count_rows()
    out = quiver("query", "--server", url(server), "--max-rows", "5", "SELECT request_id FROM requests")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 5 + 4 + 1
    assert f"({total - 5} more rows not shown" in out.stdout
    assert f"{total} rows" in out.stderr


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_query_writes_files_equal_to_the_oracle(server, oracle, tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    # request_id repeats across the NULL-day partition: order fully, NULLs placed explicitly.
    sql = ROWS + " ORDER BY request_id, day NULLS FIRST, latency_ms"
    out = quiver("query", "--server", url(server), "--format", fmt, "--output", str(path), sql)
    assert out.returncode == 0, out.stderr
    expected = oracle.execute(sql).to_arrow_table()
    assert f"{expected.num_rows} rows" in out.stderr
    if fmt == "parquet":
        got = pq.read_table(path)
        assert got.schema.names == expected.schema.names
        for name in expected.schema.names:
            # Same values; the type of `day` (date) and decimals match exactly too.
            assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    elif fmt == "csv":
        got = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"request_id": pa.string()}, strings_can_be_null=True))
        assert got.num_rows == expected.num_rows
        assert got.column("request_id").to_pylist() == expected.column("request_id").to_pylist()
        assert got.column("status").to_pylist() == expected.column("status").to_pylist()
        assert got.column("latency_ms").to_pylist() == pytest.approx(expected.column("latency_ms").to_pylist())
        assert got.column("error").to_pylist() == expected.column("error").to_pylist()
    else:
        lines = path.read_text().splitlines()
        assert len(lines) == expected.num_rows
        first = json.loads(lines[0])
        row = expected.slice(0, 1).to_pylist()[0]
        assert first["request_id"] == row["request_id"]
        assert first["status"] == row["status"]
        assert first["latency_ms"] == pytest.approx(row["latency_ms"])
        assert first["day"] == str(row["day"])
        ids = [json.loads(line)["request_id"] for line in lines]
        assert ids == expected.column("request_id").to_pylist()


def test_a_failed_query_leaves_no_output_file(server, tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("previous result\n")
    # Fails during execution, after the schema (and possibly rows) arrived.
    sql = "SELECT request_id, 1 / (status - 200) AS x FROM requests ORDER BY request_id"
    out = quiver("query", "--server", url(server), "--format", "csv", "--output", str(path), sql)
    assert out.returncode == 1 and "Divide by zero" in out.stderr, out.stderr
    assert path.read_text() == "previous result\n", "the old file is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"], "no partial file is left"


def test_query_reads_sql_from_stdin_and_streams_csv_to_stdout(server, oracle):
    sql = "SELECT status, COUNT(*) AS n FROM requests GROUP BY status ORDER BY status"
    out = quiver("query", "--server", url(server), "--format", "csv", "--quiet", "-", input=sql)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0] == "status,n"
    assert [tuple(map(int, line.split(","))) for line in lines[1:]] == oracle.execute(sql).fetchall()


def test_empty_result_still_prints_its_columns(server):
    out = quiver("query", "--server", url(server), "SELECT service, status FROM requests WHERE status < 0")
    assert out.returncode == 0, out.stderr
    assert "service" in out.stdout and "status" in out.stdout
    assert "0 rows" in out.stderr


def test_errors_are_clear_and_the_server_keeps_serving(server, dataset):
    out = quiver("query", "--server", url(server), "SELECT nope FROM requests")
    assert out.returncode == 1
    assert "InvalidArgument" in out.stderr and "nope" in out.stderr

    out = quiver("query", "--server", url(server), "--format", "parquet", "SELECT 1")
    assert out.returncode != 0 and "--output" in out.stderr

    # Nothing listens on a port we just closed.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    out = quiver("query", "--server", f"grpc://127.0.0.1:{free}", "--connect-timeout", "3s", "SELECT 1")
    assert out.returncode == 1
    assert f"cannot connect to grpc://127.0.0.1:{free}" in out.stderr

    out = quiver("query", "--server", "http//nonsense", "SELECT 1")
    assert out.returncode == 1 and "grpc+tls://" in out.stderr

    # TLS against a plain port fails with a connection error, not a hang.
    out = quiver("query", "--server", f"grpc+tls://{server.addr}", "--connect-timeout", "5s", "SELECT 1")
    assert out.returncode == 1 and "cannot connect" in out.stderr

    # A filter keeps DataFusion from answering the count from row-count statistics (in
    # well under 1 ms once planned): the join itself has to run.
    sql = "SELECT COUNT(*) FROM requests a, requests b WHERE a.status + b.status > 0"
    out = quiver("query", "--server", url(server), "--timeout", "1ms", sql)
    assert out.returncode == 1 and "DeadlineExceeded" in out.stderr

    assert server.query("SELECT COUNT(*) AS n FROM requests")["n"][0].as_py() == requests_dataset(dataset).count_rows()


def test_tables_lists_sizes_and_schemas(server, dataset):
    out = quiver("tables", "--server", url(server))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TABLE", "ROWS", "SIZE", "COLUMNS"]
    summary = {line.split()[0]: line.split() for line in lines[1:3]}
    requests = requests_dataset(dataset)
    services = ds.dataset(dataset / "services", format="parquet")
    assert summary["requests"][1] == str(requests.count_rows())
    assert summary["services"][1] == str(services.count_rows())
    assert summary["requests"][-1] == str(len(requests.schema))
    # The columns of each table follow, with their Arrow types.
    text = out.stdout
    start = text.index("\nrequests\n")
    block = text[start:].split("\n\n")[0]
    for field in requests.schema:
        assert any(line.split()[0] == field.name for line in block.splitlines()[2:]), field.name
    assert re.search(r"^  day\s+Date32\s+yes$", block, re.M), block
    assert re.search(r'^  ts\s+Timestamp\(µs, "UTC"\)\s+yes$', block, re.M), block

    brief = quiver("tables", "--server", url(server), "--no-schema")
    assert brief.returncode == 0 and len(brief.stdout.splitlines()) == 3


@pytest.fixture(scope="module")
def secure(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    certs = Certs(tmp)
    auth = write_auth_file(tmp / "auth.toml")
    server = Server(
        ["--data-dir", str(dataset), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--auth-file", str(auth)],
        tmp,
        connect=False,
    )
    yield server, certs
    server.stop()


def test_tls_with_user_or_token(secure, dataset):
    server, certs = secure
    tls = ["--server", f"grpc+tls://localhost:{server.port}", "--tls-ca", str(certs.ca_file)]
    n = str(ds.dataset(dataset / "services", format="parquet").count_rows())
    sql = "SELECT COUNT(*) AS n FROM services"

    out = quiver("query", *tls, "--user", "alice", "--format", "csv", sql, env={"QUIVER_PASSWORD": "correct horse"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["n", n]

    # The password can come on stdin as well.
    out = quiver("query", *tls, "--user", "alice", "--format", "csv", sql, input="correct horse\n")
    assert out.returncode == 0, out.stderr

    out = quiver("query", *tls, "--token", "static-token-1", "--format", "csv", sql)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["n", n]

    out = quiver("query", *tls, "--user", "alice", sql, env={"QUIVER_PASSWORD": "wrong"})
    assert out.returncode == 1 and "logging in as alice failed: Unauthenticated" in out.stderr

    out = quiver("query", *tls, sql)
    assert out.returncode == 1 and "Unauthenticated" in out.stderr and "--user" in out.stderr

    # A CA that did not sign the server's certificate.
    other = Certs(certs.dir, tag="other")
    out = quiver("query", "--server", f"grpc+tls://localhost:{server.port}", "--tls-ca", str(other.ca_file), "--token", "static-token-1", sql)
    assert out.returncode == 1 and "cannot connect" in out.stderr and "--tls-ca" in out.stderr

    out = quiver("tables", *tls, "--token", "static-token-1", "--no-schema")
    assert out.returncode == 0, out.stderr
    assert "services" in out.stdout


def test_health_plain_tls_and_down(server, secure):
    out = quiver("health", "--server", url(server))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SERVING"

    # Over TLS, without credentials (health is outside authentication), by env vars as
    # the container image and Kubernetes probes use it.
    tls_server, certs = secure
    out = quiver(
        "health",
        env={"QUIVER_SERVER": f"grpc+tls://localhost:{tls_server.port}", "QUIVER_TLS_CA": str(certs.ca_file)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SERVING"

    out = quiver("health", "--service", "no.such.Service", "--server", url(server))
    assert out.returncode == 1 and "NotFound" in out.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    out = quiver("health", "--server", f"grpc://127.0.0.1:{free}", "--connect-timeout", "2s")
    assert out.returncode == 1 and "cannot connect" in out.stderr
