"""TPC-H served from S3 (moto) with a cold cache and a warm cache, and from local files.

    .venv/bin/python benches/s3.py --quiver target/release/quiver            # SF1, 3 runs
    .venv/bin/python benches/s3.py --quiver target/release/quiver --smoke    # SF0.01, 1 run

The same Parquet files (tpchgen-cli, one per table) are served three ways by the same binary,
side by side in one run, with default settings:
- local: `--table t=/path/t.parquet` (memory-mapped local files);
- s3-warm: `--table t=s3://tpch/t.parquet` from moto's S3 server (tests/s3_server.py, in this
  process), after one warm-up run of every query (the cache then holds what queries read);
- s3-cold: the same, each timed run on a server started afresh with an empty cache directory
  (start-up lists the tables and reads their footers; the timed query fetches its data).

moto is a Python server on loopback: it has no network latency but is far slower per byte than
S3 or MinIO, so the cold column shows an upper bound of what a store costs, not S3's speed.
Requests and bytes per query are counted at the store (GETs of objects and their body bytes).
Every result is checked against DuckDB reading the local files. Reports medians and the
geometric means of s3-warm/local and s3-cold/local.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import Quiver, common_args, generate_tpch, geomean, tpch_tables  # noqa: E402
from s3_server import S3Server  # noqa: E402
from tpch import DuckDB, same  # noqa: E402
from tpch_queries import QUERIES, TABLES  # noqa: E402

BUCKET = "tpch"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, "SF0.01, one run: checks the harness and the results")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of local and s3-warm")
    parser.add_argument(
        "--cold-runs", type=int, default=1,
        help="timed runs of s3-cold (each on a fresh server and cache; moto reads a whole object per GET)",
    )
    parser.add_argument("--queries", default="", help="comma-separated query numbers (default: all 22)")
    args = parser.parse_args()
    if args.smoke:
        args.scale, args.runs, args.cold_runs = 0.01, 1, 1
    numbers = [int(q) for q in args.queries.split(",") if q] or sorted(QUERIES)

    data = generate_tpch(args.scale, args.cache)
    workdir = Path(tempfile.mkdtemp(prefix="quiver-s3-bench-"))
    store = S3Server()
    store.start()
    store.client.create_bucket(Bucket=BUCKET)
    for t in TABLES:
        store.client.upload_file(str(data / f"{t}.parquet"), BUCKET, f"{t}.parquet")
    s3_tables = [arg for t in TABLES for arg in ("--table", f"{t}=s3://{BUCKET}/{t}.parquet")]
    env = store.aws_env()

    duck = DuckDB(data, os.cpu_count())
    local = Quiver(args.quiver, workdir / "local", tpch_tables(data))
    warm = Quiver(args.quiver, workdir / "warm", [*s3_tables, "--cache-dir", str(workdir / "warm-cache")], env=env)
    times = {q: {"local": [], "s3-warm": [], "s3-cold": []} for q in numbers}
    traffic, warm_gets = {}, {}
    failures = []
    try:
        for q in numbers:
            sql = QUERIES[q]
            expected = duck.run(sql)
            for name, system in (("local", local), ("s3-warm", warm)):
                problem = same(expected, system.run(sql))
                if problem:
                    failures.append(f"Q{q} {name}: {problem}")
            mark = store.mark()
            for run in range(args.runs):
                # Alternate which goes first, so drift hits both alike.
                pair = [("local", local), ("s3-warm", warm)]
                for name, system in pair if run % 2 == 0 else pair[::-1]:
                    started = time.perf_counter()
                    system.run(sql)
                    times[q][name].append(time.perf_counter() - started)
            warm_gets[q] = len(store.object_gets(mark))
            for run in range(args.cold_runs):
                cache = workdir / f"cold-cache-{q}-{run}"
                cold = Quiver(args.quiver, workdir / f"cold-{q}-{run}", [*s3_tables, "--cache-dir", str(cache)], env=env)
                try:
                    mark = store.mark()
                    started = time.perf_counter()
                    got = cold.run(sql)
                    times[q]["s3-cold"].append(time.perf_counter() - started)
                    gets = store.object_gets(mark)
                    traffic[q] = (len(gets), sum(g[3] for g in gets))
                    if run == 0:
                        problem = same(expected, got)
                        if problem:
                            failures.append(f"Q{q} s3-cold: {problem}")
                finally:
                    cold.close()
                    shutil.rmtree(cache, ignore_errors=True)
    finally:
        local.close()
        warm.close()
        store.stop()

    medians = {q: {n: statistics.median(ts) for n, ts in per.items()} for q, per in times.items()}
    table_bytes = sum((data / f"{t}.parquet").stat().st_size for t in TABLES)
    print(f"TPC-H SF{args.scale:g} ({table_bytes / 1e6:.0f} MB of Parquet), {args.runs} runs "
          f"({args.cold_runs} cold), medians in ms; "
          "GETs and MB fetched by a cold query, counted at the store\n")
    print("| query | local | s3-warm | s3-cold | warm / local | cold / local | cold GETs | cold MB | warm GETs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    warm_ratios, cold_ratios = [], []
    for q in numbers:
        m = medians[q]
        warm_ratios.append(m["s3-warm"] / m["local"])
        cold_ratios.append(m["s3-cold"] / m["local"])
        gets, fetched = traffic[q]
        print(f"| Q{q} | {m['local'] * 1e3:.1f} | {m['s3-warm'] * 1e3:.1f} | {m['s3-cold'] * 1e3:.1f} "
              f"| {warm_ratios[-1]:.2f}x | {cold_ratios[-1]:.2f}x | {gets} | {fetched / 1e6:.1f} | {warm_gets[q]} |")
    print(f"| **geomean** | | | | **{geomean(warm_ratios):.2f}x** | **{geomean(cold_ratios):.2f}x** | | | |")
    for failure in failures:
        print(f"MISMATCH {failure}", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
