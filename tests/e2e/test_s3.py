"""Tables on S3: the real S3 protocol, served by moto's S3 server in this process.

Every table is written locally by pyarrow, uploaded with boto3, and the oracle (DuckDB or
pyarrow.dataset) reads the local copy. The S3 server counts what it serves (requests,
ranges, body bytes) in a WSGI layer around moto's own application: pushdown and the
cache are proven by what the store saw, not by Quiver's own counters.
"""

import datetime as dt
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pytest
from moto import settings as moto_settings
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID
from s3_server import S3Server

from conftest import Server, requests_dataset, wait_for, write_atomically
from test_io import ROW_GROUPS, ROWS_PER_GROUP, events_table, wait_for_summaries

BUCKET = "lake"
DAYS = [dt.date(2026, 3, 1) + dt.timedelta(days=i) for i in range(10)]
REGIONS = ["us", "eu", "ap", "sa"]


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.start()
    server.client.create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def aws_env(s3: S3Server, **overrides) -> dict:
    return {**s3.aws_env(), **overrides}


def serve(args: list[str], tmp: Path, env: dict) -> Server:
    """A server with its own object cache directory (never the user's ~/.cache)."""
    if "--cache-dir" not in args:
        args = [*args, "--cache-dir", str(tmp / "cache")]
    return Server(args, tmp, env=env)


def upload(s3: S3Server, root: Path, prefix: str) -> int:
    """Uploads every file under `root` to s3://lake/prefix/...; returns the bytes uploaded."""
    total = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root)}")
            total += path.stat().st_size
    return total


@pytest.fixture(scope="module")
def events(s3, tmp_path_factory) -> Path:
    """40 partitions (10 days x 4 regions), one file each, 20 row groups per file: local
    copy returned, uploaded to s3://lake/events/."""
    root = tmp_path_factory.mktemp("s3events") / "events"
    rng = random.Random(5)
    seq = 0
    for day in DAYS:
        for region in REGIONS:
            table = events_table(rng, seq)
            seq += table.num_rows
            write_atomically(
                table,
                root / f"day={day}" / f"region={region}" / "part-0.parquet",
                row_group_size=ROWS_PER_GROUP,
                write_page_index=True,
            )
    upload(s3, root, "events")
    return root


@pytest.fixture(scope="module")
def requests_on_s3(s3, dataset) -> Path:
    """The shared `requests` dataset (Hive partitions, a NULL partition, schema evolution)
    uploaded to s3://lake/requests/, plus a marker and a staging file that are not data."""
    upload(s3, dataset / "requests", "requests")
    s3.client.put_object(Bucket=BUCKET, Key="requests/_SUCCESS", Body=b"")
    s3.client.put_object(Bucket=BUCKET, Key="requests/day=2026-01-01/service=api/part-9.parquet.tmp", Body=b"junk")
    upload(s3, dataset / "services", "dims/services")
    return dataset


def approx_rows(rows: list[dict]) -> list[tuple]:
    """Rows as tuples whose floats compare with a relative tolerance: engines sum floats in different orders."""
    return [tuple(pytest.approx(v, rel=1e-9) if isinstance(v, float) else v for v in row.values()) for row in rows]


def test_s3_tables_answer_like_the_local_copy(s3, requests_on_s3, tmp_path):
    local = requests_dataset(requests_on_s3)
    server = serve(
        ["--table", f"requests=s3://{BUCKET}/requests/", "--table", f"services=s3://{BUCKET}/dims/services/"],
        tmp_path,
        env=aws_env(s3),
    )
    try:
        con = duckdb.connect()
        con.register("requests", local)
        con.register("services", ds.dataset(requests_on_s3 / "services", format="parquet"))
        for sql in [
            "SELECT count(*) AS n FROM requests",
            "SELECT service, day, count(*) AS n, sum(latency_ms) AS l FROM requests GROUP BY service, day ORDER BY service, day NULLS FIRST",
            "SELECT count(*) AS n FROM requests WHERE day IS NULL",
            "SELECT sum(retries) AS r, count(retries) AS c FROM requests",
            "SELECT r.service, s.team, count(*) AS n FROM requests r JOIN services s ON r.service = s.service "
            "WHERE r.status >= 500 GROUP BY r.service, s.team ORDER BY r.service",
            "SELECT request_id, status FROM requests WHERE day = DATE '2026-01-03' AND service = 'auth' "
            "AND status = 404 ORDER BY request_id",
        ]:
            got = server.query(sql)
            expected = con.sql(sql).to_arrow_table()
            assert [tuple(r.values()) for r in got.to_pylist()] == approx_rows(expected.to_pylist()), sql
        # Typed partition columns, as for local tables.
        schema = server.query("SELECT day, service FROM requests LIMIT 1").schema
        assert schema.field("day").type == pa.date32() and schema.field("service").type == pa.string()
    finally:
        server.stop()


