"""Latency and concurrency: time to first batch, a mixed workload at 1, 8, 32 and 100 concurrent
clients, and 100 concurrent streams of ~1 MB (Quiver vs pyarrow's C++ Flight server serving the
same rows from memory, the baseline measured in the same run).

    .venv/bin/python benches/concurrency.py --quiver target/release/quiver            # SF1
    .venv/bin/python benches/concurrency.py --quiver target/release/quiver --smoke    # SF0.01

Clients are threads of one process, each with its own connection (pyarrow releases the GIL
while it waits on the network). Reported per level: queries per second, p50/p99 latency,
errors (0 is required: the default admission limits queue what they cannot run) and the
server's peak RSS so far. Exits 1 on any error.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.flight as flight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ArrowServer, Quiver, common_args, generate_tpch, plain, rotate, tpch_tables  # noqa: E402

# The mixed workload: a point lookup, a selective aggregate, a group-by over a date range and a
# small scan, as a dashboard would send them.
MIXED = [
    "SELECT * FROM orders WHERE o_orderkey = {k}",
    "SELECT SUM(l_extendedprice * l_discount) AS revenue FROM lineitem "
    "WHERE l_shipdate >= DATE '1994-01-01' AND l_shipdate < DATE '1994-02-01' AND l_quantity < {q}",
    "SELECT l_returnflag, l_linestatus, COUNT(*) AS n, SUM(l_quantity) AS qty FROM lineitem "
    "WHERE l_shipdate BETWEEN DATE '1995-01-01' AND DATE '1995-03-31' GROUP BY 1, 2",
    "SELECT c_name, c_acctbal FROM customer WHERE c_nationkey = {n} ORDER BY c_acctbal DESC LIMIT 20",
]
# The chunk cache of the `--chunk-cache-size` row: lineitem SF1's chunks decompressed, with room.
CHUNK_CACHE = "1GiB"
# Rows of clients that keep their connection from round to round.
KEPT = ", connections kept"
# About 1 MB of Arrow per stream.
MEGABYTE_ROWS = 7_500


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# Whether the clients of a level start their first query together (`--together`) or each as
# soon as its thread exists (the default, as in every run in docs/benchmarks.md).
TOGETHER = False


def level(addr: str, clients: int, per_client: int, make_ticket, kept=None) -> dict:
    """`clients` threads, each on its own connection, each running `per_client` queries.
    Each connects anew and closes at the end, unless `kept` holds a connection per client
    (made once, used for every level: as a service keeps its Flight client). Each client
    starts as soon as its thread exists (creating 100 Python threads takes ~10 ms, as long
    as a dozen of the key-range streams, so the first clients run nearly alone and each
    stream's own latency weighs), or, with `TOGETHER`, all send their first query at once
    (a burst: the mean then mostly measures how fast the one client process drains 100
    streams, which brings every server's ratio towards 1x)."""
    latencies, errors = [], []
    ready = threading.Barrier(clients) if TOGETHER else None

    def client(c: int):
        conn = kept[c] if kept else flight.connect(f"grpc://{addr}")
        if ready is not None:
            ready.wait(timeout=120)
        try:
            for i in range(per_client):
                started = time.perf_counter()
                try:
                    conn.do_get(make_ticket(c, i)).read_all()
                    latencies.append(time.perf_counter() - started)
                except flight.FlightError as e:
                    errors.append(str(e))
        finally:
            if not kept:
                conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "qps": len(latencies) / elapsed,
        "p50": percentile(latencies, 50) if latencies else float("nan"),
        "p99": percentile(latencies, 99) if latencies else float("nan"),
        "mean": statistics.mean(latencies) if latencies else float("nan"),
        "errors": errors,
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def key_ranges(a, data: Path, work: Path, quiver: Quiver, arrow: ArrowServer) -> bool:
    """100 concurrent clients, each fetching a different ~1 MB key range of lineitem
    (`WHERE l_orderkey >= lo AND l_orderkey < hi`; the file is sorted on l_orderkey), from
    Parquet and from a pinned copy, against the pyarrow C++ server slicing the same number
    of rows at the same place. Each server runs --rounds rounds of the 100 streams, the
    order of the servers rotating each round; reported: the median of the rounds' mean
    latencies, and the server's CPU time per stream (user + system, from /proc), which
    the shared client process disturbs less than latency: all rounds' CPU over all their
    streams, since /proc counts in 10 ms ticks (0.1 ms a stream in one round of 100).
    Returns whether any stream failed."""
    import pyarrow.parquet as pq

    keys = pq.read_table(data / "lineitem.parquet", columns=["l_orderkey"])["l_orderkey"].to_numpy()
    clients = 100
    # Client c reads the rows of keys [lo, hi): MEGABYTE_ROWS rows from row `start`.
    starts = [c * (len(keys) - MEGABYTE_ROWS) // clients for c in range(clients)]
    bounds = []
    for start in starts:
        lo = int(keys[start])
        hi = int(keys[min(start + MEGABYTE_ROWS, len(keys) - 1)])
        first = int(keys.searchsorted(lo, "left"))
        bounds.append((lo, hi, first, int(keys.searchsorted(hi, "left")) - first))
    pinned = Quiver(a.quiver, work / "pinned", [*tpch_tables(data), "--pin-table", "lineitem"])
    # Each client sends the same statement every round, so the plan cache (on by default)
    # plans each once; without it every statement is planned in full, as statements that
    # never repeat are.
    unplanned = Quiver(a.quiver, work / "unplanned",
                       [*tpch_tables(data), "--pin-table", "lineitem", "--plan-cache-entries", "0"])
    # Reported apart: the same 100 ranges again, answered by the result cache (off in every
    # other run here, its default).
    cached = Quiver(a.quiver, work / "cached", [*tpch_tables(data), "--result-cache-size", "512MiB"])
    # Decompressed column chunks kept (off by default): the warm-up round reads each
    # range's chunks once, the first measured round puts them in the cache.
    chunked = Quiver(a.quiver, work / "chunked",
                     [*tpch_tables(data), "--row-group-cache-size", "0", "--chunk-cache-size", CHUNK_CACHE])
    # Decoded row groups kept (on by default, for lookups: `quiver` above): the warm-up
    # round reads each range's row group once, the first measured round decodes it into
    # the cache. Here it is off, as it was by default before.
    undecoded = Quiver(a.quiver, work / "undecoded", [*tpch_tables(data), "--row-group-cache-size", "0"])
    failed = False
    # Connections kept across rounds, by row.
    keep = {}
    try:
        sql = "SELECT * FROM lineitem WHERE l_orderkey >= {} AND l_orderkey < {}"
        # Each range's answer equals the same rows sliced by pyarrow (the oracle).
        table = plain(pq.read_table(data / "lineitem.parquet"))

        def mismatches(servers) -> bool:
            wrong = False
            for lo, hi, first, rows in bounds[::33]:
                expected = table.slice(first, rows)
                for server in servers:
                    got = server.run(sql.format(lo, hi))
                    got = got.sort_by([("l_orderkey", "ascending"), ("l_linenumber", "ascending")])
                    if got.num_rows != rows or not all(
                        got[c].equals(expected[c]) for c in got.column_names
                    ):
                        print(f"MISMATCH key range [{lo}, {hi})", file=sys.stderr)
                        wrong = True
            return wrong

        failed |= mismatches([quiver, pinned, chunked, undecoded])
        print(f"\n100 concurrent clients, each a different key range of ~{MEGABYTE_ROWS} rows (~1 MB):\n")
        print(f"{a.rounds} rounds, medians of the rounds' means, CPU over all rounds;"
              f" clients {'start together' if TOGETHER else 'staggered'}:\n")
        print("| server | mean ms | p99 ms | vs pyarrow | server CPU ms per stream | CPU vs pyarrow | errors"
              " | server peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base_name = "pyarrow C++ server (from memory, slices)"
        runs = {
            base_name: (
                arrow.addr, lambda c, i: flight.Ticket(f"65536:{bounds[c][3]}:{bounds[c][2]}".encode()), arrow),
            "quiver (from Parquet), defaults (row group cache for lookups)": (
                quiver.addr, lambda c, i: flight.Ticket(sql.format(*bounds[c][:2]).encode()), quiver),
            "quiver (from Parquet), --row-group-cache-size 0": (
                undecoded.addr, lambda c, i: flight.Ticket(sql.format(*bounds[c][:2]).encode()), undecoded),
            f"quiver (from Parquet), --row-group-cache-size 0 --chunk-cache-size {CHUNK_CACHE}": (
                chunked.addr, lambda c, i: flight.Ticket(sql.format(*bounds[c][:2]).encode()), chunked),
            "quiver (pinned table)": (
                pinned.addr, lambda c, i: flight.Ticket(sql.format(*bounds[c][:2]).encode()), pinned),
            "quiver (pinned table), --plan-cache-entries 0: every statement planned in full": (
                unplanned.addr, lambda c, i: flight.Ticket(sql.format(*bounds[c][:2]).encode()), unplanned),
            "quiver (from Parquet), result cache on, repeated ranges (not a comparison)": (
                cached.addr, lambda c, i: flight.Ticket(sql.format(*bounds[c][:2]).encode()), cached),
        }
        # The same clients again on connections kept from round to round, as a service
        # or a notebook keeps its Flight client: no TCP and HTTP/2 handshake per stream.
        # Compared with pyarrow's server on kept connections too.
        for name in [base_name, "quiver (pinned table)", "quiver (from Parquet), defaults (row group cache for lookups)"]:
            addr, ticket, server = runs[name]
            runs[name + KEPT] = (addr, ticket, server)
            keep[name + KEPT] = [flight.connect(f"grpc://{addr}") for _ in range(clients)]
        means = {name: [] for name in runs}
        p99s = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        errors = {name: 0 for name in runs}
        for name, (addr, ticket, _) in runs.items():
            level(addr, clients, 1, ticket, keep.get(name))  # warm-up: connections, chunk cache, plans
        for round_ in range(a.rounds):
            for name in rotate(list(runs), round_):
                addr, ticket, server = runs[name]
                before = cpu_seconds(server.proc.pid)
                r = level(addr, clients, 1, ticket, keep.get(name))
                cpu[name].append(cpu_seconds(server.proc.pid) - before)
                means[name].append(r["mean"])
                p99s[name].append(r["p99"])
                errors[name] += len(r["errors"])
                failed |= bool(r["errors"])
        # Again once the caches hold the chunks and row groups: answers from decompressed
        # chunks, and from decoded row groups.
        failed |= mismatches([quiver, chunked])
        # A range is a lookup (admitted by the cache) where it reads at most an eighth of
        # the file's row groups: not in the one row group of the smoke run's lineitem.
        lookups = pq.ParquetFile(data / "lineitem.parquet").metadata.num_row_groups >= 16
        if lookups and quiver.metric("quiver_row_group_cache_hits_total") < clients:
            print("the row group cache answered fewer than the repeated ranges", file=sys.stderr)
            failed = True
        del table
        for name, (_, _, server) in runs.items():
            base = base_name + KEPT if name.endswith(KEPT) else base_name
            baseline, baseline_cpu = statistics.median(means[base]), sum(cpu[base]) / (clients * a.rounds)
            mean, used = statistics.median(means[name]), sum(cpu[name]) / (clients * a.rounds)
            rss = f"{server.peak_rss() / 2**20:.0f}" if server is not arrow else "-"
            print(f"| {name} | {mean * 1e3:.1f} | {statistics.median(p99s[name]) * 1e3:.1f} | {mean / baseline:.2f}x"
                  f" | {used * 1e3:.2f} | {used / baseline_cpu:.2f}x | {errors[name]} | {rss} |")
        if cached.metric("quiver_result_cache_hits_total") < clients:
            print("the result cache answered fewer than the repeated ranges", file=sys.stderr)
            failed = True
    finally:
        for conns in keep.values():
            for conn in conns:
                conn.close()
        pinned.close()
        chunked.close()
        undecoded.close()
        unplanned.close()
        cached.close()
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, "SF0.01, fewer queries")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--per-client", type=int, default=20, help="queries each client runs per level")
    p.add_argument("--rounds", type=int, default=9, help="rounds of the key-range comparison")
    p.add_argument("--together", action="store_true",
                   help="the clients of a level send their first query at once (a burst), not each as its thread starts")
    a = p.parse_args()
    global TOGETHER
    TOGETHER = a.together
    if a.smoke:
        a.scale, a.per_client, a.rounds = 0.01, 2, 2
    data = generate_tpch(a.scale, a.cache)
    work = Path(tempfile.mkdtemp(prefix="quiver-concurrency-"))
    # Default settings, the row group cache (lookups) included.
    quiver = Quiver(a.quiver, work / "quiver", tpch_tables(data), caches=True)
    arrow = ArrowServer(data / "lineitem.parquet", work)
    failed = False
    try:
        # Time to first batch of a small query, warm.
        firsts = []
        for i in range(20 if not a.smoke else 3):
            started = time.perf_counter()
            reader = quiver.client.do_get(flight.Ticket(MIXED[0].format(k=1 + i * 32).encode()))
            reader.read_chunk()
            firsts.append(time.perf_counter() - started)
            reader.read_all()
        print(f"time to first batch (point lookup, warm): median {statistics.median(firsts) * 1e3:.1f} ms\n")

        print("| clients | queries/s | p50 ms | p99 ms | errors | server peak RSS MB |")
        print("|---:|---:|---:|---:|---:|---:|")
        for clients in (1, 8, 32, 100):
            r = level(
                quiver.addr,
                clients,
                a.per_client,
                lambda c, i: flight.Ticket(MIXED[(c + i) % len(MIXED)].format(k=1 + (c * 131 + i * 7) % 1000 * 4, q=10 + i % 20, n=(c + i) % 25).encode()),
            )
            failed |= bool(r["errors"])
            print(f"| {clients} | {r['qps']:.1f} | {r['p50'] * 1e3:.1f} | {r['p99'] * 1e3:.1f} | {len(r['errors'])} | {quiver.peak_rss() / 2**20:.0f} |")
            for e in r["errors"][:3]:
                print(f"  error: {e}", file=sys.stderr)

        sql = f"SELECT * FROM lineitem LIMIT {MEGABYTE_ROWS}".encode()
        size = quiver.run(sql.decode()).nbytes
        print(f"\n100 concurrent streams of ~{size / 1e6:.1f} MB ({MEGABYTE_ROWS} lineitem rows), one per client:\n")
        print("| server | mean ms | p99 ms | errors |")
        print("|---|---:|---:|---:|")
        runs = {
            "quiver (from Parquet)": (quiver.addr, lambda c, i: flight.Ticket(sql)),
            "pyarrow C++ server (from memory)": (
                arrow.addr,
                lambda c, i: flight.Ticket(f"65536:{MEGABYTE_ROWS}".encode()),
            ),
        }
        for name, (addr, ticket) in runs.items():
            r = level(addr, 100, 1, ticket)
            failed |= bool(r["errors"])
            print(f"| {name} | {r['mean'] * 1e3:.1f} | {r['p99'] * 1e3:.1f} | {len(r['errors'])} |")

        failed |= key_ranges(a, data, work, quiver, arrow)
    finally:
        arrow.close()
        quiver.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
