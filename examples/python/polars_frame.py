# python examples/python/polars_frame.py [URL] ["SQL"]
#
# A Quiver result into Polars (pip install polars): the Arrow table converts without
# copying, then Polars takes over for the rest of the analysis.
import os
import sys

import polars as pl
import pyarrow.flight as flight

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QUIVER_URL", "grpc://127.0.0.1:50051")
sql = sys.argv[2] if len(sys.argv) > 2 else "SELECT service, status, latency_ms FROM requests"

table = flight.connect(url).do_get(flight.Ticket(sql.encode())).read_all()
df = pl.from_arrow(table)

summary = (
    df.group_by("service")
    .agg(
        pl.len().alias("requests"),
        (pl.col("status") >= 500).sum().alias("server_errors"),
        pl.col("latency_ms").quantile(0.99, interpolation="nearest").alias("p99_latency_ms"),
    )
    .sort("service")
)
with pl.Config(tbl_rows=-1, tbl_cols=-1):
    print(summary)