def test_selective_query_fetches_under_one_percent_and_footers_once(s3, events, tmp_path):
    table_bytes = sum(f.stat().st_size for f in events.rglob("*.parquet"))
    day, region = DAYS[6], "eu"
    oracle = ds.dataset(events, format="parquet", partitioning="hive")
    in_partition = oracle.to_table(filter=(pc.field("day") == str(day)) & (pc.field("region") == region), columns=["seq"])
    lo = pc.min(in_partition["seq"]).as_py() + 11 * ROWS_PER_GROUP + 10
    hi = lo + 40
    sql = (
        f"SELECT seq, value, name FROM events WHERE day = DATE '{day}' AND region = '{region}' "
        f"AND seq BETWEEN {lo} AND {hi} ORDER BY seq"
    )
    expected = oracle.to_table(
        filter=(pc.field("day") == str(day)) & (pc.field("region") == region) & (pc.field("seq") >= lo) & (pc.field("seq") <= hi),
        columns=["seq", "value", "name"],
    ).sort_by("seq")

    # Blocks of 32 KiB: these files are ~450 KiB, so a 1 MiB block (the default, meant for
    # files of many MiB) would be the whole file.
    server = serve(
        [
            "--table", f"events=s3://{BUCKET}/events/", "--cache-dir", str(tmp_path / "cache"),
            "--cache-block-size", "32KiB", "--log-filter", "quiver=debug,info",
        ],
        tmp_path,
        env=aws_env(s3),
    )
    try:
        started = s3.mark()
        assert server.query(sql).equals(expected)
        first = s3.object_gets(started)
        fetched = sum(e[3] for e in first)
        assert 0 < fetched < 0.01 * table_bytes, (fetched, table_bytes, first)
        # Partition pruning alone would fetch a 40th of the table: 2.5%.
        assert len(first) <= 3, first

        # A second selective query in another partition: data only, no footer again
        # (footers and page indexes were read when the table was listed).
        other = sql.replace(f"DATE '{day}'", f"DATE '{DAYS[2]}'")
        started = s3.mark()
        server.query(other)
        sizes = {f"/{BUCKET}/events/{f.relative_to(events)}": f.stat().st_size for f in events.rglob("*.parquet")}
        for _, path, rng, _ in s3.object_gets(started):
            end = int(rng.split("-")[1]) if rng else None
            assert end is not None and end < sizes[path] - 8, f"footer fetched again: {path} {rng}"

        # The same query again: served from the cache, no GET at all.
        started = s3.mark()
        assert server.query(sql).equals(expected)
        assert s3.object_gets(started) == []
        # The scan summaries tell bytes from the store apart from bytes from the cache.
        summaries = wait_for_summaries(server, 3)
        assert 0 < summaries[0]["bytes_from_store"] <= fetched, (summaries[0], fetched)
        assert summaries[2]["bytes_from_store"] == 0 and summaries[2]["bytes_from_cache"] > 0, summaries[2]
        m = server.metrics()
        assert m.get("quiver_cache_hits_total") > 0
        assert m.get("quiver_object_store_requests_total", op="get", outcome="ok") > 0
        assert m.get("quiver_object_store_bytes_total") > 0
    finally:
        server.stop()


def put_table(s3: S3Server, key: str, table: pa.Table, tmp: Path) -> None:
    path = tmp / f"upload-{random.randrange(10**9)}.parquet"
    write_atomically(table, path, row_group_size=250)
    s3.client.upload_file(str(path), BUCKET, key)


def count_and_sum(server: Server, table: str = "t") -> tuple[int, int]:
    t = server.query(f"SELECT count(*) AS n, sum(k) AS s FROM {table}")
    return t["n"][0].as_py(), t["s"][0].as_py()


def refresh(server: Server) -> None:
    list(server.client.do_action(flight.Action("refresh", b"")))


