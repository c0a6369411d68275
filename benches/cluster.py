"""TPC-H through a Quiver cluster vs one Quiver node, on this machine.

    .venv/bin/python benches/cluster.py --quiver target/release/quiver            # SF1, 3 runs
    .venv/bin/python benches/cluster.py --quiver target/release/quiver --smoke    # SF0.01, 1 run

Two cores cannot show speed-up, so this measures what can be measured and models the rest:
- measured: each query's median time on one node (`single`) and through a coordinator that
  spreads every stage over itself and one other worker (`--distributed on`: two tasks per
  stage; both processes on this machine, sharing its two cores),
  their ratio (the cluster's overhead: planning stages, serializing plans, Arrow over
  loopback gRPC), and the bytes that crossed between the nodes per query
  (`quiver_cluster_bytes_sent_total` of both, counted by the servers);
- modelled (printed separately, with its assumptions): the time on 1, 2, 4 and 8 nodes as
  t(N) = single / N + overhead + bytes / (N x bandwidth), i.e. the scan and compute split
  evenly, the measured overhead paid once, and the shuffled bytes crossing a 10 Gbit/s
  (1.25 GB/s) network in parallel.

Every answer is checked against DuckDB's. Exits 1 if any differs.
"""

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.flight as flight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Quiver, common_args, generate_tpch, geomean, rotate, tpch_tables  # noqa: E402
from tpch import DuckDB, same  # noqa: E402
from tpch_queries import QUERIES  # noqa: E402

SECRET = "b3c1d2e4f5a60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
BANDWIDTH = 1.25e9  # bytes/s: 10 Gbit/s


def auto_ticket(sql: str) -> bytes:
    """A quiver.v1.QueryTicket {version 1, sql, distribution = DISTRIBUTION_AUTO} in its Any:
    the server's default distribution, chosen per query (proto/quiver/v1/ticket.proto)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(number: int, value: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(value)) + value

    body = varint(1 << 3) + varint(1) + field(2, sql.encode()) + varint(6 << 3) + varint(1)
    return field(1, b"type.googleapis.com/quiver.v1.QueryTicket") + field(2, body)


class Auto:
    """The coordinator, each query's ticket asking for `--distributed auto` (the default):
    a scan gets one task per --distributed-bytes-per-task of files, so small stages stay on
    the coordinator."""

    def __init__(self, node: Quiver):
        self.node = node

    def run(self, sql: str):
        return self.node.client.do_get(flight.Ticket(auto_ticket(sql))).read_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, "SF0.01, one run: checks the harness and the results")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--queries", default="", help="comma-separated query numbers (default: all 22)")
    parser.add_argument("--cluster-flag", action="append", default=[], metavar="FLAG",
                        help="an extra flag for both cluster nodes, e.g. --cluster-flag=--cluster-broadcast-joins=false")
    args = parser.parse_args()
    if args.smoke:
        args.scale, args.runs = 0.01, 1
    numbers = [int(q) for q in args.queries.split(",") if q] or sorted(QUERIES)

    data = generate_tpch(args.scale, args.cache)
    workdir = Path(tempfile.mkdtemp(prefix="quiver-cluster-"))
    secret = workdir / "secret"
    secret.write_text(SECRET + "\n")
    tables = tpch_tables(data)
    port, own = free_port(), free_port()
    cluster = ["--cluster-secret-file", str(secret), *args.cluster_flag]
    worker = Quiver(args.quiver, workdir / "worker", [*tables, *cluster, "--cluster-listen", f"127.0.0.1:{port}"])
    # The coordinator is a worker too (stages get one task per worker: two).
    coordinator = Quiver(
        args.quiver, workdir / "coordinator",
        [*tables, *cluster, "--cluster-listen", f"127.0.0.1:{own}",
         "--workers", f"http://127.0.0.1:{own},http://127.0.0.1:{port}", "--distributed", "on"],
    )
    single = Quiver(args.quiver, workdir / "single", tables)
    duck = DuckDB(data, 2)
    systems = {"single": single, "cluster": coordinator, "auto": Auto(coordinator)}
    names = list(systems)
    times = {q: {n: [] for n in names} for q in numbers}
    shuffled = {}
    failures = []

    def network_bytes() -> float:
        return sum(n.metric("quiver_cluster_bytes_sent_total") for n in (worker, coordinator))

    try:
        deadline = time.monotonic() + 30
        while 'state="up"} 2' not in coordinator.scrape_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never came up")
            time.sleep(0.1)
        for q in numbers:
            sql = QUERIES[q]
            expected = duck.run(sql)
            for name, system in systems.items():
                before = network_bytes()
                problem = same(expected, system.run(sql))
                if name in ("cluster", "auto"):
                    shuffled[(q, name)] = network_bytes() - before
                if problem:
                    failures.append(f"Q{q} {name}: {problem}")
            for run in range(args.runs):
                for name in rotate(names, run):
                    started = time.perf_counter()
                    systems[name].run(sql)
                    times[q][name].append(time.perf_counter() - started)
    finally:
        duck.close()
        for node in (single, coordinator, worker):
            node.close()

    medians = {q: {n: statistics.median(ts) for n, ts in per.items()} for q, per in times.items()}
    print(f"TPC-H SF{args.scale:g}, {args.runs} runs, medians in ms; measured on one 2-core machine\n")
    print(
        "| query | single node | coordinator + 1 worker, `on` (2 tasks per stage) | on / single | bytes between nodes"
        " | coordinator + 1 worker, `auto` (default) | auto / single | bytes between nodes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios, auto_ratios = [], []
    for q in numbers:
        m = medians[q]
        ratios.append(m["cluster"] / m["single"])
        auto_ratios.append(m["auto"] / m["single"])
        print(
            f"| Q{q} | {m['single'] * 1e3:.1f} | {m['cluster'] * 1e3:.1f} | {ratios[-1]:.2f}x"
            f" | {shuffled[(q, 'cluster')] / 1e6:.1f} MB | {m['auto'] * 1e3:.1f} | {auto_ratios[-1]:.2f}x"
            f" | {shuffled[(q, 'auto')] / 1e6:.1f} MB |"
        )
    print(f"| **geomean** | | | **{geomean(ratios):.2f}x** | | | **{geomean(auto_ratios):.2f}x** | |")

    print("\nModel (not measured): t(N) = single / N + overhead + bytes / (N x 1.25 GB/s), in ms\n")
    print("| query | 1 node | 2 nodes | 4 nodes | 8 nodes |")
    print("|---|---:|---:|---:|---:|")
    speedups = {n: [] for n in (2, 4, 8)}
    for q in numbers:
        m = medians[q]
        overhead = max(0.0, m["cluster"] - m["single"])

        def t(nodes: int) -> float:
            if nodes == 1:
                return m["single"]
            return m["single"] / nodes + overhead + shuffled[(q, "cluster")] / (nodes * BANDWIDTH)

        for n in speedups:
            speedups[n].append(t(1) / t(n))
        print(f"| Q{q} | {t(1) * 1e3:.1f} | {t(2) * 1e3:.1f} | {t(4) * 1e3:.1f} | {t(8) * 1e3:.1f} |")
    print("| **speed-up, geomean** | 1.00x | " + " | ".join(f"{geomean(v):.2f}x" for v in speedups.values()) + " |")
    for failure in failures:
        print(f"MISMATCH {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
