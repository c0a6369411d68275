"""Transport benchmark: plaintext vs TLS 1.3, default vs adaptive HTTP/2 windows, on loopback.

    .venv/bin/python benches/transport.py --quiver target/release/quiver --rows 3000000 --runs 5

Each configuration is a separate `quiver serve` over the same demo data; runs alternate between
configurations so drift hits all alike. A pyarrow client reads `SELECT * FROM requests` to the
end (Arrow bytes counted, batches dropped as they arrive) and runs 200 small queries. Reported:
medians, and ratios against the plaintext/default-window baseline measured in the same run.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.flight as flight
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from quiver_process import QuiverProcess  # noqa: E402


def start(quiver: str, args: list[str], tmp: Path) -> QuiverProcess:
    return QuiverProcess(["--demo", *args], tmp / f"server-{len(list(tmp.iterdir()))}", connect=False, binary=quiver)


def full_scan(client: flight.FlightClient) -> int:
    nbytes = 0
    for chunk in client.do_get(flight.Ticket(b"SELECT * FROM requests")):
        nbytes += chunk.data.nbytes
    return nbytes


def small_queries(client: flight.FlightClient, n: int = 200) -> None:
    for i in range(n):
        client.do_get(flight.Ticket(f"SELECT count(*) FROM services WHERE traffic_share > {i % 50}".encode())).read_all()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quiver", default="target/release/quiver")
    p.add_argument("--rows", type=int, default=3_000_000)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp())
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    (tmp / "cert.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    tls = ["--tls-cert", str(tmp / "cert.pem"), "--tls-key", str(tmp / "key.pem")]
    common = ["--demo-rows", str(a.rows)]
    configs = {
        "plaintext, default windows": common,
        "plaintext, adaptive windows": common + ["--http2-adaptive-window"],
        "TLS 1.3, default windows": common + tls,
        "TLS 1.3, adaptive windows": common + tls + ["--http2-adaptive-window"],
    }
    servers, clients = {}, {}
    for name, args in configs.items():
        server = start(a.quiver, args, tmp)
        servers[name], addr = server, server.addr
        if "TLS" in name:
            port = addr.rsplit(":", 1)[1]
            clients[name] = flight.connect(f"grpc+tls://localhost:{port}", tls_root_certs=ca.cert_pem.bytes())
        else:
            clients[name] = flight.connect(f"grpc://{addr}")

    scan, small, nbytes = {n: [] for n in configs}, {n: [] for n in configs}, 0
    try:
        for name in configs:  # warm-up: page cache, footers, mappings
            nbytes = full_scan(clients[name])
            small_queries(clients[name], 20)
        names = list(configs)
        for r in range(a.runs):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                full_scan(clients[name])
                scan[name].append(time.perf_counter() - t)
                t = time.perf_counter()
                small_queries(clients[name])
                small[name].append(time.perf_counter() - t)
    finally:
        for server in servers.values():
            server.stop(timeout=60)

    base = "plaintext, default windows"
    print(f"rows: {a.rows}, Arrow bytes per scan: {nbytes / 1e6:.0f} MB, runs: {a.runs}\n")
    print("| configuration | full scan GB/s | vs baseline | 200 small queries | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name in configs:
        s, q = statistics.median(scan[name]), statistics.median(small[name])
        bs, bq = statistics.median(scan[base]), statistics.median(small[base])
        print(f"| {name} | {nbytes / s / 1e9:.2f} | {bs / s:.2f}x | {q * 1e3:.0f} ms | {bq / q:.2f}x |")


if __name__ == "__main__":
    main()
