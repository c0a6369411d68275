"""Fixtures: a Hive-partitioned dataset written by pyarrow, and the real `quiver` binary serving it.

The dataset is written here, by pyarrow, not by Quiver: the oracle (DuckDB over
pyarrow.dataset) and the server read the very same files.
"""

import datetime as dt
import decimal
import os
import random
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quiver_process import REPO, QuiverProcess, quiver_binary  # noqa: E402,F401

DAYS = [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(4)]
SERVICES = ["api", "auth", "web"]

REQUESTS_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
        ("method", pa.string()),
        ("path", pa.string()),
        ("status", pa.int32()),
        ("latency_ms", pa.float64()),
        ("cost_usd", pa.decimal128(12, 4)),
        ("region", pa.string()),
        ("user_id", pa.int64()),
        ("error", pa.string()),
    ]
)
# Later partitions add a column: the table's schema evolves.
EVOLVED_SCHEMA = REQUESTS_SCHEMA.append(pa.field("retries", pa.int32()))
PARTITION_SCHEMA = pa.schema([("day", pa.date32()), ("service", pa.string())])


def write_atomically(table: pa.Table, path: Path, **kwargs) -> None:
    """Publish a Parquet file the way the server expects writers to: write, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, path)


def make_requests(rng: random.Random, day: dt.date, service: str, n: int, evolved: bool) -> pa.Table:
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
    rows = {
        "ts": [start + dt.timedelta(seconds=rng.randrange(86_400), microseconds=rng.randrange(10**6)) for _ in range(n)],
        "request_id": [f"{day}-{service}-{i:05d}" for i in range(n)],
        "method": [rng.choice(["GET", "GET", "GET", "POST", "PUT", "DELETE"]) for _ in range(n)],
        "path": [f"/v1/{rng.choice(['users', 'orders', 'items'])}/{rng.randrange(1000)}" for _ in range(n)],
        "status": [rng.choice([200, 200, 200, 201, 404, 429, 500, 503]) for _ in range(n)],
        "latency_ms": [round(rng.uniform(0.5, 900.0), 3) for _ in range(n)],
        "cost_usd": [decimal.Decimal(rng.randrange(0, 10**6)) / 10**4 for _ in range(n)],
        "region": [rng.choice(["us-east-1", "eu-west-1", "ap-south-1"]) for _ in range(n)],
        "user_id": [None if rng.random() < 0.15 else rng.randrange(1, 5000) for _ in range(n)],
        "error": [None] * n,
    }
    rows["error"] = [
        {500: "internal: upstream failed", 503: "unavailable", 429: "rate limited"}.get(s) for s in rows["status"]
    ]
    schema = REQUESTS_SCHEMA
    if evolved:
        rows["retries"] = [rng.randrange(0, 4) if rng.random() < 0.8 else None for _ in range(n)]
        schema = EVOLVED_SCHEMA
    return pa.Table.from_pydict(rows, schema=schema)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(42)
    for di, day in enumerate(DAYS):
        for service in SERVICES:
            n = rng.randrange(2_000, 6_000)
            evolved = di >= 2
            table = make_requests(rng, day, service, n, evolved)
            write_atomically(
                table,
                root / "requests" / f"day={day}" / f"service={service}" / "part-0.parquet",
                row_group_size=1024,
                write_page_index=True,
            )
    # A NULL partition, as Hive/Spark write it.
    table = make_requests(rng, DAYS[0], "web", 300, False)
    write_atomically(table, root / "requests" / "day=__HIVE_DEFAULT_PARTITION__" / "service=web" / "part-0.parquet")
    services = pa.table(
        {
            "service": ["api", "auth", "web", "billing"],
            "team": ["platform", "identity", "frontend", "payments"],
            "tier": ["critical", "critical", "high", "high"],
        }
    )
    write_atomically(services, root / "services" / "services.parquet")
    return root


def requests_dataset(root: Path) -> ds.Dataset:
    """The oracle's view of `requests`: pyarrow.dataset with Hive partitioning (NULL fallback
    `__HIVE_DEFAULT_PARTITION__`) over the unified schema of all files."""
    partitioning = ds.HivePartitioning(PARTITION_SCHEMA, null_fallback="__HIVE_DEFAULT_PARTITION__")
    schema = pa.unify_schemas([EVOLVED_SCHEMA, PARTITION_SCHEMA])
    return ds.dataset(root / "requests", format="parquet", partitioning=partitioning, schema=schema)


class Server(QuiverProcess):
    """The real binary, started by the shared launcher (tests/quiver_process.py)."""

    def __init__(self, args, tmp: Path, connect: bool = True, env: dict | None = None):
        super().__init__(args, tmp, connect=connect, start_timeout=60, env=env)

    def metrics(self) -> "Metrics":
        return Metrics(self.scrape_text())


class Metrics:
    """One scrape, parsed by prometheus_client's parser (not ours): sample values by name
    and labels."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, f"no sample {name}{labels} in the scrape"
        return self.samples[key]

    def names(self) -> set:
        return {name for name, _ in self.samples}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, as the kernel reports it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """Polls `predicate` until it returns a truthy value, which it returns."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def server(dataset, tmp_path_factory):
    s = Server(["--data-dir", str(dataset), "--refresh-interval", "1s"], tmp_path_factory.mktemp("server"))
    yield s
    s.stop()
    assert s.proc.returncode == 0, "graceful shutdown should exit 0"
