"""A cluster: several `quiver serve` processes on loopback ports, each a worker of the
others and any of them a coordinator (datafusion-distributed underneath). Every answer
equals DuckDB's on the same files."""

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import REPO, Server, quiver_binary, wait_for, write_atomically
from test_io import scan_summaries, wait_for_summaries

sys.path.insert(0, str(REPO / "benches"))
from harness import generate_tpch, tpch_tables  # noqa: E402
from tpch import DuckDB, same  # noqa: E402
from tpch_queries import QUERIES  # noqa: E402

SECRET = "4f1c2a9be07d3c58a1e64d0f92b7c3e5d8a0f1b2c3d4e5f60718293a4b5c6d7e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tpch(tmp_path_factory) -> Path:
    return generate_tpch(0.1, tmp_path_factory.mktemp("tpch"))


def secret_file(tmp: Path, secret: str = SECRET) -> Path:
    path = tmp / "cluster-secret"
    path.write_text(secret + "\n")
    return path


def start_cluster(tmp: Path, tables: list[str], nodes: int = 3, extra: list[str] | None = None) -> list[Server]:
    """`nodes` servers, each a worker on its own port and a coordinator over all of them."""
    ports = [free_port() for _ in range(nodes)]
    workers = ",".join(f"http://127.0.0.1:{p}" for p in ports)
    tmp.mkdir(parents=True, exist_ok=True)
    secret = secret_file(tmp)
    servers = []
    try:
        for i, port in enumerate(ports):
            servers.append(
                Server(
                    [
                        *tables, "--cluster-listen", f"127.0.0.1:{port}", "--cluster-secret-file", str(secret),
                        "--workers", workers, "--distributed", "on", *(extra or []),
                    ],
                    tmp / f"node{i}",
                )
            )
        # Each probes the others every --cluster-probe-interval: wait until all see all.
        for s in servers:
            wait_for(lambda s=s: s.metrics().get("quiver_cluster_workers", state="up") == nodes, timeout=30, what="every worker up")
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


@pytest.fixture(scope="module")
def cluster(tpch, tmp_path_factory):
    # Scan summaries logged (they count a query's stages).
    servers = start_cluster(tmp_path_factory.mktemp("cluster"), tpch_tables(tpch), extra=["--log-filter", "info,quiver::query::scan=debug"])
    yield servers
    for s in servers:
        s.stop()


def test_tpch_through_each_node_equals_duckdb(cluster, tpch):
    duck = DuckDB(tpch, 2)
    try:
        expected = {q: duck.run(sql) for q, sql in QUERIES.items()}
    finally:
        duck.close()
    for i, node in enumerate(cluster):
        for q, sql in QUERIES.items():
            problem = same(expected[q], node.query(sql))
            assert problem is None, f"Q{q} through node {i}: {problem}"


def test_tpch_on_nodes_with_one_cpu_thread_equals_duckdb(tpch, tmp_path):
    """Nodes with one query thread (`--cpu-threads 1`, the default on a one-CPU machine):
    DataFusion plans single-step aggregates there, which must not be split over tasks
    (Q11 and Q15 answered per task, wrongly, until distributed plans got two partitions)."""
    nodes = start_cluster(tmp_path, tpch_tables(tpch), nodes=2, extra=["--cpu-threads", "1"])
    duck = DuckDB(tpch, 2)
    try:
        for q, sql in QUERIES.items():
            problem = same(duck.run(sql), nodes[1].query(sql))
            assert problem is None, f"Q{q}: {problem}"
        assert sum(n.metrics().get("quiver_cluster_tasks_total", outcome="ok") for n in nodes) > 0
    finally:
        duck.close()
        for node in nodes:
            node.stop()


def test_explain_shows_the_network_stages(cluster):
    plan = cluster[0].query(
        "EXPLAIN SELECT l_returnflag, count(*) FROM lineitem GROUP BY l_returnflag"
    )
    text = "\n".join(str(v) for v in plan.column(1).to_pylist())
    assert "NetworkShuffleExec" in text or "NetworkCoalesceExec" in text, text
    assert "Stage" in text, text


