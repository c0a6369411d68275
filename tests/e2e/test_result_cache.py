"""`--result-cache-size`: repeated queries answered from memory, never a stale, foreign or
non-deterministic answer. Oracle: DuckDB over pyarrow.dataset of the same files; the
cache's behaviour is read from the server's own Prometheus metrics (parsed by
prometheus_client) and its memory from the pool gauge."""

import hashlib
import random
import shutil

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import DAYS, Server, make_requests, requests_dataset, wait_for, write_atomically
from test_flight_sql import query_ticket



def opt_out_ticket(sql: str) -> flight.Ticket:
    """quiver.v1.QueryTicket {version 1, sql, no_result_cache = true} in its Any."""
    return flight.Ticket(query_ticket(sql, no_result_cache=True))


def oracle(root):
    con = duckdb.connect()
    requests = requests_dataset(root)  # noqa: F841 (DuckDB finds Python variables by name)
    con.register("requests", requests)
    return con


def rows(table: pa.Table) -> list:
    return [tuple(r.values()) for r in table.to_pylist()]


def counts(s: Server) -> dict:
    m = s.metrics()
    return {k: m.get(f"quiver_result_cache_{k}") for k in
            ("hits_total", "misses_total", "evictions_total", "bytes", "entries")}


@pytest.fixture
def cached(dataset, tmp_path):
    s = Server(["--data-dir", str(dataset), "--result-cache-size", "64MiB"], tmp_path)
    yield s
    s.stop()


SQL = "SELECT service, count(*) AS n, sum(status) AS total FROM requests GROUP BY service ORDER BY service"


def test_a_repeated_query_is_answered_from_memory(cached, dataset):
    expected = oracle(dataset).execute(SQL).fetchall()
    first = cached.query(SQL)
    after_first = counts(cached)
    assert (after_first["hits_total"], after_first["misses_total"], after_first["entries"]) == (0, 1, 1)
    second = cached.query(SQL)
    after = counts(cached)
    assert (after["hits_total"], after["misses_total"]) == (1, 1)
    assert rows(first) == rows(second) == [tuple(r) for r in expected]
    assert first.schema == second.schema
    m = cached.metrics()
    # The second answer scanned nothing.
    assert m.get("quiver_table_scans_total", table="requests") == 1
    # Reserved from the pool: idle, the pool holds exactly the cache.
    assert after["bytes"] > 0
    assert m.get("quiver_memory_pool_reserved_bytes") == after["bytes"]
    # Another statement is another answer.
    other = "SELECT count(*) AS n FROM requests WHERE status = 503"
    assert rows(cached.query(other)) == [tuple(r) for r in oracle(dataset).execute(other).fetchall()]
    assert counts(cached)["misses_total"] == 2


def test_parameters_are_part_of_the_key(cached, dataset):
    sql = "SELECT count(*) AS n FROM requests WHERE status = $1"
    con = oracle(dataset)
    with flightsql.connect(f"grpc://{cached.addr}") as conn, conn.cursor() as cur:
        for status in (503, 200, 503, 200):
            cur.execute(sql, parameters=(status,))
            got = cur.fetchall()
            assert got == con.execute(sql.replace("$1", str(status))).fetchall(), status
    c = counts(cached)
    assert (c["misses_total"], c["hits_total"]) == (2, 2), c


def test_answers_that_change_by_themselves_are_never_kept(cached):
    for sql in [
        "SELECT count(*) AS n, now() AS t FROM requests",
        "SELECT count(*) AS n FROM requests WHERE random() < 2",
        "SELECT count(*) AS n FROM requests WHERE day < current_date",
        "EXPLAIN SELECT count(*) FROM requests",
        # information_schema answers per caller.
        "SELECT table_name FROM information_schema.tables",
    ]:
        cached.query(sql)
        cached.query(sql)
    c = counts(cached)
    assert (c["hits_total"], c["misses_total"], c["entries"], c["bytes"]) == (0, 0, 0, 0), c