def numbers(lo: int, hi: int) -> pa.Table:
    return pa.table({"k": pa.array(range(lo, hi), pa.int64()), "v": pa.array([float(i) for i in range(lo, hi)])})


def test_refresh_replaced_and_deleted_objects(s3, tmp_path):
    prefix = "changing"
    for i in range(3):
        put_table(s3, f"{prefix}/part={i}/data.parquet", numbers(i * 1000, i * 1000 + 1000), tmp_path)
    # No cache: every read is a GET against the listed version.
    server = serve(
        ["--table", f"t=s3://{BUCKET}/{prefix}/", "--refresh-interval", "0s", "--cache-max-size", "0"],
        tmp_path,
        env=aws_env(s3),
    )
    try:
        assert count_and_sum(server) == (3000, sum(range(3000)))

        # A new partition lands: served after a refresh.
        put_table(s3, f"{prefix}/part=3/data.parquet", numbers(3000, 3500), tmp_path)
        assert count_and_sum(server) == (3000, sum(range(3000)))
        refresh(server)
        assert count_and_sum(server) == (3500, sum(range(3500)))
        assert server.query("SELECT max(part) AS p FROM t")["p"][0].as_py() == 3

        # Replaced in place (a new ETag): the read of the listed version fails with a
        # retryable error naming the object, never old footer over new bytes.
        put_table(s3, f"{prefix}/part=1/data.parquet", numbers(100, 400), tmp_path)
        with pytest.raises(flight.FlightUnavailableError, match=r"s3://lake/changing/part=1/data\.parquet changed since the table was listed"):
            count_and_sum(server)
        refresh(server)
        expected = sum(range(3500)) - sum(range(1000, 2000)) + sum(range(100, 400))
        assert count_and_sum(server) == (2800, expected)

        # Deleted: the same, then gone after a refresh.
        s3.client.delete_object(Bucket=BUCKET, Key=f"{prefix}/part=0/data.parquet")
        with pytest.raises(flight.FlightUnavailableError, match=r"part=0/data\.parquet changed since the table was listed \(it was deleted\)"):
            count_and_sum(server)
        refresh(server)
        assert count_and_sum(server) == (1800, expected - sum(range(1000)))

        # A corrupt object is skipped with a warning naming it; the rest is served.
        s3.client.put_object(Bucket=BUCKET, Key=f"{prefix}/part=9/data.parquet", Body=b"PAR1 not really")
        refresh(server)
        assert count_and_sum(server) == (1800, expected - sum(range(1000)))
        assert re.search(r"skipping file.*s3://lake/changing/part=9/data\.parquet", server.logs())
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_cached_blocks_serve_the_listed_version_until_refresh(s3, tmp_path):
    """With the cache on, bytes already cached are the listed version: a replaced object
    keeps answering consistently with its listing until a refresh serves the new one."""
    key = "versioned/data.parquet"
    put_table(s3, key, numbers(0, 1000), tmp_path)
    server = serve(
        ["--table", f"t=s3://{BUCKET}/versioned/", "--refresh-interval", "0s", "--cache-dir", str(tmp_path / "cache")],
        tmp_path,
        env=aws_env(s3),
    )
    try:
        assert count_and_sum(server) == (1000, sum(range(1000)))
        put_table(s3, key, numbers(0, 10), tmp_path)
        assert count_and_sum(server) == (1000, sum(range(1000)))
        refresh(server)
        assert count_and_sum(server) == (10, sum(range(10)))
    finally:
        server.stop()