def test_cluster_flags_are_checked(tmp_path, tpch):
    base = ["serve", *tpch_tables(tpch), "--listen", "127.0.0.1:0"]

    def fails(args: list[str]) -> str:
        out = subprocess.run([str(quiver_binary()), *base, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode != 0, out.stdout + out.stderr
        return out.stderr

    assert "--cluster-secret-file is required" in fails(["--cluster-listen", "127.0.0.1:0"])
    assert "at least 32 characters" in fails(
        ["--workers", "http://127.0.0.1:1", "--cluster-secret-file", str(secret_file(tmp_path, "short"))]
    )
    assert "--workers: '127.0.0.1:1'" in fails(
        ["--workers", "127.0.0.1:1", "--cluster-secret-file", str(secret_file(tmp_path))]
    )


def test_calls_without_the_secret_are_refused(cluster, tpch, tmp_path):
    # A coordinator with another secret: its tasks are refused, the query fails naming it.
    other = tmp_path / "other"
    other.mkdir()
    ports = _cluster_ports(cluster)
    stranger = Server(
        [
            *tpch_tables(tpch), "--workers", ",".join(f"http://127.0.0.1:{p}" for p in ports),
            "--cluster-secret-file", str(secret_file(other, "0" * 64)), "--distributed", "on",
        ],
        other,
    )
    try:
        with pytest.raises(flight.FlightError, match="wrong cluster secret"):
            stranger.query("SELECT l_returnflag, count(*) FROM lineitem GROUP BY l_returnflag")
        assert stranger.query("SELECT 1 AS one")["one"][0].as_py() == 1
    finally:
        stranger.stop()
    # No secret at all (a raw gRPC call to the worker service): UNAUTHENTICATED (16).
    out = subprocess.run(
        [
            "curl", "-s", "-i", "--http2-prior-knowledge", "-X", "POST",
            "-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "",
            f"http://127.0.0.1:{ports[0]}/worker.WorkerService/GetWorkerInfo",
        ],
        capture_output=True, text=True, timeout=30,
    )
    assert "grpc-status: 16" in out.stdout, out.stdout + out.stderr
    assert "cluster%20secret" in out.stdout
    # The nodes are unharmed.
    assert cluster[0].query("SELECT count(*) AS n FROM nation")["n"][0].as_py() == 25


def _cluster_ports(cluster) -> list[int]:
    ports = []
    for node in cluster:
        args = node.proc.args
        ports.append(int(args[args.index("--cluster-listen") + 1].rsplit(":", 1)[1]))
    return ports


# Seconds of work on every node (a 361M-row join at SF0.1), long enough to act while it runs.
HEAVY = (
    "SELECT count(*) AS n, sum(l1.l_extendedprice * l2.l_discount) AS s "
    "FROM lineitem l1 JOIN lineitem l2 ON l1.l_suppkey = l2.l_suppkey"
)


def idle(server: Server) -> bool:
    m = server.metrics()
    return m.get("quiver_queries_active") == 0 and m.get("quiver_memory_pool_reserved_bytes") == 0


def test_a_worker_lost_mid_query_then_back(tpch, tmp_path):
    """A worker killed while a query runs: that query fails UNAVAILABLE naming it, the
    coordinator stays up, later queries run on the others, and the worker rejoins."""
    tables = tpch_tables(tpch)
    servers = start_cluster(tmp_path, tables, extra=["--cluster-probe-interval", "300ms"])
    coordinator, victim = servers[0], servers[2]
    victim_port = _cluster_ports(servers)[2]
    try:
        expected = coordinator.query(HEAVY)
        failure = []

        def run():
            try:
                coordinator.query(HEAVY)
            except flight.FlightError as e:
                failure.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: victim.metrics().get("quiver_memory_pool_reserved_bytes") > 0, timeout=30,
                 what="the victim to work on the query")
        victim.proc.kill()
        thread.join(timeout=120)
        assert failure, "the query did not fail when its worker died"
        assert isinstance(failure[0], flight.FlightUnavailableError), failure[0]
        assert f"127.0.0.1:{victim_port}" in str(failure[0]), failure[0]
        # The coordinator is up; once the probe drops the dead worker, queries run on the rest.
        wait_for(lambda: coordinator.metrics().get("quiver_cluster_workers", state="down") == 1, timeout=30,
                 what="the dead worker to be left out")
        assert same(expected, coordinator.query(HEAVY)) is None
        wait_for(lambda: idle(coordinator), timeout=30, what="the coordinator's pool back to 0")
        # Back on the same port: taken back.
        args = victim.proc.args
        servers[2] = Server(args[args.index("--metrics-addr-file") + 2 :], tmp_path / "node2-again")
        wait_for(lambda: coordinator.metrics().get("quiver_cluster_workers", state="up") == 3, timeout=30,
                 what="the worker to rejoin")
        assert same(expected, coordinator.query(HEAVY)) is None
        assert servers[2].metrics().get("quiver_cluster_tasks_total", outcome="ok") > 0
    finally:
        for s in servers:
            s.stop()


def test_cancelling_reaches_the_workers(cluster):
    """A client that gives up ends the query on every node, all pools back to 0: by its
    deadline while the tasks are still being set up, or later, or by resetting the call
    mid-query. (Nothing else runs meanwhile: no later query's work frees what the
    cancelled one left.)"""

    def all_idle(how: str):
        for i, node in enumerate(cluster):
            try:
                wait_for(lambda node=node: idle(node), timeout=20, what=f"every pool back to 0 ({how})")
            except AssertionError:
                m = node.metrics()
                raise AssertionError(
                    f"{how}, node {i}: {m.get('quiver_queries_active')} queries active, "
                    f"{m.get('quiver_memory_pool_reserved_bytes')} bytes reserved"
                ) from None

    for deadline in (0.1, 0.3, 1.0):
        with pytest.raises(flight.FlightTimedOutError):
            cluster[0].client.do_get(
                flight.Ticket(HEAVY.encode()), options=flight.FlightCallOptions(timeout=deadline)
            ).read_all()
        all_idle(f"a {deadline} s deadline")
    reader = cluster[1].client.do_get(flight.Ticket(HEAVY.encode()))
    timer = threading.Timer(0.5, reader.cancel)
    timer.start()
    # pyarrow raises KeyboardInterrupt from a read its own cancel() interrupted.
    with pytest.raises((flight.FlightCancelledError, KeyboardInterrupt)):
        reader.read_all()
    timer.join()
    all_idle("a reset mid-query")


def test_a_task_message_over_the_limit_is_refused(tpch, tmp_path):
    """--max-cluster-message-size bounds what a worker reads from another node: a plan
    over it is refused before it is read, the error names the flag, the nodes stay up."""
    nodes = start_cluster(tmp_path, tpch_tables(tpch), nodes=2, extra=["--max-cluster-message-size", "1KiB"])
    try:
        sql = "SELECT l_returnflag, count(*) AS n FROM lineitem GROUP BY l_returnflag ORDER BY 1"
        with pytest.raises(flight.FlightError, match="--max-cluster-message-size"):
            nodes[0].client.do_get(flight.Ticket(sql.encode())).read_all()
        # Kept on one node, the same query runs.
        from test_flight_sql import query_ticket

        alone = nodes[0].client.do_get(flight.Ticket(query_ticket(sql, distribution=3))).read_all()
        duck = DuckDB(tpch, 2)
        try:
            assert same(duck.run(sql), alone) is None
        finally:
            duck.close()
        for node in nodes:
            wait_for(lambda node=node: idle(node), timeout=20, what="every pool back to 0")
    finally:
        for node in nodes:
            node.stop()


def test_cluster_metrics_pass_promtool(cluster, tmp_path):
    import shutil

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    cluster[0].query("SELECT l_returnflag, count(*) FROM lineitem GROUP BY l_returnflag")
    for node in cluster:
        m = node.metrics()
        assert m.get("quiver_cluster_tasks_total", outcome="ok") > 0
        assert m.get("quiver_cluster_bytes_sent_total") > 0
        assert m.get("quiver_cluster_bytes_received_total") > 0
    text = cluster[0].scrape_text()
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "quiver_cluster" in line]
    assert not problems, problems


