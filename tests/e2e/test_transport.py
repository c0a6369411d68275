"""TLS, authentication, health and large results, with real clients: pyarrow.flight, Python's
ssl module for raw handshakes, and grpcio's health-checking client.

Certificates come from trustme (a throwaway CA per test), never from the server under test.
"""

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import Server, quiver_binary, wait_for

COUNT_SQL = b"SELECT count(*) AS n FROM services"


class Certs:
    """A CA and a server certificate for `names`, written as PEM files."""

    def __init__(self, tmp: Path, names=("localhost", "127.0.0.1"), tag="a"):
        self.ca = trustme.CA()
        self.dir = tmp
        self.server = self.ca.issue_cert(*names)
        self.ca_pem = self.ca.cert_pem.bytes()
        self.cert = tmp / f"server-{tag}.crt"
        self.key = tmp / f"server-{tag}.key"
        self.ca_file = tmp / f"ca-{tag}.pem"
        self.server.private_key_pem.write_to_path(str(self.key))
        self.cert.write_bytes(b"".join(b.bytes() for b in self.server.cert_chain_pems))
        self.ca_file.write_bytes(self.ca_pem)

    def client_cert(self, name="alice@example.com"):
        c = self.ca.issue_cert(name, common_name=name.split("@")[0])
        return b"".join(b.bytes() for b in c.cert_chain_pems), c.private_key_pem.bytes()


def services_count(dataset: Path) -> int:
    return ds.dataset(dataset / "services", format="parquet").count_rows()


def tls_client(port: int, root: bytes, **kwargs) -> flight.FlightClient:
    return flight.connect(f"grpc+tls://localhost:{port}", tls_root_certs=root, **kwargs)


def count(client: flight.FlightClient, options=None) -> int:
    t = client.do_get(flight.Ticket(COUNT_SQL), options=options).read_all() if options else client.do_get(flight.Ticket(COUNT_SQL)).read_all()
    return t["n"][0].as_py()


def handshake(port: int, root: bytes, max_version=None, min_version=None):
    """A raw TLS handshake with Python's ssl; returns (version, cipher, alpn)."""
    ctx = ssl.create_default_context(cadata=root.decode())
    ctx.set_alpn_protocols(["h2"])
    if max_version:
        ctx.maximum_version = max_version
    if min_version:
        ctx.minimum_version = min_version
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return s.version(), s.cipher()[0], s.selected_alpn_protocol()


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path)


def resumed(port: int, root: bytes) -> bool:
    """Whether a second TLS connection resumes the first one's session (TLS 1.3 ticket)."""
    ctx = ssl.create_default_context(cadata=root.decode())
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.recv(64)  # the server's HTTP/2 SETTINGS; tickets arrive with it
            session = s.session
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            return s.session_reused


