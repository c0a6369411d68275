"""The zero-copy send path (`--send-path zero-copy`, the default) against the standard one.

For random schemas and batches (primitives, strings and binary, dates, timestamps,
decimals, lists, structs, dictionaries, nulls, slices through LIMIT/OFFSET and filters, results split
into small messages), what pyarrow decodes from the zero-copy path equals what it decodes
from arrow-flight's standard encoder path, and both equal pyarrow.dataset reading the
same file. With `--view-types keep` the strings travel as views (sliced and filtered
batches compacted): both paths again decode alike, to the same values.
"""

import decimal
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import Server

DICTIONARY = pa.dictionary(pa.int32(), pa.string())
TYPES = [
    pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint32(), pa.uint64(),
    pa.float32(), pa.float64(), pa.bool_(), pa.string(), pa.binary(), pa.date32(),
    pa.timestamp("us", tz="UTC"), pa.timestamp("ms"), pa.decimal128(18, 3),
    pa.list_(pa.int32()), pa.struct([("a", pa.int64()), ("b", pa.string())]),
    DICTIONARY,
]

# What `--view-types keep` sends for the file's types (top-level columns only).
VIEWS = {pa.string(): pa.string_view(), pa.binary(): pa.binary_view()}


def value(rng: random.Random, t: pa.DataType, i: int):
    if pa.types.is_boolean(t):
        return rng.random() < 0.5
    if pa.types.is_dictionary(t):
        return rng.choice(["api", "billing", "search", "a value longer than twelve bytes"])
    if pa.types.is_integer(t):
        bits = t.bit_width - (0 if pa.types.is_unsigned_integer(t) else 1)
        lo = 0 if pa.types.is_unsigned_integer(t) else -(2**bits)
        return rng.randint(lo, 2**bits - 1)
    if pa.types.is_floating(t):
        return rng.uniform(-1e6, 1e6)
    if pa.types.is_string(t):
        return "s" * rng.randrange(0, 40) + str(i)
    if pa.types.is_binary(t):
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 24)))
    if pa.types.is_date32(t):
        return rng.randrange(0, 30_000)
    if pa.types.is_timestamp(t):
        return rng.randrange(0, 2**40)
    if pa.types.is_decimal(t):
        return decimal.Decimal(rng.randrange(-(10**15), 10**15)) / 1000
    if pa.types.is_list(t):
        return [rng.randrange(-100, 100) for _ in range(rng.randrange(0, 5))]
    if pa.types.is_struct(t):
        return {"a": rng.randrange(10**9), "b": f"b{rng.randrange(1000)}"}
    raise AssertionError(t)


def random_table(seed: int) -> pa.Table:
    rng = random.Random(seed)
    rows = rng.choice([0, 1, 7, 1000, 20_000, 70_000])
    types = rng.sample(TYPES, rng.randrange(2, 8))
    if seed % 3 == 0 and DICTIONARY not in types:
        # Dictionaries in every third schema at least, whatever the draw.
        types.append(DICTIONARY)
    columns = {"k": pa.array(range(rows), pa.int64())}
    for n, t in enumerate(types):
        null_rate = rng.choice([0.0, 0.1, 0.9])
        values = [None if rng.random() < null_rate else value(rng, t, i) for i in range(rows)]
        columns[f"c{n}"] = pa.array(values, t)
    return pa.table(columns)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("send-path")
    for seed in range(12):
        path = root / f"t{seed}" / "data.parquet"
        path.parent.mkdir()
        pq.write_table(random_table(seed), path, row_group_size=8192)
    return root


@pytest.fixture(scope="module")
def servers(tables, tmp_path_factory):
    started = {}
    for path in ("zero-copy", "standard"):
        # Small messages: large results are split into many.
        args = ["--data-dir", str(tables), "--send-path", path, "--max-flight-data-size", "256KiB"]
        started[path] = Server(args, tmp_path_factory.mktemp(path))
        started[f"{path}-keep"] = Server([*args, "--view-types", "keep"], tmp_path_factory.mktemp(path))
    yield started
    for s in started.values():
        s.stop()


def plain(table: pa.Table) -> pa.Table:
    """The table as a client of either path sees it (strings and binary, no views)."""
    return table.combine_chunks()


@pytest.mark.parametrize("seed", range(12))
def test_zero_copy_equals_standard_and_the_file(servers, tables, seed):
    expected = ds.dataset(tables / f"t{seed}" / "data.parquet").to_table()
    rows = expected.num_rows
    queries = {
        f"SELECT * FROM t{seed} ORDER BY k": expected,
        # Slices of batches: an offset into the result and a filter.
        f"SELECT * FROM t{seed} ORDER BY k LIMIT 5000 OFFSET 333": expected.slice(333, 5000),
        f"SELECT * FROM t{seed} WHERE k % 3 = 1 ORDER BY k": None,
    }
    for sql, oracle in queries.items():
        if oracle is None:
            k = expected["k"].to_pylist()
            oracle = expected.take(pa.array([i for i in range(rows) if k[i] % 3 == 1], pa.int64()))
        got = {name: plain(s.query(sql)) for name, s in servers.items()}
        # Every path against pyarrow.dataset reading the file: values, then types.
        for name, table in got.items():
            assert table.num_rows == oracle.num_rows, (name, sql)
            assert table.to_pylist() == oracle.to_pylist(), (name, sql)
        zero, keep = got["zero-copy"], got["zero-copy-keep"]
        assert zero.schema.names == oracle.schema.names, sql
        for field in oracle.schema:
            sent = zero.schema.field(field.name).type
            assert sent == field.type, (field, sent, sql)
            assert keep.schema.field(field.name).type == VIEWS.get(field.type, field.type), (field, sql)
        assert got["standard"].schema == zero.schema and got["standard-keep"].schema == keep.schema, sql


