"""Full-scan delivery: `SELECT * FROM lineitem` through Quiver (from Parquet, mmap, hot page
cache; zero-copy send path, and the standard arrow-flight + tonic path it replaces), and from
memory (`--pin-table`, both send paths) vs
pyarrow's C++ Flight server serving the same table from memory at 8k and 64k-row
batches (the transport ceiling) vs pyarrow.dataset reading the file in-process.

    .venv/bin/python benches/throughput.py --quiver target/release/quiver            # SF1, 5 runs
    .venv/bin/python benches/throughput.py --quiver target/release/quiver --smoke    # SF0.01, 1 run

The same pyarrow client reads every stream to the end, counting rows as batches arrive and
dropping them. Arrow delivered is measured in one unit for all: the size of the table as one
contiguous chunk with plain (not view) strings, as Quiver sends it, since a sliced or
view-typed batch can report buffers it only partly uses. Reported: medians of GB/s delivered, the ratios against the best
pyarrow server and against pyarrow.dataset, the server process's CPU time per GB delivered
(user + system, from /proc: what the send path costs, `perf stat`'s task-clock without
perf), and Quiver's bytes on the wire (its quiver_query_bytes_sent_total) per byte of that
plain Arrow size.
"""

import os

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.flight as flight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ArrowServer, Quiver, common_args, generate_tpch, plain, rotate  # noqa: E402


def drain(reader) -> int:
    """Rows read to the end of the stream."""
    rows = 0
    for chunk in reader:
        rows += chunk.data.num_rows
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, "SF0.01, one run")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    if a.smoke:
        a.scale, a.runs = 0.01, 1
    lineitem = generate_tpch(a.scale, a.cache) / "lineitem.parquet"
    work = Path(tempfile.mkdtemp(prefix="quiver-throughput-"))

    quiver = Quiver(a.quiver, work / "quiver", ["--table", f"lineitem={lineitem}"])
    standard = Quiver(a.quiver, work / "standard", ["--table", f"lineitem={lineitem}", "--send-path", "standard"])
    # The table held in memory (--pin-table): the transport alone, as the pyarrow server.
    pinned = Quiver(a.quiver, work / "pinned", ["--table", f"lineitem={lineitem}", "--pin-table", "lineitem"])
    pinned_std = Quiver(
        a.quiver, work / "pinned-std", ["--table", f"lineitem={lineitem}", "--pin-table", "lineitem", "--send-path", "standard"]
    )
    arrow = ArrowServer(lineitem, work)
    arrow_client = flight.connect(f"grpc://{arrow.addr}")

    table = plain(ds.dataset(lineitem).to_table())
    total_rows, arrow_bytes = table.num_rows, table.combine_chunks().nbytes
    del table
    wire = []

    def via(server) -> int:
        before = server.metric("quiver_query_bytes_sent_total")
        n = drain(server.client.do_get(flight.Ticket(b"SELECT * FROM lineitem")))
        wire.append((server.metric("quiver_query_bytes_sent_total") - before) / arrow_bytes)
        return n

    def local() -> int:
        return sum(b.num_rows for b in ds.dataset(lineitem).to_batches())

    # The process serving each system, whose CPU time is measured around each run.
    servers = {
        "quiver (Parquet, mmap)": quiver.proc.pid,
        "quiver, standard send path": standard.proc.pid,
        "quiver pinned (memory)": pinned.proc.pid,
        "quiver pinned, standard send path": pinned_std.proc.pid,
        "pyarrow server, 8k rows": arrow.proc.pid,
        "pyarrow server, 64k rows": arrow.proc.pid,
    }
    systems = {
        "quiver (Parquet, mmap)": lambda: via(quiver),
        "quiver, standard send path": lambda: via(standard),
        "quiver pinned (memory)": lambda: via(pinned),
        "quiver pinned, standard send path": lambda: via(pinned_std),
        "pyarrow server, 8k rows": lambda: drain(arrow_client.do_get(flight.Ticket(b"8192"))),
        "pyarrow server, 64k rows": lambda: drain(arrow_client.do_get(flight.Ticket(b"65536"))),
        "pyarrow.dataset (in-process)": local,
    }
    rates = {name: [] for name in systems}
    cpu = {name: [] for name in servers}
    wrong = []
    try:
        for run in range(a.runs + 1):
            for name in rotate(list(systems), run):
                pid = servers.get(name)
                cpu_before = cpu_seconds(pid) if pid else 0.0
                started = time.perf_counter()
                rows = systems[name]()
                elapsed = time.perf_counter() - started
                if run and pid:
                    cpu[name].append((cpu_seconds(pid) - cpu_before) / (arrow_bytes / 1e9))
                if rows != total_rows:
                    wrong.append(f"{name} delivered {rows} rows of {total_rows}")
                if run:  # the first round warms caches
                    rates[name].append(arrow_bytes / elapsed / 1e9)
    finally:
        arrow_client.close()
        arrow.close()
        for server in (quiver, standard, pinned, pinned_std):
            server.close()

    medians = {name: statistics.median(r) for name, r in rates.items()}
    best_server = max(medians["pyarrow server, 8k rows"], medians["pyarrow server, 64k rows"])
    print(f"SELECT * FROM lineitem, TPC-H SF{a.scale:g}: {total_rows} rows, {arrow_bytes / 1e6:.0f} MB of Arrow, medians of {a.runs}\n")
    print("| source | GB/s | vs best pyarrow server | vs pyarrow.dataset | server CPU s per GB |")
    print("|---|---:|---:|---:|---:|")
    for name, rate in medians.items():
        server_cpu = f"{statistics.median(cpu[name]):.2f}" if cpu.get(name) else "-"
        print(
            f"| {name} | {rate:.2f} | {rate / best_server:.2f}x | "
            f"{rate / medians['pyarrow.dataset (in-process)']:.2f}x | {server_cpu} |"
        )
    print(f"\nQuiver bytes on the wire per Arrow byte: {statistics.median(wire):.3f}")
    for problem in wrong:
        print(problem, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