def test_a_ticket_can_opt_out(cached):
    cached.query(SQL)
    fresh = cached.client.do_get(opt_out_ticket(SQL)).read_all()
    assert rows(fresh) == rows(cached.query(SQL))
    c = counts(cached)
    # The opted-out run neither hit nor missed; the plain repeat hit.
    assert (c["hits_total"], c["misses_total"]) == (1, 1), c
    assert cached.metrics().get("quiver_table_scans_total", table="requests") == 2


def test_new_files_are_never_answered_from_an_old_version(dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset / "requests", root / "requests")
    s = Server(["--data-dir", str(root), "--result-cache-size", "64MiB", "--refresh-interval", "1s"],
               tmp_path / "server")
    try:
        sql = "SELECT count(*) AS n FROM requests"
        before = s.query(sql)["n"][0].as_py()
        assert s.query(sql)["n"][0].as_py() == before
        assert counts(s)["hits_total"] == 1
        new = make_requests(random.Random(7), DAYS[-1], "billing", 1234, True)
        write_atomically(new, root / "requests" / f"day={DAYS[-1]}" / "service=billing" / "part-0.parquet")
        wait_for(lambda: s.query(sql)["n"][0].as_py() == before + 1234, what="the new file in the answer")
        assert s.query(sql)["n"][0].as_py() == oracle(root).execute(sql).fetchall()[0][0]
        c = counts(s)
        # The refresh dropped the old version's answer.
        assert c["evictions_total"] >= 1 and c["entries"] == 1, c
    finally:
        s.stop()


def test_least_recently_used_answers_go_first_and_the_size_holds(dataset, tmp_path):
    s = Server(["--data-dir", str(dataset), "--result-cache-size", "256KiB"], tmp_path)
    try:
        con = oracle(dataset)
        sql = "SELECT request_id, latency_ms FROM requests ORDER BY request_id LIMIT {}"
        for n in (3000, 3001, 3002, 3003):
            got = s.query(sql.format(n))
            assert got.num_rows == n
            assert rows(got) == [tuple(r) for r in con.execute(sql.format(n)).fetchall()]
            assert counts(s)["bytes"] <= 256 * 1024
        c = counts(s)
        assert c["evictions_total"] >= 1, c
        # The most recent is kept, the oldest was evicted.
        s.query(sql.format(3003))
        assert counts(s)["hits_total"] == 1
        s.query(sql.format(3000))
        assert counts(s)["hits_total"] == 1
        # An answer larger than the whole cache passes through, and is not kept.
        big = s.query("SELECT * FROM requests")
        assert big.num_rows == requests_dataset(dataset).count_rows()
        assert counts(s)["bytes"] <= 256 * 1024
    finally:
        s.stop()


def two_callers(dataset, tmp_path, *args):
    """A server with two tokens: alice reads every table, svc only `services`; and a
    function running a statement as one of them."""
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[tokens]]\nname = "alice"\nsha256 = "{hashlib.sha256(b"alice-token").hexdigest()}"\n'
        f'[[tokens]]\nname = "svc"\nsha256 = "{hashlib.sha256(b"svc-token").hexdigest()}"\ntables = ["services"]\n'
    )
    s = Server(["--data-dir", str(dataset), "--auth-file", str(auth), *args], tmp_path / "server", connect=False)
    client = flight.connect(f"grpc://{s.addr}")

    def run(token, sql):
        options = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer " + token)])
        return client.do_get(flight.Ticket(sql.encode()), options).read_all()

    return s, run


def test_an_answer_is_only_served_to_callers_who_may_read_its_tables(dataset, tmp_path):
    s, run = two_callers(dataset, tmp_path, "--result-cache-size", "64MiB")
    try:
        sql = "SELECT count(*) AS n FROM requests"
        expected = run(b"alice-token", sql)
        assert run(b"alice-token", sql).equals(expected)
        assert counts(s)["hits_total"] == 1
        # Same statement, a caller who may not read the table: missing for them, as before.
        with pytest.raises(pa.ArrowKeyError):
            run(b"svc-token", sql)
        assert counts(s)["hits_total"] == 1
    finally:
        s.stop()