def test_a_ticket_chooses_its_distribution(cluster):
    """The nodes default to `on`; a QueryTicket with DISTRIBUTION_OFF stays on its node, one
    with DISTRIBUTION_ON spreads; an unknown value is refused. Same answers either way."""
    from test_flight_sql import query_ticket

    sql = "SELECT l_returnflag, count(*) AS n FROM lineitem GROUP BY l_returnflag ORDER BY 1"

    def tasks() -> float:
        return sum(n.metrics().get("quiver_cluster_tasks_total", outcome="ok") for n in cluster)

    def run(distribution: int):
        before = tasks()
        table = cluster[0].client.do_get(flight.Ticket(query_ticket(sql, distribution=distribution))).read_all()
        return table, tasks() - before

    logged = len(scan_summaries(cluster[0]))
    alone, alone_tasks = run(3)
    spread, spread_tasks = run(2)
    assert alone_tasks == 0 and spread_tasks > 0, (alone_tasks, spread_tasks)
    # The scan summaries count the stages: none alone, a shuffle and a head when spread.
    summaries = wait_for_summaries(cluster[0], logged + 2)
    assert summaries[-2]["stages"] == 0 and summaries[-1]["stages"] >= 2, summaries[-2:]
    assert alone.to_pylist() == spread.to_pylist() == cluster[1].query(sql).to_pylist()
    with pytest.raises(pa.ArrowInvalid, match="distribution 9 is unknown"):
        run(9)


