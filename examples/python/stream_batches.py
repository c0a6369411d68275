# python examples/python/stream_batches.py [URL] ["SQL"]
#
# Streams a large result batch by batch instead of collecting it: memory stays at one
# batch however many rows arrive. Prints a running count, then the totals.
import os
import sys
import time

import pyarrow.compute as pc
import pyarrow.flight as flight

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QUIVER_URL", "grpc://127.0.0.1:50051")
sql = sys.argv[2] if len(sys.argv) > 2 else "SELECT status, latency_ms FROM requests"

client = flight.connect(url)
reader = client.do_get(flight.Ticket(sql.encode()))
print("schema:", reader.schema)

rows = batches = 0
slowest = None
started = time.monotonic()
for chunk in reader:  # one FlightStreamChunk per record batch, as it arrives
    batch = chunk.data
    batches += 1
    rows += batch.num_rows
    if "latency_ms" in batch.schema.names and batch.num_rows:
        m = pc.max(batch.column("latency_ms")).as_py()
        slowest = m if slowest is None or (m is not None and m > slowest) else slowest
    if batches % 50 == 0:
        print(f"... {rows} rows in {batches} batches", file=sys.stderr)

elapsed = time.monotonic() - started
print(f"rows={rows} batches={batches} max_latency_ms={slowest}")
print(f"{rows / max(elapsed, 1e-9):,.0f} rows/s", file=sys.stderr)