def test_store_down_at_start_and_mid_session(s3, tmp_path, dataset):
    """The store stops and comes back on the same port: queries of its tables fail with
    UNAVAILABLE naming it, everything else keeps working, and it recovers by itself."""
    prefix = "outage"
    put_table(s3, f"{prefix}/data.parquet", numbers(0, 2000), tmp_path)
    fast_failure = [
        "--store-max-retries", "1", "--store-retry-timeout", "2s", "--store-request-timeout", "2s",
        "--store-connect-timeout", "1s", "--refresh-interval", "1s", "--cache-max-size", "0",
    ]
    local = ["--table", f"services={dataset / 'services'}"]
    args = ["--table", f"t=s3://{BUCKET}/{prefix}/", *local, *fast_failure]
    server = serve(args, tmp_path / "a", env=aws_env(s3))
    try:
        assert count_and_sum(server) == (2000, sum(range(2000)))
        s3.stop()
        try:
            with pytest.raises(flight.FlightUnavailableError, match=r"object store s3://lake is unavailable"):
                count_and_sum(server)
            assert server.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4
            assert server.query("SELECT 1 AS one")["one"][0].as_py() == 1
        finally:
            s3.start()
        wait_for(lambda: _answers(server), timeout=30, what="the S3 table to answer again")
    finally:
        server.stop()

    # Down when the server starts: it starts anyway, and the table appears once the
    # store answers (at the next refresh).
    s3.stop()
    try:
        server = serve(args, tmp_path / "b", env=aws_env(s3))
        try:
            with pytest.raises(flight.FlightUnavailableError, match=r"table 't' is not available yet: object store s3://lake is unavailable"):
                count_and_sum(server)
            assert server.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4
        finally:
            s3.start()
        wait_for(lambda: _answers(server), timeout=30, what="the S3 table to load")
        assert server.proc.poll() is None
    finally:
        server.stop()


def _answers(server: Server) -> bool:
    try:
        return count_and_sum(server) == (2000, sum(range(2000)))
    except flight.FlightError:
        return False


def test_wrong_credentials_name_the_bucket(s3, tmp_path):
    put_table(s3, "secured/data.parquet", numbers(0, 10), tmp_path)
    # moto checks signatures against its IAM users once authentication is on.
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        server = serve(
            ["--table", f"t=s3://{BUCKET}/secured/", "--store-max-retries", "0"],
            tmp_path,
            env=aws_env(s3, AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG", AWS_SECRET_ACCESS_KEY="not-the-secret"),
        )
        try:
            with pytest.raises(flight.FlightUnavailableError) as e:
                count_and_sum(server)
            message = str(e.value)
            assert "s3://lake refused access" in message and "AWS_ACCESS_KEY_ID" in message, message
            assert "not-the-secret" not in server.logs() and "not-the-secret" not in message
            assert server.query("SELECT 1 AS one")["one"][0].as_py() == 1
        finally:
            server.stop()
    finally:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")


def test_tiny_cache_under_concurrent_queries(s3, events, tmp_path):
    cache_limit = 512 * 1024
    server = serve(
        [
            "--table", f"events=s3://{BUCKET}/events/", "--cache-dir", str(tmp_path / "cache"),
            "--cache-max-size", "512KiB", "--cache-block-size", "64KiB",
        ],
        tmp_path,
        env=aws_env(s3),
    )
    oracle = duckdb.sql(
        f"SELECT region, count(*) AS n, sum(seq) AS s, min(name) AS m FROM read_parquet('{events}/*/*/*.parquet', "
        "hive_partitioning = true) WHERE seq % 5 = 1 GROUP BY region ORDER BY region"
    ).fetchall()
    sql = "SELECT region, count(*) AS n, sum(seq) AS s, min(name) AS m FROM events WHERE seq % 5 = 1 GROUP BY region ORDER BY region"
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: server.query(sql), range(12)))
        for got in results:
            assert [tuple(r.values()) for r in got.to_pylist()] == [tuple(r) for r in oracle]
        m = server.metrics()
        assert m.get("quiver_cache_evictions_total") > 0
        assert m.get("quiver_cache_bytes") <= cache_limit
        assert m.get("quiver_cache_limit_bytes") == cache_limit
        on_disk = sum(f.stat().st_size for f in (tmp_path / "cache" / "objects" / "v1" / "blocks").rglob("*") if f.is_file())
        assert on_disk <= cache_limit
    finally:
        server.stop()


def test_restart_reuses_the_warm_cache(s3, events, tmp_path):
    args = ["--table", f"events=s3://{BUCKET}/events/", "--cache-dir", str(tmp_path / "cache")]
    sql = "SELECT day, region, count(*) AS n, sum(value) AS v FROM events WHERE seq % 3 = 0 GROUP BY day, region ORDER BY day, region"
    server = serve(args, tmp_path / "first", env=aws_env(s3))
    try:
        first = server.query(sql)
    finally:
        server.stop()

    started = s3.mark()
    server = serve(args, tmp_path / "second", env=aws_env(s3))
    try:
        again = server.query(sql)
        # The same answer (float sums to rounding: partial sums meet in any order).
        assert [tuple(r.values()) for r in again.to_pylist()] == approx_rows(first.to_pylist())
        # Listing again is a LIST; every footer and data block came from the cache.
        assert s3.object_gets(started) == [], s3.object_gets(started)
    finally:
        server.stop()
    expected = duckdb.sql(
        f"SELECT CAST(day AS DATE) AS day, region, count(*) AS n, sum(value) AS v FROM read_parquet('{events}/*/*/*.parquet', "
        "hive_partitioning = true) WHERE seq % 3 = 0 GROUP BY ALL ORDER BY day, region"
    ).to_arrow_table()
    assert [r["n"] for r in first.to_pylist()] == expected["n"].to_pylist()
    assert first["v"].to_pylist() == pytest.approx(expected["v"].to_pylist())


