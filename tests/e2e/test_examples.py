"""Every example in examples/ runs against a real server and prints the right answer.

The examples are run exactly as their first line says (the Python ones with this
environment's interpreter, the Rust ones as the binaries `cargo build --release
--workspace --all-targets` leaves in target/release/examples). Oracle: DuckDB over the
same files.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from conftest import REPO, Server, quiver_binary, requests_dataset
from test_transport import Certs, hash_password

EXAMPLES = REPO / "examples"


def run(*args, env=None, timeout=120):
    out = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )
    assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out


def python(script: str, *args, env=None):
    return run(sys.executable, EXAMPLES / "python" / script, *args, env=env)


def rust_example(name: str) -> Path:
    return quiver_binary().parent / "examples" / name


@pytest.fixture(scope="module")
def oracle(dataset):
    con = duckdb.connect()
    requests = requests_dataset(dataset)  # noqa: F841 (DuckDB finds Python variables by name)
    con.register("requests", requests)
    return con


def by_service(oracle):
    return dict(oracle.execute("SELECT service, COUNT(*) FROM requests WHERE service IS NOT NULL GROUP BY service").fetchall())


def test_every_example_is_listed_and_starts_with_its_command():
    index = (EXAMPLES / "README.md").read_text()
    files = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".py", ".rs"))
    assert len(files) >= 7
    for path in files:
        rel = path.relative_to(EXAMPLES).as_posix()
        assert rel in index, f"{rel} is not in examples/README.md"
        first = path.read_text().splitlines()[0]
        command = "python examples/" if path.suffix == ".py" else "cargo run"
        assert command in first, f"{rel} does not start with the command that runs it"


def test_query_pandas(server, oracle):
    out = python("query_pandas.py", f"grpc://{server.addr}").stdout
    counts = by_service(oracle)
    for service, n in counts.items():
        assert re.search(rf"^\s*{service}\s+{n}\s", out, re.M), f"{service} {n} not in:\n{out}"
    assert out.strip().endswith(f"{len(counts)} rows")


def test_stream_batches(server, oracle):
    out = python("stream_batches.py", f"grpc://{server.addr}")
    total, max_latency = oracle.execute("SELECT COUNT(*), MAX(latency_ms) FROM requests").fetchone()
    m = re.search(r"rows=(\d+) batches=(\d+) max_latency_ms=([\d.]+)", out.stdout)
    assert m, out.stdout
    assert int(m[1]) == total
    assert int(m[2]) >= 1
    assert float(m[3]) == max_latency


def test_adbc_pandas(server, oracle):
    out = python("adbc_pandas.py", f"grpc://{server.addr}", "auth").stdout
    assert "tables: requests, services" in out
    expected = oracle.execute(
        "SELECT status, COUNT(*) FROM requests WHERE service = 'auth' GROUP BY status ORDER BY status"
    ).fetchall()
    got = [tuple(int(x) for x in line.split()) for line in out.splitlines()[2:]]
    assert got == expected


def test_polars_frame(server, oracle):
    out = python("polars_frame.py", f"grpc://{server.addr}").stdout
    expected = oracle.execute(
        "SELECT service, COUNT(*), COUNT(*) FILTER (WHERE status >= 500) FROM requests "
        "WHERE service IS NOT NULL GROUP BY service ORDER BY service"
    ).fetchall()
    for service, n, errors in expected:
        assert re.search(rf"│ {service}\s+┆ {n}\s+┆ {errors}\s+┆", out), f"{service} {n} {errors} not in:\n{out}"


def test_tls_basic_auth(dataset, tmp_path, oracle):
    certs = Certs(tmp_path)
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[[users]]\nname = "alice"\npassword = "{hash_password("correct horse")}"\n')
    server = Server(
        ["--data-dir", str(dataset), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--auth-file", str(auth)],
        tmp_path,
        connect=False,
    )
    try:
        out = python(
            "tls_basic_auth.py",
            f"grpc+tls://localhost:{server.port}",
            certs.ca_file,
            "alice",
            env={"QUIVER_PASSWORD": "correct horse"},
        ).stdout
        total = oracle.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        assert out.split() == ["requests", str(total)]
    finally:
        server.stop()


def test_rust_flight_client(server, oracle):
    out = run(rust_example("flight_client"), f"http://{server.addr}").stdout
    counts = by_service(oracle)
    for service, n in counts.items():
        assert re.search(rf"^\| {service}\s+\| {n}\s+\|$", out, re.M), f"{service} {n} not in:\n{out}"
    assert out.strip().endswith(f"{len(counts)} rows")


def test_rust_flight_sql_client(server, oracle):
    out = run(rust_example("flight_sql_client"), f"http://{server.addr}", "web").stdout
    assert re.search(r"\| datafusion\s+\| public\s+\| requests\s+\| TABLE\s+\|", out), out
    expected = oracle.execute(
        "SELECT status, COUNT(*) FROM requests WHERE service = 'web' GROUP BY status ORDER BY status"
    ).fetchall()
    got = [tuple(int(x) for x in m) for m in re.findall(r"^\| (\d+)\s+\| (\d+)\s+\|$", out, re.M)]
    assert got == expected
    assert out.strip().endswith(f"{len(expected)} rows")