def test_a_worker_whose_files_differ_refuses_its_task(tmp_path):
    """The coordinator lists a new version of a file that a worker has not: the worker
    refuses its task, naming itself and the file, instead of reading other data."""
    path = tmp_path / "t" / "data.parquet"
    path.parent.mkdir()
    write_atomically(pa.table({"k": list(range(100_000))}), path, row_group_size=10_000)
    servers = start_cluster(tmp_path, ["--table", f"t={path.parent}", "--refresh-interval", "0s"], nodes=2)
    try:
        assert servers[0].query("SELECT sum(k) AS s FROM t")["s"][0].as_py() == sum(range(100_000))
        write_atomically(pa.table({"k": list(range(50_000))}), path, row_group_size=10_000)
        list(servers[0].client.do_action(flight.Action("refresh", b"")))
        worker = f"127.0.0.1:{_cluster_ports(servers)[1]}"
        with pytest.raises(flight.FlightUnavailableError) as e:
            servers[0].query("SELECT sum(k) AS s FROM t")
        message = str(e.value)
        assert worker in message and "data.parquet" in message and "differs from what the coordinator listed" in message, message
        # Once it has refreshed too, the cluster answers from the new version.
        list(servers[1].client.do_action(flight.Action("refresh", b"")))
        assert servers[0].query("SELECT sum(k) AS s FROM t")["s"][0].as_py() == sum(range(50_000))
    finally:
        for s in servers:
            s.stop()


def test_tpch_on_s3_tables_through_the_cluster(tpch, tmp_path):
    """The same cluster over S3 tables (moto): every node reads the objects through its own
    cache, and the 22 answers equal DuckDB's on the local copy."""
    from s3_server import S3Server

    from tpch_queries import TABLES

    s3 = S3Server()
    s3.start()
    try:
        s3.client.create_bucket(Bucket="tpch")
        for t in TABLES:
            s3.client.upload_file(str(tpch / f"{t}.parquet"), "tpch", f"{t}/{t}.parquet")
        tables = [arg for t in TABLES for arg in ("--table", f"{t}=s3://tpch/{t}/")]
        servers = []
        try:
            ports = [free_port() for _ in range(3)]
            workers = ",".join(f"http://127.0.0.1:{p}" for p in ports)
            secret = secret_file(tmp_path)
            for i, port in enumerate(ports):
                node = tmp_path / f"node{i}"
                servers.append(Server(
                    [*tables, "--cache-dir", str(node / "cache"), "--cluster-listen", f"127.0.0.1:{port}",
                     "--cluster-secret-file", str(secret), "--workers", workers, "--distributed", "on"],
                    node, env=s3.aws_env(),
                ))
            for s in servers:
                wait_for(lambda s=s: s.metrics().get("quiver_cluster_workers", state="up") == 3, timeout=30, what="every worker up")
            duck = DuckDB(tpch, 2)
            try:
                for q, sql in QUERIES.items():
                    problem = same(duck.run(sql), servers[q % 3].query(sql))
                    assert problem is None, f"Q{q}: {problem}"
            finally:
                duck.close()
            # Every node read objects for tasks of others' queries.
            for s in servers:
                m = s.metrics()
                assert m.get("quiver_cluster_tasks_total", outcome="ok") > 0
                assert m.get("quiver_object_store_bytes_total") > 0
        finally:
            for s in servers:
                s.stop()
    finally:
        s3.stop()