def written_bytes(pid: int) -> int:
    """Bytes the process has written with write(2), writev(2), sendmsg(2) and friends."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


def test_both_paths_send_each_payload_byte_once(servers):
    """The metric of bytes sent against the kernel's count of bytes the process wrote: each
    path writes the payload once, plus gRPC and HTTP/2 framing (a few bytes a message and
    frame), and both send the same payload."""
    sent = {}
    for name, s in servers.items():
        before = s.metrics()
        wrote = written_bytes(s.pid)
        for seed in range(12):
            s.query(f"SELECT * FROM t{seed}")
        wrote = written_bytes(s.pid) - wrote
        after = s.metrics()
        payload = after.get("quiver_query_bytes_sent_total") - before.get("quiver_query_bytes_sent_total")
        messages = after.get("quiver_query_batches_sent_total") - before.get("quiver_query_batches_sent_total")
        assert payload > 1_000_000, name
        assert payload <= wrote <= payload * 1.01 + 64 * 1024, (name, payload, wrote)
        sent[name] = (payload, messages)
    assert sent["zero-copy"] == sent["standard"]
    assert sent["zero-copy-keep"] == sent["standard-keep"]


def test_errors_and_flight_sql_still_work_on_the_zero_copy_port(servers):
    s = servers["zero-copy"]
    with pytest.raises(pa.ArrowInvalid, match="Divide by zero"):
        s.query("SELECT k / (k - k) AS x FROM t4")
    with pytest.raises(pa.ArrowInvalid, match="nope"):
        s.query("SELECT nope FROM t4")
    # A GetFlightInfo ticket (QueryTicket) takes the zero-copy path too.
    info = s.client.get_flight_info(flight.FlightDescriptor.for_command(b"SELECT 42 AS answer"))
    table = s.client.do_get(info.endpoints[0].ticket).read_all()
    assert table.to_pylist() == [{"answer": 42}]
    # Flight SQL: metadata and statement tickets are served by the same DoGet route.
    import adbc_driver_flightsql.dbapi as flightsql

    with flightsql.connect(f"grpc://{s.addr}") as conn:
        assert "TABLE" in conn.adbc_get_table_types()
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) AS n FROM t4")
            assert cur.fetchone()[0] == s.query("SELECT COUNT(*) AS n FROM t4")["n"][0].as_py()


def test_every_kind_of_ticket_takes_one_route_and_the_zero_copy_path(tables, tmp_path):
    """Plain SQL, a QueryTicket from GetFlightInfo, and the Flight SQL statement and
    prepared-statement tickets ADBC redeems: each DoGet is served once (one DoGet span in
    the log, nothing handed on to tonic), on the zero-copy path, with the right rows."""
    import adbc_driver_flightsql.dbapi as flightsql

    s = Server(["--data-dir", str(tables), "--log-filter", "quiver=debug,info"], tmp_path)
    try:
        expected = ds.dataset(tables / "t5" / "data.parquet").to_table()
        n = expected.num_rows
        assert s.query("SELECT COUNT(*) AS n FROM t5")["n"][0].as_py() == n
        info = s.client.get_flight_info(flight.FlightDescriptor.for_command(b"SELECT k FROM t5 ORDER BY k"))
        assert s.client.do_get(info.endpoints[0].ticket).read_all()["k"].to_pylist() == list(range(n))
        with flightsql.connect(f"grpc://{s.addr}") as conn, conn.cursor() as cur:
            cur.execute("SELECT k FROM t5 WHERE k < 10 ORDER BY k")
            assert [r[0] for r in cur.fetchall()] == list(range(min(n, 10)))
            cur.execute("SELECT k FROM t5 WHERE k < ? ORDER BY k", parameters=(3,))
            assert [r[0] for r in cur.fetchall()] == list(range(min(n, 3)))
        logs = s.logs()
    finally:
        s.stop()
    queries = [line for line in logs.splitlines() if " query " in line and "zero_copy" in line]
    assert len(queries) == 4, logs
    assert all("zero_copy=true" in line for line in queries), queries
    # One DoGet span around each: the route decodes and serves, tonic never sees a DoGet.
    assert all(line.count("DoGet") == 1 for line in queries), queries
    assert "DoGet reached tonic's route" not in logs
