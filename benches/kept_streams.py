"""Key ranges on kept connections: what one ~1 MB stream costs when a client keeps its
Flight connection, as a service or a notebook does. Quiver serving a pinned lineitem
against pyarrow's C++ Flight server slicing the same rows from memory (the baseline,
measured in the same run), optionally with other Quiver builds beside it (`--also`).

    .venv/bin/python benches/kept_streams.py --quiver target/release/quiver
    .venv/bin/python benches/kept_streams.py --quiver new/quiver --also old/quiver --rounds 40

Each round, each server in turn (the order rotating): one client on one kept connection
runs the 100 ranges one after another (alone: the time to the schema message, then to the
end, per stream), then 100 clients, each on its own kept connection, run one range each,
started as their threads start (staggered, as benches/concurrency.py). Reported: medians
over rounds, server CPU per stream from /proc over all rounds, and ratios to pyarrow's
server. Sampled answers are checked against pyarrow's slices of the same file; exits 1 on
a mismatch or an error.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import MEGABYTE_ROWS, cpu_seconds, level  # noqa: E402
from harness import ArrowServer, Quiver, common_args, generate_tpch, plain, rotate, tpch_tables  # noqa: E402

SQL = "SELECT * FROM lineitem WHERE l_orderkey >= {} AND l_orderkey < {}"
CLIENTS = 100


def ranges(data: Path, rows: int) -> list:
    """(lo, hi, first row, rows) of CLIENTS key ranges of about `rows` rows each."""
    keys = pq.read_table(data / "lineitem.parquet", columns=["l_orderkey"])["l_orderkey"].to_numpy()
    out = []
    for c in range(CLIENTS):
        start = c * (len(keys) - rows) // CLIENTS
        lo, hi = int(keys[start]), int(keys[min(start + rows, len(keys) - 1)])
        first = int(keys.searchsorted(lo, "left"))
        out.append((lo, hi, first, int(keys.searchsorted(hi, "left")) - first))
    return out


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y > 0 else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, "SF0.01, two rounds")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--also", action="append", default=[], help="another quiver binary to run beside it")
    a = p.parse_args()
    if a.smoke:
        a.scale, a.rounds = 0.01, 2
    data = generate_tpch(a.scale, a.cache)
    work = Path(tempfile.mkdtemp(prefix="quiver-kept-"))
    rows = min(MEGABYTE_ROWS, pq.ParquetFile(data / "lineitem.parquet").metadata.num_rows // 10)
    bounds = ranges(data, rows)
    arrow = ArrowServer(data / "lineitem.parquet", work)
    quivers = [
        Quiver(binary, work / f"pinned{i}", [*tpch_tables(data), "--pin-table", "lineitem"])
        for i, binary in enumerate([a.quiver, *a.also])
    ]
    servers = {"pyarrow C++ server (from memory, slices)": (
        arrow, lambda c, i=0: flight.Ticket(f"65536:{bounds[c][3]}:{bounds[c][2]}".encode()))}
    for q, binary in zip(quivers, [a.quiver, *a.also]):
        servers[f"quiver {binary} (pinned table)"] = (q, lambda c, i=0: flight.Ticket(SQL.format(*bounds[c][:2]).encode()))
    failed = False
    alone, kept = {}, {}
    try:
        table = plain(pq.read_table(data / "lineitem.parquet"))
        for name, (server, ticket) in servers.items():
            if server is arrow:
                continue
            for lo, hi, first, n in bounds[::33]:
                got = server.run(SQL.format(lo, hi)).sort_by([("l_orderkey", "ascending"), ("l_linenumber", "ascending")])
                expected = table.slice(first, n)
                if got.num_rows != n or not all(got[c].equals(expected[c]) for c in got.column_names):
                    print(f"MISMATCH {name} key range [{lo}, {hi})", file=sys.stderr)
                    failed = True
        del table
        alone = {name: flight.connect(f"grpc://{server.addr}") for name, (server, _) in servers.items()}
        kept = {name: [flight.connect(f"grpc://{server.addr}") for _ in range(CLIENTS)]
                for name, (server, _) in servers.items()}
        stats = {name: {"schema": [], "stream": [], "crowd": [], "alone_cpu": 0.0, "crowd_cpu": 0.0, "errors": 0}
                 for name in servers}
        for name, (server, ticket) in servers.items():  # warm-up: connections, plans
            for c in range(CLIENTS):
                alone[name].do_get(ticket(c)).read_all()
            level(server.addr, CLIENTS, 1, ticket, kept[name])
        for round_ in range(a.rounds):
            for name in rotate(list(servers), round_):
                server, ticket = servers[name]
                s = stats[name]
                before = cpu_seconds(server.proc.pid)
                schema, stream = [], []
                for c in range(CLIENTS):
                    started = time.perf_counter()
                    reader = alone[name].do_get(ticket(c))
                    schema.append(time.perf_counter() - started)
                    reader.read_all()
                    stream.append(time.perf_counter() - started)
                s["alone_cpu"] += cpu_seconds(server.proc.pid) - before
                s["schema"].append(statistics.median(schema))
                s["stream"].append(statistics.median(stream))
                before = cpu_seconds(server.proc.pid)
                r = level(server.addr, CLIENTS, 1, ticket, kept[name])
                s["crowd_cpu"] += cpu_seconds(server.proc.pid) - before
                s["crowd"].append(r["mean"])
                s["errors"] += len(r["errors"])
                failed |= bool(r["errors"])
        base = stats["pyarrow C++ server (from memory, slices)"]
        streams = CLIENTS * a.rounds
        print(f"\n{a.rounds} rounds of {CLIENTS} ranges of ~{rows} rows on kept connections; medians over rounds:\n")
        print("| server | alone: to schema ms | alone: stream ms | vs pyarrow | alone: CPU ms per stream | CPU vs pyarrow"
              " | 100 clients staggered: mean ms | vs pyarrow | CPU ms per stream | CPU vs pyarrow | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, s in stats.items():
            med = {k: statistics.median(s[k]) for k in ("schema", "stream", "crowd")}
            bmed = {k: statistics.median(base[k]) for k in ("stream", "crowd")}
            print(f"| {name} | {med['schema'] * 1e3:.3f} | {med['stream'] * 1e3:.3f} | {ratio(med['stream'], bmed['stream'])}"
                  f" | {s['alone_cpu'] / streams * 1e3:.3f} | {ratio(s['alone_cpu'], base['alone_cpu'])}"
                  f" | {med['crowd'] * 1e3:.2f} | {ratio(med['crowd'], bmed['crowd'])}"
                  f" | {s['crowd_cpu'] / streams * 1e3:.3f} | {ratio(s['crowd_cpu'], base['crowd_cpu'])} | {s['errors']} |")
    finally:
        for conn in alone.values():
            conn.close()
        for conns in kept.values():
            for conn in conns:
                conn.close()
        for q in quivers:
            q.close()
        arrow.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
