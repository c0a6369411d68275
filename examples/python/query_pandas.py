# python examples/query.py "SELECT COUNT(*) FROM requests"
#
# Runs one SQL statement against a Quiver server (default grpc://127.0.0.1:50051, or
# $QUIVER_URL) with pyarrow.flight and prints the result.
import os
import sys

import pyarrow.flight as flight

sql = sys.argv[1] if len(sys.argv) > 1 else "SELECT service, COUNT(*) AS n FROM requests GROUP BY service"
client = flight.connect(os.environ.get("QUIVER_URL", "grpc://127.0.0.1:50051"))
print(client.do_get(flight.Ticket(sql.encode())).read_all())
