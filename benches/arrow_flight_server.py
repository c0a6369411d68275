"""pyarrow's own C++ Flight server serving one Parquet file's table from memory: the transport
ceiling the throughput benchmarks compare Quiver with.

    python benches/arrow_flight_server.py FILE.parquet ADDR_FILE

The ticket is the batch size in rows, optionally with a row limit and an offset: b"8192",
b"65536", b"8192:7500" (the first 7500 rows), b"8192:7500:60000" (7500 rows from row 60000). The table is read and combined once at start, then sliced
into batches of that size without copying. String views are served as plain strings, as
Quiver serves them.
"""

import sys

import pyarrow.flight as flight
import pyarrow.parquet as pq

from harness import plain


class TableServer(flight.FlightServerBase):
    def __init__(self, table, **kwargs):
        super().__init__("grpc://127.0.0.1:0", **kwargs)
        self.table = table

    def do_get(self, context, ticket):
        batch, _, rest = ticket.ticket.decode().partition(":")
        limit, _, offset = rest.partition(":")
        table = self.table.slice(int(offset or 0), int(limit)) if limit else self.table
        return flight.RecordBatchStream(table.to_reader(max_chunksize=int(batch)))


def main():
    path, addr_file = sys.argv[1], sys.argv[2]
    table = plain(pq.read_table(path)).combine_chunks()
    server = TableServer(table)
    with open(addr_file, "w") as f:
        f.write(f"127.0.0.1:{server.port}")
    server.serve()


if __name__ == "__main__":
    main()
