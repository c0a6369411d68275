"""TPC-H through Quiver over Arrow Flight vs DuckDB and DataFusion in-process, on the same files.

    .venv/bin/python benches/tpch.py --quiver target/release/quiver            # SF1, 5 runs
    .venv/bin/python benches/tpch.py --quiver target/release/quiver --smoke    # SF0.01, 1 run

Data: generated once by tpchgen-cli (the Rust TPC-H generator, from PyPI) as one Parquet
file per table into --cache (default ~/.cache/quiver/tpch-sf<scale>); never committed.

Systems, all on the same files and the same number of threads:
- quiver: the real binary, queried with pyarrow.flight (`do_get(Ticket(sql)).read_all()`);
- datafusion: the `datafusion` Python package (DataFusion 55, the same engine) in-process, with
  Quiver's pushdown settings: what Quiver would cost without a network and a server;
- datafusion-defaults: the same package as a new user runs it, `SessionContext()` with its
  default settings (no filter pushdown into the Parquet decoder): the baseline Quiver must
  not be slower than;
- duckdb: DuckDB in-process over read_parquet views.

Every query's result from Quiver and DataFusion is checked against DuckDB's (row count, values
with a relative tolerance of 1e-6 for numbers). Each query runs once per system to warm up, then
--runs rounds, the system order rotating each round; the report is per-query medians, the
ratios quiver/datafusion and quiver/duckdb, and their geometric means. Exits 1 if any result
differs.
"""

import argparse
import datetime as dt
import decimal
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Quiver, common_args, generate_tpch, geomean, rotate, tpch_tables  # noqa: E402
from tpch_queries import QUERIES, TABLES  # noqa: E402


class DuckDB:
    def __init__(self, data: Path, threads: int):
        self.con = duckdb.connect()
        self.con.execute(f"SET threads = {threads}")
        for t in TABLES:
            self.con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{data / (t + '.parquet')}')")

    def run(self, sql: str) -> pa.Table:
        return self.con.execute(sql).to_arrow_table()

    def close(self):
        self.con.close()


class DataFusion:
    # Quiver's defaults (crates/quiver/src/query/mod.rs, session_config).
    SETTINGS = {
        "datafusion.execution.parquet.pushdown_filters": "true",
        "datafusion.execution.parquet.reorder_filters": "true",
        "datafusion.execution.parquet.enable_page_index": "true",
        "datafusion.execution.parquet.bloom_filter_on_read": "true",
        "datafusion.execution.parquet.pruning": "true",
        "datafusion.execution.collect_statistics": "true",
    }

    def __init__(self, data: Path, threads: int, defaults: bool = False):
        from datafusion import SessionConfig, SessionContext

        if defaults:
            # As a new user runs it (its default target partitions are the CPU count).
            self.ctx = SessionContext()
        else:
            config = SessionConfig().with_target_partitions(threads)
            for key, value in self.SETTINGS.items():
                config = config.set(key, value)
            self.ctx = SessionContext(config)
        for t in TABLES:
            self.ctx.register_parquet(t, str(data / (t + ".parquet")))

    def run(self, sql: str) -> pa.Table:
        return self.ctx.sql(sql).to_arrow_table()

    def close(self):
        pass


def normalize(value):
    if isinstance(value, (decimal.Decimal, float)):
        return float(value)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return value


def rows(table: pa.Table) -> list:
    out = [tuple(normalize(v) for v in row.values()) for row in table.to_pylist()]
    # Sorted with numbers rounded, so ties in ORDER BY and float noise do not matter.
    return sorted(out, key=lambda r: tuple((0, round(v, 2)) if isinstance(v, float) else (1, str(v)) for v in r))