def test_tls_13_only_with_h2_and_a_real_pyarrow_client(dataset, tmp_path, certs):
    server = Server(
        ["--data-dir", str(dataset), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--tls-handshake-timeout", "1s"],
        tmp_path,
        connect=False,
    )
    try:
        # A client that connects and never says hello holds up nobody, and is cut off.
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        client = tls_client(server.port, certs.ca_pem)
        assert count(client) == services_count(dataset)
        version, _, alpn = handshake(server.port, certs.ca_pem)
        assert (version, alpn) == ("TLSv1.3", "h2")
        # A TLS 1.2 client is refused by default.
        with pytest.raises(ssl.SSLError):
            handshake(server.port, certs.ca_pem, max_version=ssl.TLSVersion.TLSv1_2)
        # Plaintext against a TLS port fails cleanly; the server goes on.
        plain = flight.connect(f"grpc://127.0.0.1:{server.port}")
        with pytest.raises(flight.FlightError):
            count(plain)
        assert count(client) == services_count(dataset)
        assert resumed(server.port, certs.ca_pem)
        assert stalled.recv(1) == b"", "the stalled handshake is closed after the timeout"
        # The timeout drops the connection, then logs: the line may trail the EOF a little.
        wait_for(lambda: "TLS handshake timed out" in server.logs(), timeout=5, what="the handshake timeout log line")
        stalled.close()
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_tls_12_allowed_on_request_with_aead_suites(dataset, tmp_path, certs):
    server = Server(
        ["--data-dir", str(dataset), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--tls-min-version", "1.2"],
        tmp_path,
        connect=False,
    )
    try:
        version, cipher, alpn = handshake(server.port, certs.ca_pem, max_version=ssl.TLSVersion.TLSv1_2)
        assert version == "TLSv1.2" and alpn == "h2"
        assert "GCM" in cipher or "CHACHA20" in cipher, cipher
        assert count(tls_client(server.port, certs.ca_pem)) == services_count(dataset)
    finally:
        server.stop()


def test_hostname_mismatch_is_refused(dataset, tmp_path):
    certs = Certs(tmp_path, names=("db.example.com",))
    server = Server(["--data-dir", str(dataset), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)], tmp_path, connect=False)
    try:
        with pytest.raises(flight.FlightUnavailableError):
            count(tls_client(server.port, certs.ca_pem))
        # The same certificate is fine when the client expects that name: it was the name.
        ok = tls_client(server.port, certs.ca_pem, override_hostname="db.example.com")
        assert count(ok) == services_count(dataset)
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_mutual_tls(dataset, tmp_path, certs, mode):
    server = Server(
        ["--data-dir", str(dataset), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
         "--tls-client-ca", str(certs.ca_file), "--tls-client-auth", mode],
        tmp_path,
        connect=False,
    )
    try:
        chain, key = certs.client_cert("alice@example.com")
        with_cert = tls_client(server.port, certs.ca_pem, cert_chain=chain, private_key=key)
        assert count(with_cert) == services_count(dataset)
        without = tls_client(server.port, certs.ca_pem)
        if mode == "required":
            with pytest.raises(flight.FlightUnavailableError):
                count(without)
        else:
            assert count(without) == services_count(dataset)
        # A certificate from another CA is refused in both modes.
        other_chain, other_key = Certs(tmp_path, tag="other").client_cert("mallory@example.com")
        with pytest.raises(flight.FlightUnavailableError):
            count(tls_client(server.port, certs.ca_pem, cert_chain=other_chain, private_key=other_key))
        logs = server.logs()
        assert "client certificate accepted" in logs and "CN=alice" in logs, logs
    finally:
        server.stop()


@pytest.mark.parametrize("trigger", ["sighup", "file-watch"])
def test_certificate_rotation_keeps_open_streams_and_serves_the_new_cert(dataset, tmp_path, trigger):
    old = Certs(tmp_path, tag="old")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(old.cert.read_bytes())
    live_key.write_bytes(old.key.read_bytes())
    server = Server(
        ["--data-dir", str(dataset), "--tls-cert", str(live_cert), "--tls-key", str(live_key),
         "--tls-reload-interval", "0s" if trigger == "sighup" else "200ms", "--max-flight-data-size", "64KiB"],
        tmp_path,
        connect=False,
    )
    try:
        client = tls_client(server.port, old.ca_pem)
        sql = b"SELECT s.* FROM services s CROSS JOIN generate_series(1, 20000) g"
        reader = client.do_get(flight.Ticket(sql))
        rows = reader.read_chunk().data.num_rows

        new = Certs(tmp_path, tag="new")
        # Publish by rename, as cert-manager and Kubernetes do.
        for src, dst in [(new.cert, live_cert), (new.key, live_key)]:
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, dst)
        if trigger == "sighup":
            server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TLS material reloaded" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "TLS material reloaded" in server.logs()

        # The open stream finishes on its connection.
        for chunk in reader:
            rows += chunk.data.num_rows
        assert rows == 20000 * services_count(dataset)
        # New connections get the new certificate: the old CA no longer verifies it.
        assert count(tls_client(server.port, new.ca_pem)) == services_count(dataset)
        with pytest.raises(flight.FlightUnavailableError):
            count(tls_client(server.port, old.ca_pem))

        # A broken file is rejected and the current certificate stays.
        # (With file watching, a poll between the two renames may already have seen a new
        # certificate with the old key and refused it: count failures from here.)
        failures = server.logs().count("TLS reload failed")
        live_cert.write_text("not a certificate")
        if trigger == "sighup":
            server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while server.logs().count("TLS reload failed") == failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.logs().count("TLS reload failed") > failures
        assert count(tls_client(server.port, new.ca_pem)) == services_count(dataset)
    finally:
        server.stop()
    assert server.proc.returncode == 0


def hash_password(password: str) -> str:
    out = subprocess.run([str(quiver_binary()), "auth", "hash-password"], input=password + "\n", capture_output=True, text=True, check=True)
    return out.stdout.strip()


def write_auth_file(path: Path) -> Path:
    """User alice (password "correct horse") and the static token "static-token-1"."""
    import hashlib

    path.write_text(
        f"""
[[users]]
name = "alice"
password = "{hash_password('correct horse')}"

[[tokens]]
name = "ci-bot"
sha256 = "{hashlib.sha256(b'static-token-1').hexdigest()}"
"""
    )
    return path


@pytest.fixture
def auth_file(tmp_path):
    return write_auth_file(tmp_path / "auth.toml")