def test_data_dir_catalog_stores_and_pinning_on_s3(s3, requests_on_s3, tmp_path):
    catalog = tmp_path / "quiver.toml"
    catalog.write_text(
        f"""
[tables.reqs]
path = "s3://{BUCKET}/requests"
[tables.reqs.partitions]
service = "string"

[stores."s3://{BUCKET}"]
endpoint = "{s3.endpoint}"
allow_http = true
region = "us-east-1"
"""
    )
    env = aws_env(s3)
    del env["AWS_ENDPOINT"], env["AWS_ALLOW_HTTP"]
    server = serve(
        ["--catalog", str(catalog), "--data-dir", f"s3://{BUCKET}/dims/", "--pin-table", "services"],
        tmp_path,
        env=env,
    )
    try:
        names = server.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")
        assert names["table_name"].to_pylist() == ["reqs", "services"]
        local = requests_dataset(requests_on_s3).to_table()
        assert server.query("SELECT count(*) AS n FROM reqs")["n"][0].as_py() == local.num_rows
        pinned = server.query("SELECT service, team FROM services ORDER BY service")
        expected = ds.dataset(requests_on_s3 / "services", format="parquet").to_table().sort_by("service")
        assert pinned.to_pylist() == expected.select(["service", "team"]).to_pylist()
        m = server.metrics()
        assert m.get("quiver_catalog_pinned_bytes") > 0
    finally:
        server.stop()


def test_store_metrics_pass_promtool(s3, events, tmp_path):
    import shutil
    import subprocess

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    server = serve(["--table", f"events=s3://{BUCKET}/events/", "--cache-dir", str(tmp_path / "cache")], tmp_path, env=aws_env(s3))
    try:
        server.query("SELECT count(*) FROM events WHERE seq = 5")
        text = server.scrape_text()
    finally:
        server.stop()
    for family in [
        "quiver_object_store_requests_total",
        "quiver_object_store_bytes_total",
        "quiver_object_store_request_duration_seconds",
        "quiver_cache_hits_total",
        "quiver_cache_misses_total",
        "quiver_cache_evictions_total",
        "quiver_cache_bytes",
        "quiver_cache_limit_bytes",
    ]:
        assert f"# TYPE {family} " in text, family
    assert 'quiver_object_store_requests_total{op="list",outcome="ok"}' in text
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test" not in re.findall(r"AWS_SECRET[^\n]*", text)


def test_refresh_of_a_100k_object_prefix_does_not_block_queries(s3, tmp_path, dataset):
    """A refresh that pages through 100,000 objects (about a minute against moto) runs
    beside the queries: they keep answering from the published snapshot while it lists,
    and the new partitions appear when it is done."""
    bucket, objects = "bulk", 100_000
    s3.client.create_bucket(Bucket=bucket)
    key = lambda day: f"t/day={day}/data.parquet"  # noqa: E731
    path = tmp_path / "part.parquet"
    write_atomically(numbers(0, 1000), path, row_group_size=250)
    s3.client.upload_file(str(path), bucket, key(0))
    server = serve(
        ["--table", f"t=s3://{bucket}/t/", "--table", f"services={dataset / 'services'}", "--refresh-interval", "0s"],
        tmp_path,
        env=aws_env(s3),
    )
    try:
        assert count_and_sum(server) == (1000, sum(range(1000)))
        # What a Hadoop-style writer leaves beside its data: a checksum object per part
        # (hidden, listed and skipped). Written straight into moto's backend: 100k PUTs
        # over HTTP would take minutes, and it is the listing that is under test.
        backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
        for i in range(objects):
            backend.put_object(bucket, f"t/day={i % 100}/.part-{i}.parquet.crc", b"crc")
        for day in range(1, 6):
            s3.client.upload_file(str(path), bucket, key(day))

        started = s3.mark()
        with ThreadPoolExecutor(1) as pool:
            refreshing = pool.submit(lambda: list(server.client.do_action(flight.Action("refresh", b""))))
            wait_for(lambda: s3.lists(started) >= 1, timeout=60, what="the listing to start")
            for _ in range(10):
                assert count_and_sum(server) == (1000, sum(range(1000)))
                assert server.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4
            # Every query above was answered while the listing was still paging.
            assert not refreshing.done() and s3.lists(started) < objects // 1000, s3.lists(started)
            summary = refreshing.result(timeout=600)
        assert b'"changed":["t"]' in summary[0].body.to_pybytes(), summary[0].body.to_pybytes()
        assert s3.lists(started) > objects // 1000
        assert count_and_sum(server) == (6000, 6 * sum(range(1000)))
    finally:
        server.stop()


