"""`--view-types keep`: string columns DataFusion holds as views (`Utf8View`) are sent as
views, with the same values as the files (oracle: pyarrow.dataset and DuckDB), and a batch
that references a small part of its view buffers (a LIMIT slicing a decoded page) is
compacted, so the bytes sent stay within 1.1x of the views and the bytes they reference,
computed here from the values received. The default, `expand`, sends plain strings."""

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import Server

ROWS = 60_000
# Longer than the 12 bytes a view holds inline, so every value lives in a data buffer.
VALUE_LEN = 100


def value(i: int) -> str:
    return f"{i:08d}-" + "x" * (VALUE_LEN - 9)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    (root / "t").mkdir()
    table = pa.table({
        "id": pa.array(range(ROWS), pa.int64()),
        "s": pa.array([value(i) if i % 17 else None for i in range(ROWS)], pa.string()),
        "short": pa.array([["GET", "POST", "PUT"][i % 3] for i in range(ROWS)], pa.string()),
    })
    # One row group, plain-encoded: the reader decodes pages of ~10k values, each into one
    # data buffer the views point into.
    pq.write_table(table, root / "t" / "part-0.parquet", row_group_size=ROWS, use_dictionary=False)
    return root


@pytest.fixture(scope="module")
def servers(data, tmp_path_factory):
    made = {}
    for name, args in {
        "keep": ["--view-types", "keep"],
        "keep-pinned": ["--view-types", "keep", "--pin-table", "t"],
        "expand": [],
    }.items():
        made[name] = Server(["--data-dir", str(data), *args], tmp_path_factory.mktemp(name))
    yield made
    for s in made.values():
        s.stop()


def sent(server, sql):
    """The result of `sql` and the Arrow IPC bytes the server sent for it."""
    before = server.metrics().get("quiver_query_bytes_sent_total")
    table = server.query(sql)
    return table, server.metrics().get("quiver_query_bytes_sent_total") - before


def compacted_size(table: pa.Table) -> int:
    """Bytes of `table` as compacted views: 16 bytes per view plus the values longer than
    12 bytes, validity bitmaps, 8 bytes per int64; from the values, not from buffers."""
    size = 0
    for column in table.columns:
        n = len(column)
        size += (n + 7) // 8
        if pa.types.is_string_view(column.type) or pa.types.is_string(column.type):
            size += 16 * n + sum(len(v.encode()) for v in column.to_pylist() if v is not None and len(v.encode()) > 12)
        else:
            size += 8 * n
    return size


@pytest.mark.parametrize("name", ["keep", "keep-pinned"])
def test_views_are_sent_as_views_with_the_files_values(servers, data, name):
    s = servers[name]
    got = s.query("SELECT * FROM t ORDER BY id")
    assert got.schema.field("s").type == pa.string_view()
    assert got.schema.field("short").type == pa.string_view()
    expected = ds.dataset(data / "t").to_table().sort_by("id")
    assert got.num_rows == ROWS
    assert got.cast(expected.schema).equals(expected)
    # Through DuckDB too, on a filtered aggregate.
    sql = "SELECT short, COUNT(*) AS n, MIN(s) AS lo, MAX(s) AS hi FROM t WHERE id % 5 = 2 GROUP BY short ORDER BY short"
    con = duckdb.connect()
    con.register("t", ds.dataset(data / "t"))
    assert [tuple(r.values()) for r in s.query(sql).to_pylist()] == [tuple(r) for r in con.execute(sql).fetchall()]


def test_default_expands_views_to_plain_strings(servers):
    got = servers["expand"].query("SELECT * FROM t LIMIT 10")
    assert got.schema.field("s").type == pa.string()
    info = servers["keep"].client.get_flight_info(flight.FlightDescriptor.for_command(b"SELECT s FROM t"))
    assert info.schema.field("s").type == pa.string_view()


@pytest.mark.parametrize("name", ["keep", "keep-pinned"])
def test_a_slice_of_a_page_is_compacted(servers, data, name):
    """LIMIT 1000 slices the first batch, whose views reference the whole decoded page
    (about ten times the rows): sent as they are, that is several times the compacted size."""
    s = servers[name]
    got, nbytes = sent(s, "SELECT s FROM t LIMIT 1000")
    assert got.num_rows == 1000
    values = got["s"].to_pylist()
    assert len({v for v in values if v is not None}) == sum(v is not None for v in values)
    assert all(v is None or v == value(int(v[:8])) for v in values)
    ideal = compacted_size(got)
    # Per-message IPC header and padding: a few hundred bytes per message.
    assert nbytes <= 1.1 * ideal + 4096, (nbytes, ideal)


def test_whole_batches_are_within_the_bound_too(servers):
    got, nbytes = sent(servers["keep"], "SELECT s, short FROM t")
    assert got.num_rows == ROWS
    assert nbytes <= 1.1 * compacted_size(got) + 4096 * 16, (nbytes, compacted_size(got))
