"""Selective queries on the Hive-partitioned demo dataset at growing sizes (1x, 4x, 16x the
partitions, the matching data the same): with partition pruning, latency stays flat and the
bytes read do not grow.

    .venv/bin/python benches/pruning.py --quiver target/release/quiver            # 3M rows/7 days base
    .venv/bin/python benches/pruning.py --quiver target/release/quiver --smoke    # 100k rows base

The base is `quiver demo` (7 days x 5 services). Larger sizes add days: day k's files are hard
links to the base day k mod 7, so the bytes are identical and only the partition count grows.
Each size is served by its own Quiver; the queries touch one day (and one service) whatever
the size. Reported: medians, the ratio to 1x, files scanned and bytes read per query (from
Quiver's scan metrics).
"""

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Quiver, common_args, rotate  # noqa: E402

QUERIES = {
    "one partition, filtered": "SELECT COUNT(*) AS n, AVG(latency_ms) AS mean FROM requests "
    "WHERE day = DATE '2026-01-03' AND service = 'api' AND status >= 500",
    "one day, grouped": "SELECT service, COUNT(*) AS n, SUM(cost_usd) AS cost FROM requests "
    "WHERE day = DATE '2026-01-05' GROUP BY service",
}
BASE_DAYS = 7
START = dt.date(2026, 1, 1)


def scaled(base: Path, factor: int, root: Path) -> Path:
    """A copy of the demo's `requests` with `factor` x the days, as hard links."""
    out = root / f"x{factor}"
    for k in range(BASE_DAYS * factor):
        source = base / "requests" / f"day={START + dt.timedelta(days=k % BASE_DAYS)}"
        target = out / "requests" / f"day={START + dt.timedelta(days=k)}"
        for file in source.rglob("*.parquet"):
            dest = target / file.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(file, dest)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, "100k rows, 1x and 4x, 2 runs")
    p.add_argument("--rows", type=int, default=3_000_000, help="rows of the 1x dataset")
    p.add_argument("--factors", default="1,4,16")
    p.add_argument("--runs", type=int, default=9)
    a = p.parse_args()
    if a.smoke:
        a.rows, a.factors, a.runs = 100_000, "1,4", 2
    factors = [int(f) for f in a.factors.split(",")]

    base = a.cache / f"pruning-base-{a.rows}"
    if not (base / ".complete").exists():
        subprocess.run([a.quiver, "demo", "--out", str(base), "--rows", str(a.rows)], check=True, stdout=subprocess.DEVNULL)
        (base / ".complete").write_text("")
    work = Path(tempfile.mkdtemp(prefix="quiver-pruning-", dir=a.cache))
    servers = {f: Quiver(a.quiver, work / f"server-{f}", ["--table", f"requests={scaled(base, f, work) / 'requests'}"]) for f in factors}
    times = {(f, q): [] for f in factors for q in QUERIES}
    scanned = {}
    try:
        for name, sql in QUERIES.items():
            expected = None
            for f, server in servers.items():
                result = server.run(sql)
                result = result.sort_by([(result.column_names[0], "ascending")])
                if expected is None:
                    expected = result
                elif not result.equals(expected):
                    print(f"{name}: {f}x returned different rows", file=sys.stderr)
                    return 1
                before = (server.metric("quiver_scan_bytes_total"), server.metric("quiver_scan_files_scanned_total"))
                server.run(sql)
                scanned[(f, name)] = (
                    server.metric("quiver_scan_bytes_total") - before[0],
                    server.metric("quiver_scan_files_scanned_total") - before[1],
                )
        for run in range(a.runs):
            for f in rotate(factors, run):
                for name, sql in QUERIES.items():
                    started = time.perf_counter()
                    servers[f].run(sql)
                    times[(f, name)].append(time.perf_counter() - started)
    finally:
        for server in servers.values():
            server.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"demo dataset, {a.rows} rows per 1x ({BASE_DAYS} days x 5 services), medians of {a.runs}\n")
    print("| query | size | partitions | median ms | vs 1x | files scanned | bytes read |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in QUERIES:
        one = statistics.median(times[(factors[0], name)])
        for f in factors:
            m = statistics.median(times[(f, name)])
            bytes_read, files = scanned[(f, name)]
            print(f"| {name} | {f}x | {BASE_DAYS * f * 5} | {m * 1e3:.1f} | {m / one:.2f}x | {files:.0f} | {bytes_read / 1e3:.0f} kB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
