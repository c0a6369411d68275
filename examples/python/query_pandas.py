# python examples/python/query_pandas.py [URL] ["SQL"]
#
# Runs one SQL statement as a plain Flight ticket and gets the result as a pandas
# DataFrame. URL defaults to $QUIVER_URL or grpc://127.0.0.1:50051 (`quiver serve --demo`).
import os
import sys

import pyarrow.flight as flight

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QUIVER_URL", "grpc://127.0.0.1:50051")
sql = (
    sys.argv[2]
    if len(sys.argv) > 2
    else "SELECT service, COUNT(*) AS requests, AVG(latency_ms) AS avg_latency_ms "
    "FROM requests GROUP BY service ORDER BY service"
)

client = flight.connect(url)
# The ticket is the SQL text itself; Quiver streams the result as Arrow record batches.
table = client.do_get(flight.Ticket(sql.encode())).read_all()
df = table.to_pandas()
print(df.to_string(index=False))
print(f"{len(df)} rows")