def test_a_cluster_over_mutual_tls(tpch, tmp_path):
    """Nodes with TLS (and client certificates required): the worker ports speak TLS with
    the node's certificate, coordinators connect with --cluster-ca and present theirs. A
    plaintext call to a worker port gets no answer."""
    from test_transport import Certs, tls_client

    certs = Certs(tmp_path)
    ports = [free_port() for _ in range(2)]
    workers = ",".join(f"https://localhost:{p}" for p in ports)
    tls = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--tls-client-ca", str(certs.ca_file),
           "--cluster-ca", str(certs.ca_file)]
    secret = secret_file(tmp_path)
    servers = []
    try:
        for i, port in enumerate(ports):
            servers.append(Server(
                [*tpch_tables(tpch), *tls, "--cluster-listen", f"127.0.0.1:{port}", "--cluster-secret-file", str(secret),
                 "--workers", workers, "--distributed", "on"],
                tmp_path / f"node{i}", connect=False,
            ))
        for s in servers:
            wait_for(lambda s=s: s.metrics().get("quiver_cluster_workers", state="up") == 2, timeout=30, what="workers up")
        cert, key = certs.client_cert()
        client = tls_client(servers[0].port, certs.ca_pem, cert_chain=cert.decode(), private_key=key.decode())
        sql = QUERIES[3]
        duck = DuckDB(tpch, 2)
        try:
            assert same(duck.run(sql), client.do_get(flight.Ticket(sql.encode())).read_all()) is None
        finally:
            duck.close()
        assert servers[1].metrics().get("quiver_cluster_tasks_total", outcome="ok") > 0
        out = subprocess.run(
            ["curl", "-s", "-i", "--http2-prior-knowledge", "-X", "POST", "-H", "content-type: application/grpc",
             "--data-binary", "", f"http://127.0.0.1:{ports[0]}/worker.WorkerService/GetWorkerInfo"],
            capture_output=True, text=True, timeout=30,
        )
        assert "grpc-status" not in out.stdout, out.stdout
    finally:
        for s in servers:
            s.stop()


def test_split_results_are_located_at_the_nodes_and_pulled_from_them(dataset, tmp_path):
    import adbc_driver_flightsql.dbapi as flightsql
    import pyarrow.compute as pc

    from conftest import requests_dataset

    servers = start_cluster(tmp_path / "split", ["--data-dir", str(dataset)], extra=["--endpoints-per-query", "6"])
    try:
        columns = ["request_id", "day", "service", "status", "ts"]
        sql = f"SELECT {', '.join(columns)} FROM requests WHERE status >= 400"
        keys = [(k, "ascending") for k in ["request_id", "day", "ts"]]
        expected = requests_dataset(dataset).to_table(columns=columns, filter=pc.field("status") >= 400).sort_by(keys)
        info = servers[0].client.get_flight_info(flight.FlightDescriptor.for_command(sql.encode()))
        assert len(info.endpoints) == 6
        # In turn: the coordinator, then each other node (each listed once).
        located = [[loc.uri.decode() for loc in e.locations] for e in info.endpoints]
        nodes = [f"grpc://{s.addr}" for s in servers]
        assert all(len(at) == 1 for at in located), located
        assert sorted(at[0] for at in located) == sorted(nodes * 2), located
        assert located[0] == [nodes[0]]

        def successes():
            return [s.metrics().get("quiver_queries_total", outcome="success") for s in servers]

        before = successes()
        parts = [flight.connect(e.locations[0]).do_get(e.ticket).read_all() for e in info.endpoints]
        # Each node ran the slices located at it, nothing else.
        assert [a - b for a, b in zip(successes(), before)] == [2, 2, 2]
        assert pa.concat_tables(parts).sort_by(keys).to_pylist() == expected.to_pylist()
        # ADBC follows the locations, through any node.
        with flightsql.connect(f"grpc://{servers[1].addr}", autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql)
            assert cur.fetch_arrow_table().select(columns).sort_by(keys).to_pylist() == expected.to_pylist()
    finally:
        for s in servers:
            s.stop()