def same(expected: pa.Table, got: pa.Table) -> str | None:
    """None if `got` matches `expected`, else what differs."""
    if expected.num_rows != got.num_rows or expected.num_columns != got.num_columns:
        return f"shape {got.num_rows}x{got.num_columns}, expected {expected.num_rows}x{expected.num_columns}"
    for a, b in zip(rows(expected), rows(got)):
        for x, y in zip(a, b):
            if isinstance(x, float) or isinstance(y, float):
                if x is None or y is None or not math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-6):
                    return f"value {y!r}, expected {x!r} (row {b})"
            elif x != y:
                return f"value {y!r}, expected {x!r} (row {b})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, "SF0.01, one run: checks the harness and the results")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--queries", default="", help="comma-separated query numbers (default: all 22)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=ARG[,ARG]",
        help="another Quiver server run side by side, e.g. --variant=pushdown-all=--filter-pushdown=all",
    )
    parser.add_argument(
        "--quiver-arg", action="append", default=[],
        help="an extra `quiver serve` argument (repeatable), e.g. --quiver-arg=--datafusion-config=KEY=VALUE",
    )
    args = parser.parse_args()
    if args.smoke:
        args.scale, args.runs = 0.01, 1
    numbers = [int(q) for q in args.queries.split(",") if q] or sorted(QUERIES)

    args.cache.mkdir(parents=True, exist_ok=True)
    data = generate_tpch(args.scale, args.cache)
    workdir = Path(tempfile.mkdtemp(prefix="quiver-tpch-"))
    systems = {
        "quiver": Quiver(args.quiver, workdir, tpch_tables(data) + args.quiver_arg, args.threads),
        "datafusion": DataFusion(data, args.threads),
        "datafusion-defaults": DataFusion(data, args.threads, defaults=True),
        "duckdb": DuckDB(data, args.threads),
    }
    variants = dict(v.split("=", 1) for v in args.variant)
    for name, extra in variants.items():
        (workdir / name).mkdir()
        systems[name] = Quiver(args.quiver, workdir / name, tpch_tables(data) + extra.split(","), args.threads)
    names = list(systems)
    times = {q: {name: [] for name in names} for q in numbers}
    failures = []
    try:
        for q in numbers:
            sql = QUERIES[q]
            # Warm-up, and the correctness check against DuckDB.
            results = {name: system.run(sql) for name, system in systems.items()}
            for name in ("quiver", "datafusion", "datafusion-defaults", *variants):
                problem = same(results["duckdb"], results[name])
                if problem:
                    failures.append(f"Q{q} {name}: {problem}")
            for run in range(args.runs):
                order = rotate(names, run)
                for name in order:
                    started = time.perf_counter()
                    systems[name].run(sql)
                    times[q][name].append(time.perf_counter() - started)
    finally:
        for system in systems.values():
            system.close()

    medians = {q: {n: statistics.median(ts) for n, ts in per.items()} for q, per in times.items()}
    print(f"TPC-H SF{args.scale:g}, {args.threads} threads, {args.runs} runs, medians in ms\n")
    print("| query | quiver | datafusion (our settings) | datafusion (defaults) | duckdb"
          " | quiver / datafusion | quiver / datafusion defaults | quiver / duckdb |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios_df, ratios_dfd, ratios_duck = [], [], []
    for q in numbers:
        m = medians[q]
        ratios_df.append(m["quiver"] / m["datafusion"])
        ratios_dfd.append(m["quiver"] / m["datafusion-defaults"])
        ratios_duck.append(m["quiver"] / m["duckdb"])
        print(f"| Q{q} | {m['quiver'] * 1e3:.1f} | {m['datafusion'] * 1e3:.1f} | {m['datafusion-defaults'] * 1e3:.1f}"
              f" | {m['duckdb'] * 1e3:.1f} | {ratios_df[-1]:.2f}x | {ratios_dfd[-1]:.2f}x | {ratios_duck[-1]:.2f}x |")
    print(f"| **geomean** | | | | | **{geomean(ratios_df):.2f}x** | **{geomean(ratios_dfd):.2f}x**"
          f" | **{geomean(ratios_duck):.2f}x** |")
    if variants:
        print("\nVariants, run side by side (ratios to DataFusion with its defaults):\n")
        print("| query | quiver | " + " | ".join(variants) + " | quiver / best | "
              + " | ".join(f"{v} / datafusion defaults" for v in variants) + " |")
        print("|---|" + "---:|" * (2 + 2 * len(variants)))
        by_variant = {v: [] for v in variants}
        worst = []
        for q in numbers:
            m = medians[q]
            best = min(m[n] for n in ("quiver", *variants))
            worst.append(m["quiver"] / best)
            for v in variants:
                by_variant[v].append(m[v] / m["datafusion-defaults"])
            print(f"| Q{q} | {m['quiver'] * 1e3:.1f} | " + " | ".join(f"{m[v] * 1e3:.1f}" for v in variants)
                  + f" | {worst[-1]:.2f}x | " + " | ".join(f"{by_variant[v][-1]:.2f}x" for v in variants) + " |")
        print(f"| **geomean** | | {' | ' * len(variants)}**{geomean(worst):.2f}x** | "
              + " | ".join(f"**{geomean(r):.2f}x**" for r in by_variant.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"scale": args.scale, "threads": args.threads, "runs": args.runs,
                                         "medians_seconds": medians, "failures": failures}, indent=2))
    for failure in failures:
        print(f"MISMATCH {failure}", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