def test_a_hanging_store_is_bounded_by_deadlines(s3, tmp_path, dataset):
    """A store that accepts requests and never answers: every query of its tables ends
    within its deadline (the client's, --query-timeout, or the store's own timeouts), its
    resources are freed, other tables keep answering, and it recovers when the store does."""
    prefix = "stuck"
    put_table(s3, f"{prefix}/data.parquet", numbers(0, 2000), tmp_path)
    table = ["--table", f"t=s3://{BUCKET}/{prefix}/", "--table", f"services={dataset / 'services'}"]
    # No cache: every read goes to the store.
    common = [*table, "--refresh-interval", "0s", "--cache-max-size", "0"]
    patient = flight.FlightCallOptions(timeout=120)

    def freed(server: Server) -> bool:
        m = server.metrics()
        return m.get("quiver_queries_active") == 0 and m.get("quiver_memory_pool_reserved_bytes") == 0

    # Default store timeouts (30s per request): the server's --query-timeout ends it first.
    server = serve([*common, "--query-timeout", "3s"], tmp_path / "a", env=aws_env(s3))
    try:
        assert count_and_sum(server) == (2000, sum(range(2000)))
        s3.pause()
        try:
            with pytest.raises(flight.FlightTimedOutError, match=r"exceeded its deadline of 3s \(--query-timeout\)"):
                server.client.do_get(flight.Ticket(b"SELECT sum(k) FROM t"), options=patient).read_all()
            assert s3.held > 0
            # The client's own, shorter deadline holds as well.
            with pytest.raises(flight.FlightTimedOutError):
                server.client.do_get(flight.Ticket(b"SELECT sum(v) FROM t"), options=flight.FlightCallOptions(timeout=1)).read_all()
            wait_for(lambda: freed(server), timeout=30, what="the timed-out queries to release everything")
            assert server.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4
        finally:
            s3.resume()
        assert count_and_sum(server) == (2000, sum(range(2000)))
    finally:
        server.stop()

    # No query deadline at all: the store's timeouts end it, UNAVAILABLE naming the store.
    # Started while the store hangs: start-up waits no longer than those timeouts either.
    store_timeouts = ["--store-request-timeout", "2s", "--store-max-retries", "1", "--store-retry-timeout", "3s"]
    s3.pause()
    try:
        server = serve([*common, "--query-timeout", "0s", *store_timeouts], tmp_path / "b", env=aws_env(s3))
        try:
            with pytest.raises(flight.FlightUnavailableError, match=r"object store s3://lake is unavailable"):
                server.client.do_get(flight.Ticket(b"SELECT sum(k) FROM t"), options=patient).read_all()
            assert server.query("SELECT count(*) AS n FROM services")["n"][0].as_py() == 4
            s3.resume()
            # The table was unavailable from the start; the refresh action publishes it.
            refresh(server)
            assert count_and_sum(server) == (2000, sum(range(2000)))
            # Now hanging mid-query, with the table loaded.
            s3.pause()
            with pytest.raises(flight.FlightUnavailableError, match=r"object store s3://lake is unavailable"):
                server.client.do_get(flight.Ticket(b"SELECT sum(k) FROM t"), options=patient).read_all()
            wait_for(lambda: freed(server), timeout=30, what="the failed query to release everything")
            assert server.proc.poll() is None
        finally:
            s3.resume()
            server.stop()
    finally:
        s3.resume()