def test_basic_handshake_then_bearer_and_static_tokens(dataset, tmp_path, auth_file):
    server = Server(["--data-dir", str(dataset), "--auth-file", str(auth_file), "--session-ttl", "2s"], tmp_path, connect=False)
    try:
        client = flight.connect(f"grpc://{server.addr}")
        with pytest.raises(flight.FlightUnauthenticatedError, match="missing 'authorization'"):
            count(client)
        with pytest.raises(flight.FlightUnauthenticatedError, match="wrong user name or password"):
            client.authenticate_basic_token("alice", "wrong")
        with pytest.raises(flight.FlightUnauthenticatedError, match="wrong user name or password"):
            client.authenticate_basic_token("mallory", "correct horse")

        header = client.authenticate_basic_token("alice", "correct horse")
        assert header[0] == b"authorization" and header[1].startswith(b"Bearer ")
        options = flight.FlightCallOptions(headers=[header])
        assert count(client, options) == services_count(dataset)
        assert len(list(client.list_flights(options=options))) >= 2

        static = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer static-token-1")])
        assert count(client, static) == services_count(dataset)
        bad = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer static-token-2")])
        with pytest.raises(flight.FlightUnauthenticatedError, match="unknown bearer token"):
            count(client, bad)

        time.sleep(2.5)
        with pytest.raises(flight.FlightUnauthenticatedError, match="expired"):
            count(client, options)
        assert count(client, static) == services_count(dataset)
        assert "user=alice" in server.logs() or "alice" in server.logs()
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_bad_auth_file_stops_start_up_with_a_message(dataset, tmp_path):
    bad = tmp_path / "auth.toml"
    bad.write_text('[[users]]\nname = "bob"\npassword = "hunter2"\n')
    out = subprocess.run(
        [str(quiver_binary()), "serve", "--data-dir", str(dataset), "--listen", "127.0.0.1:0", "--auth-file", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "hash-password" in out.stderr, out.stderr


def health(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_grpc_health_needs_no_credentials_plain_and_tls(dataset, tmp_path, auth_file, certs):
    server = Server(
        ["--data-dir", str(dataset), "--auth-file", str(auth_file), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)],
        tmp_path,
        connect=False,
    )
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
        with grpc.secure_channel(f"localhost:{server.port}", creds) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert health(channel, "arrow.flight.protocol.FlightService") == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                health(channel, "no.such.Service")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


def test_a_2gb_result_streams_without_message_size_errors(dataset, tmp_path):
    server = Server(["--data-dir", str(dataset)], tmp_path)
    try:
        # ~2.1 GB of Arrow data: 2.1M rows of a 1000-byte string.
        sql = b"SELECT value AS i, repeat('x', 1000) AS s FROM generate_series(1, 2100000)"
        reader = server.client.do_get(flight.Ticket(sql))
        rows = nbytes = 0
        for chunk in reader:
            rows += chunk.data.num_rows
            nbytes += chunk.data.nbytes
        assert rows == 2_100_000
        assert nbytes > 2 * 10**9
    finally:
        server.stop()


def test_ipc_compression_round_trips(dataset, tmp_path):
    from conftest import requests_dataset

    # The NULL partition repeats request ids: sort on every column.
    sql = "SELECT request_id, status, latency_ms FROM requests ORDER BY request_id, latency_ms, status"
    keys = [("request_id", "ascending"), ("latency_ms", "ascending"), ("status", "ascending")]
    expected = requests_dataset(dataset).to_table(columns=["request_id", "status", "latency_ms"]).sort_by(keys)
    for codec in ["zstd", "lz4"]:
        (tmp_path / codec).mkdir()
        server = Server(["--data-dir", str(dataset), "--ipc-compression", codec], tmp_path / codec)
        try:
            got = server.query(sql)
        finally:
            server.stop()
        assert got.cast(expected.schema).equals(expected)


def read_frames_until_goaway(sock: socket.socket, deadline: float) -> float | None:
    """Reads HTTP/2 frames (RFC 9113 section 4.1: 24-bit length, type, flags, stream id)
    until a GOAWAY (type 7); returns when it arrived, or None at `deadline` or EOF."""
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        if not data:
            return None
        buf += data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind = buf[3]
            buf = buf[9 + length:]
            if kind == 7:
                return time.monotonic()
    return None


@pytest.mark.parametrize("age", [None, 1.0])
def test_max_connection_age_sends_goaway(dataset, tmp_path, age):
    """--max-connection-age: a connection that old gets a GOAWAY (so clients reconnect and
    rebalance); without it, none. Read off the wire by a raw HTTP/2 client."""
    args = ["--data-dir", str(dataset)]
    if age is not None:
        args += ["--max-connection-age", f"{int(age * 1000)}ms", "--max-connection-age-grace", "5s"]
    server = Server(args, tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            # The client preface and an empty SETTINGS frame.
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            opened = time.monotonic()
            goaway = read_frames_until_goaway(sock, opened + (age or 0) + 3.0)
        if age is None:
            assert goaway is None, "a GOAWAY without --max-connection-age"
        else:
            assert goaway is not None, "no GOAWAY within 3 s of --max-connection-age"
            assert goaway - opened >= age * 0.9, f"GOAWAY after {goaway - opened:.2f} s, before the age"
        # The server still serves new connections.
        assert server.client.do_get(flight.Ticket(COUNT_SQL)).read_all().num_rows == 1
    finally:
        server.stop()
