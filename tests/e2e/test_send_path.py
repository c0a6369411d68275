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
        got = {name: s.query(sql) for name, s in servers.items()}
        zero, standard = plain(got["zero-copy"]), plain(got["standard"])
        assert zero.schema == standard.schema, sql
        assert zero.equals(standard), sql
        if oracle is None:
            k = expected["k"].to_pylist()
            oracle = expected.take(pa.array([i for i in range(rows) if k[i] % 3 == 1], pa.int64()))
        assert zero.num_rows == oracle.num_rows, sql
        assert zero.to_pylist() == oracle.to_pylist(), sql
        keep, keep_standard = plain(got["zero-copy-keep"]), plain(got["standard-keep"])
        assert keep.schema == keep_standard.schema, sql
        assert keep.equals(keep_standard), sql
        assert keep.cast(zero.schema).equals(zero), sql


def test_both_paths_send_the_same_bytes(servers):
    sent = {}
    for name, s in servers.items():
        before = s.metrics().get("quiver_query_bytes_sent_total")
        batches = s.metrics().get("quiver_query_batches_sent_total")
        s.query("SELECT * FROM t5")
        sent[name] = (
            s.metrics().get("quiver_query_bytes_sent_total") - before,
            s.metrics().get("quiver_query_batches_sent_total") - batches,
        )
    assert sent["zero-copy"] == sent["standard"]
    assert sent["zero-copy-keep"] == sent["standard-keep"]
    assert sent["zero-copy"][0] > 0


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
    # Flight SQL metadata DoGets are not queries: they reach tonic's route unchanged.
    import adbc_driver_flightsql.dbapi as flightsql

    with flightsql.connect(f"grpc://{s.addr}") as conn:
        assert "TABLE" in conn.adbc_get_table_types()
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) AS n FROM t4")
            assert cur.fetchone()[0] == s.query("SELECT COUNT(*) AS n FROM t4")["n"][0].as_py()