def test_worker_admission_refuses_a_query_beyond_its_slots(tpch, tmp_path):
    """A worker with --max-cluster-queries 1 runs one other node's query at a time: a
    second coordinator's query that finds the slot taken for --cluster-queue-timeout fails
    UNAVAILABLE naming the worker and the flag, before anything of it runs there; the first
    query is unharmed, the slot comes back, and every pool returns to 0. (Two workers: with
    one, datafusion-distributed keeps a query on its coordinator.)"""
    tables = tpch_tables(tpch)
    ports = [free_port(), free_port()]
    secret = secret_file(tmp_path)
    cluster = ["--cluster-secret-file", str(secret)]
    limited = Server(
        [*tables, *cluster, "--cluster-listen", f"127.0.0.1:{ports[0]}", "--max-cluster-queries", "1",
         "--cluster-queue-timeout", "300ms"],
        tmp_path / "limited",
    )
    nodes = [limited]
    try:
        nodes.append(Server([*tables, *cluster, "--cluster-listen", f"127.0.0.1:{ports[1]}"], tmp_path / "worker"))
        workers = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        coordinators = []
        for i in range(2):
            coordinators.append(Server(
                [*tables, *cluster, "--workers", workers, "--distributed", "on"], tmp_path / f"coordinator{i}",
            ))
        nodes += coordinators
        for c in coordinators:
            wait_for(lambda c=c: c.metrics().get("quiver_cluster_workers", state="up") == 2, timeout=30,
                     what="the workers up")
        small = "SELECT l_returnflag, count(*) AS n FROM lineitem GROUP BY l_returnflag ORDER BY 1"
        expected_small = coordinators[1].query(small)
        assert limited.metrics().get("quiver_cluster_tasks_total", outcome="ok") > 0, "the worker ran no task"
        assert limited.metrics().get("quiver_cluster_queries_active") == 0
        result, failure = [], []

        def run():
            try:
                result.append(coordinators[0].query(HEAVY))
            except flight.FlightError as e:
                failure.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: limited.metrics().get("quiver_cluster_queries_active") == 1, timeout=30,
                 what="the heavy query to hold the worker's slot")
        with pytest.raises(flight.FlightUnavailableError) as refused:
            coordinators[1].query(small)
        message = str(refused.value)
        assert f"127.0.0.1:{ports[0]}" in message and "--max-cluster-queries" in message, message
        assert limited.metrics().get("quiver_cluster_queries_refused_total") == 1
        thread.join(timeout=300)
        assert not failure, failure
        assert result and result[0].num_rows == 1 and result[0]["n"][0].as_py() > 0
        # The slot is back: the refused query runs now, with the same answer as before.
        wait_for(lambda: limited.metrics().get("quiver_cluster_queries_active") == 0, timeout=30,
                 what="the slot back")
        assert same(expected_small, coordinators[1].query(small)) is None
        for node in nodes:
            wait_for(lambda node=node: idle(node), timeout=60, what="every pool back to 0")
        assert limited.metrics().get("quiver_cluster_queries_active") == 0
    finally:
        for s in nodes:
            s.stop()
