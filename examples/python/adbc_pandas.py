# python examples/python/adbc_pandas.py [URL] [SERVICE]
#
# Flight SQL through ADBC's DB-API (pip install adbc-driver-flightsql pandas): a prepared
# statement with a `?` parameter, fetched straight into pandas. Also lists the tables
# the server exposes. With authentication, pass username/password in db_kwargs.
import os
import sys

import adbc_driver_flightsql.dbapi as flightsql

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QUIVER_URL", "grpc://127.0.0.1:50051")
service = sys.argv[2] if len(sys.argv) > 2 else "api"

with flightsql.connect(url) as conn:
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = sorted(
        t["table_name"] for c in objects for s in c["catalog_db_schemas"] or [] for t in s["db_schema_tables"] or []
    )
    print("tables:", ", ".join(tables))

    with conn.cursor() as cur:
        cur.execute(
            "SELECT status, COUNT(*) AS requests FROM requests WHERE service = ? GROUP BY status ORDER BY status",
            parameters=(service,),
        )
        df = cur.fetch_df()
print(df.to_string(index=False))
