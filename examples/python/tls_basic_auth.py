# python examples/python/tls_basic_auth.py grpc+tls://HOST:PORT CA.pem USER ["SQL"]
#
# Connects over TLS, checking the server's certificate against CA.pem, logs in with a
# user name and password (read from $QUIVER_PASSWORD) and runs a query with the bearer
# token the server hands back. Start a server to match with:
#   quiver serve --demo --tls-cert server.pem --tls-key server.key --auth-file auth.toml
import os
import sys

import pyarrow.flight as flight

url, ca_file, user = sys.argv[1:4]
sql = sys.argv[4] if len(sys.argv) > 4 else "SELECT COUNT(*) AS requests FROM requests"
password = os.environ["QUIVER_PASSWORD"]

with open(ca_file, "rb") as f:
    client = flight.FlightClient(url, tls_root_certs=f.read())

# Handshake with Basic credentials; the answer carries "authorization: Bearer <token>".
header, value = client.authenticate_basic_token(user, password)
options = flight.FlightCallOptions(headers=[(header, value)])

table = client.do_get(flight.Ticket(sql.encode()), options).read_all()
print(table.to_pandas().to_string(index=False))
