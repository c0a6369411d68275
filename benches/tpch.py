"""TPC-H through Quiver over Arrow Flight vs DuckDB and DataFusion in-process, on the same files.

    .venv/bin/python benches/tpch.py --quiver target/release/quiver            # SF1, 5 runs
    .venv/bin/python benches/tpch.py --quiver target/release/quiver --smoke    # SF0.01, 1 run
    .venv/bin/python benches/tpch.py --quiver target/release/quiver --dataset events

Data: generated once by tpchgen-cli (the Rust TPC-H generator, from PyPI) as one Parquet
file per table into --cache (default ~/.cache/quiver/tpch-sf<scale>); never committed.
`--dataset events` runs the same comparison on a second dataset of another shape (one wide
table sorted on its keys, long strings, low and high selectivity; benches/events_dataset.py).

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
import events_dataset  # noqa: E402
import tpch_queries  # noqa: E402
from harness import Quiver, common_args, generate_tpch, geomean, rotate, table_args  # noqa: E402


class DuckDB:
    def __init__(self, data: Path, threads: int, tables: list[str] = tpch_queries.TABLES):
        self.con = duckdb.connect()
        self.con.execute(f"SET threads = {threads}")
        for t in tables:
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

    def __init__(self, data: Path, threads: int, defaults: bool = False, tables: list[str] = tpch_queries.TABLES):
        from datafusion import SessionConfig, SessionContext

        if defaults:
            # As a new user runs it (its default target partitions are the CPU count).
            self.ctx = SessionContext()
        else:
            config = SessionConfig().with_target_partitions(threads)
            for key, value in self.SETTINGS.items():
                config = config.set(key, value)
            self.ctx = SessionContext(config)
        for t in tables:
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
    parser.add_argument("--dataset", choices=["tpch", "events"], default="tpch")
    parser.add_argument("--scale", type=float, default=1.0, help="TPC-H scale factor")
    parser.add_argument("--rows", type=int, default=4_000_000, help="rows of the events dataset")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--queries", default="", help="comma-separated query numbers (default: all)")
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
        args.scale, args.rows, args.runs = 0.01, 100_000, 1

    args.cache.mkdir(parents=True, exist_ok=True)
    if args.dataset == "tpch":
        data, tables, queries = generate_tpch(args.scale, args.cache), tpch_queries.TABLES, tpch_queries.QUERIES
        title = f"TPC-H SF{args.scale:g}"
    else:
        data = events_dataset.generate_events(args.rows, args.cache)
        tables, queries = events_dataset.TABLES, events_dataset.QUERIES
        title = f"events ({args.rows} rows)"
    numbers = [int(q) for q in args.queries.split(",") if q] or sorted(queries)
    workdir = Path(tempfile.mkdtemp(prefix="quiver-tpch-"))
    systems = {
        "quiver": Quiver(args.quiver, workdir, table_args(data, tables) + args.quiver_arg, args.threads),
        "datafusion": DataFusion(data, args.threads, tables=tables),
        "datafusion-defaults": DataFusion(data, args.threads, defaults=True, tables=tables),
        "duckdb": DuckDB(data, args.threads, tables=tables),
    }
    variants = dict(v.split("=", 1) for v in args.variant)
    for name, extra in variants.items():
        (workdir / name).mkdir()
        systems[name] = Quiver(args.quiver, workdir / name, table_args(data, tables) + extra.split(","), args.threads)
    names = list(systems)
    times = {q: {name: [] for name in names} for q in numbers}
    failures = []
    try:
        for q in numbers:
            sql = queries[q]
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
    print(f"{title}, {args.threads} threads, {args.runs} runs, medians in ms\n")
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
        args.json.write_text(json.dumps({"dataset": title, "threads": args.threads, "runs": args.runs,
                                         "medians_seconds": medians, "failures": failures}, indent=2))
    for failure in failures:
        print(f"MISMATCH {failure}", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
