"""Soak: rounds of hostile and ordinary traffic against one server, checking after each
round that nothing leaked and every answer was right.

    .venv/bin/python benches/soak.py --quiver target/release/quiver              # ~5 minutes
    .venv/bin/python benches/soak.py --quiver target/release/quiver --smoke      # < 1 minute

Each round runs, at once: clients checking aggregate answers against pyarrow.dataset (the
oracle) over the same files; clients killed mid-stream (a real process, SIGKILL); queries
cancelled with CancelFlightInfo; queries past their deadline; files replaced by rename
(same rows, new file) followed by a `refresh`; bursts past the admission queue; and bad
logins. After the round, once the server is idle: the memory pool must be back to 0,
and open file descriptors, threads and RSS are recorded. The run fails on a crash, a
wrong answer, an unexpected error, a pool that does not drain, descriptors above their
baseline, or RSS growing across the later rounds. Figures: docs/benchmarks.md.
"""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Quiver, common_args  # noqa: E402

TOKEN = b"soak-token"
HEADERS = [(b"authorization", b"Bearer " + TOKEN)]
DAYS = [f"2026-01-{d:02d}" for d in range(1, 7)]
FILES_PER_DAY = 3
ROWS_PER_FILE = 40_000
# Statements whose answers the oracle checks.
CHECKED = {
    "per_day": "SELECT CAST(day AS VARCHAR) AS d, count(*) AS n, sum(v) AS s FROM events GROUP BY 1 ORDER BY 1",
    "filtered": "SELECT count(*) AS n, sum(v) AS s FROM events WHERE k % 7 = 3 AND CAST(day AS VARCHAR) >= '2026-01-03'",
    "top": "SELECT k, v FROM events ORDER BY v DESC, k LIMIT 25",
}
# Long enough to kill, cancel or time out mid-way (about a second here): each of the
# first 400k rows of `a` meets 144 rows of `b`.
SLOW = "SELECT count(*) AS n, sum(b.v) AS s FROM events a JOIN events b ON a.k % 5000 = b.k % 5000 WHERE a.k < 400000"
STREAM = "SELECT * FROM events"


def write_file(path: Path, seed: int):
    rng = random.Random(seed)
    base = seed * ROWS_PER_FILE
    table = pa.table(
        {
            "k": pa.array(range(base, base + ROWS_PER_FILE), pa.int64()),
            "v": pa.array([rng.randrange(0, 1_000_000) for _ in range(ROWS_PER_FILE)], pa.int64()),
            "s": pa.array([f"s{rng.randrange(0, 5000)}" for _ in range(ROWS_PER_FILE)]),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=8192)
    os.replace(tmp, path)


def make_dataset(root: Path):
    seed = 0
    for day in DAYS:
        for f in range(FILES_PER_DAY):
            write_file(root / "events" / f"day={day}" / f"part-{f}.parquet", seed)
            seed += 1


def oracle(root: Path) -> dict:
    data = ds.dataset(root / "events", format="parquet", partitioning="hive").to_table()
    import duckdb

    con = duckdb.connect()
    con.register("events", data)
    def table(sql):
        result = con.execute(sql)
        return result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.fetch_arrow_table()

    return {name: table(sql) for name, sql in CHECKED.items()}


def same(a: pa.Table, b: pa.Table) -> bool:
    return [list(r.values()) for r in a.to_pylist()] == [list(r.values()) for r in b.to_pylist()]


class Round:
    """One round's tallies, shared by its threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.unexpected = []

    def count(self, what: str):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def fail(self, what: str):
        with self.lock:
            self.unexpected.append(what)


def options(timeout=None):
    return flight.FlightCallOptions(headers=HEADERS, timeout=timeout)


def checked_queries(addr, expected, tally: Round, stop: threading.Event):
    client = flight.connect(f"grpc://{addr}")
    names = list(CHECKED)
    i = 0
    while not stop.is_set():
        name = names[i % len(names)]
        i += 1
        try:
            got = client.do_get(flight.Ticket(CHECKED[name].encode()), options()).read_all()
        except flight.FlightUnavailableError as e:
            # Admission refusals (the bursts fill the queue) and a file replaced under a
            # running query are the two retryable answers.
            if "changed since" in str(e) or "server busy" in str(e):
                tally.count("retryable")
                time.sleep(0.02)
                continue
            tally.fail(f"{name}: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            tally.fail(f"{name}: {type(e).__name__}: {e}")
            continue
        if same(got, expected[name]):
            tally.count("right")
        else:
            tally.fail(f"{name}: wrong answer {got.to_pylist()[:3]} vs {expected[name].to_pylist()[:3]}")
    client.close()


KILLED_CLIENT = """
import sys, pyarrow.flight as flight
c = flight.connect(sys.argv[1])
r = c.do_get(flight.Ticket(sys.argv[2].encode()), flight.FlightCallOptions(headers=[(b"authorization", b"Bearer " + sys.argv[3].encode())]))
r.read_chunk()
print("reading", flush=True)
sys.stdin.read()
"""


def killed_mid_stream(addr, tally: Round):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, f"grpc://{addr}", STREAM, TOKEN.decode()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tally.count("killed mid-stream" if line.startswith(b"reading") else "killed early")


def cancelled(addr, tally: Round):
    """A running query cancelled by an operator (`cancel-query`, found by `list-queries`)."""
    client = flight.connect(f"grpc://{addr}")
    reader = client.do_get(flight.Ticket(SLOW.encode()), options())
    time.sleep(0.1)
    queries = json.loads(next(iter(client.do_action(flight.Action("list-queries", b""), options()))).body.to_pybytes())
    for q in queries:
        if q["sql"] == SLOW:
            list(client.do_action(flight.Action("cancel-query", q["id"].encode()), options()))
    try:
        reader.read_all()
        tally.count("finished before the cancel")
    except Exception as e:  # noqa: BLE001
        if "cancel" in str(e).lower():
            tally.count("cancelled")
        else:
            tally.fail(f"cancel: {e}")
    client.close()


def deadline(addr, tally: Round):
    client = flight.connect(f"grpc://{addr}")
    try:
        client.do_get(flight.Ticket(SLOW.encode()), options(timeout=0.2)).read_all()
        tally.count("finished within the deadline")
    except flight.FlightTimedOutError:
        tally.count("timed out")
    except Exception as e:  # noqa: BLE001
        tally.fail(f"deadline: {type(e).__name__}: {e}")
    client.close()


def replace_and_refresh(addr, root: Path, rng: random.Random, tally: Round):
    # The same rows in a new file: answers stay the oracle's, identity changes.
    day = rng.choice(DAYS)
    f = rng.randrange(FILES_PER_DAY)
    seed = DAYS.index(day) * FILES_PER_DAY + f
    write_file(root / "events" / f"day={day}" / f"part-{f}.parquet", seed)
    client = flight.connect(f"grpc://{addr}")
    list(client.do_action(flight.Action("refresh", b""), options()))
    client.close()
    tally.count("replaced and refreshed")


def burst(addr, tally: Round):
    """More slow queries at once than slots plus queue."""
    results = []

    def one():
        client = flight.connect(f"grpc://{addr}")
        try:
            client.do_get(flight.Ticket(SLOW.encode()), options(timeout=20)).read_all()
            results.append("ran")
        except flight.FlightUnavailableError as e:
            results.append("refused" if "server busy" in str(e) else f"unavailable: {e}")
        except flight.FlightTimedOutError:
            results.append("timed out")
        except Exception as e:  # noqa: BLE001
            results.append(f"{type(e).__name__}: {e}")
        client.close()

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if r in ("ran", "refused", "timed out"):
            tally.count(f"burst {r}")
        else:
            tally.fail(f"burst: {r}")


def bad_logins(addr, tally: Round):
    client = flight.connect(f"grpc://{addr}")
    for _ in range(3):
        try:
            client.authenticate_basic_token("soak", "wrong password")
            tally.fail("a wrong password was accepted")
        except flight.FlightUnauthenticatedError:
            tally.count("bad login refused")
        except flight.FlightUnavailableError:
            tally.count("bad login throttled")
    client.close()


def server_state(q: Quiver) -> dict:
    pid = q.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(next(l for l in status.splitlines() if l.startswith(name)).split()[1])  # noqa: E731
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss": field("VmRSS:") * 1024,
        "threads": field("Threads:"),
    }


def wait_idle(q: Quiver, timeout=60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if q.metric("quiver_queries_active") == 0 and q.metric("quiver_memory_pool_reserved_bytes") == 0:
            return 0.0
        time.sleep(0.1)
    return q.metric("quiver_memory_pool_reserved_bytes") or -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, "a few short rounds (CI)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--round-seconds", type=float, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.smoke else 24)
    seconds = args.round_seconds or (3.0 if args.smoke else 10.0)

    work = Path(tempfile.mkdtemp(prefix="quiver-soak-"))
    root = work / "data"
    make_dataset(root)
    expected = oracle(root)
    auth = work / "auth.toml"
    password = subprocess.run([args.quiver, "auth", "hash-password"], input="right password\n", capture_output=True, text=True, check=True).stdout.strip()
    auth.write_text(
        f'[[users]]\nname = "soak"\npassword = "{password}"\n'
        f'[[tokens]]\nname = "soak-client"\nsha256 = "{hashlib.sha256(TOKEN).hexdigest()}"\nadmin = true\n'
    )
    q = Quiver(
        args.quiver, work / "server",
        ["--data-dir", str(root), "--auth-file", str(auth), "--memory-limit", "512MiB",
         "--max-concurrent-queries", "4", "--max-queued-queries", "4", "--queue-timeout", "5s",
         "--refresh-interval", "0s"],
    )
    q.client.close()
    rng = random.Random(7)
    table = []
    failures = []
    try:
        for r in range(rounds):
            tally = Round()
            stop = threading.Event()
            workers = [threading.Thread(target=checked_queries, args=(q.addr, expected, tally, stop)) for _ in range(3)]
            for w in workers:
                w.start()
            started = time.monotonic()
            actions = [
                lambda: bad_logins(q.addr, tally),
                lambda: killed_mid_stream(q.addr, tally),
                lambda: cancelled(q.addr, tally),
                lambda: deadline(q.addr, tally),
                lambda: replace_and_refresh(q.addr, root, rng, tally),
                lambda: burst(q.addr, tally),
            ]
            i = 0
            while time.monotonic() - started < seconds:
                try:
                    actions[i % len(actions)]()
                except Exception as e:  # noqa: BLE001
                    tally.fail(f"action {i % len(actions)}: {type(e).__name__}: {e}")
                i += 1
            stop.set()
            for w in workers:
                w.join()
            if q.proc.poll() is not None:
                failures.append(f"round {r}: the server exited with {q.proc.returncode}")
                break
            left = wait_idle(q)
            state = server_state(q)
            table.append((r, tally.counts, len(tally.unexpected), state, left))
            failures += [f"round {r}: {u}" for u in tally.unexpected[:5]]
            if left:
                failures.append(f"round {r}: the memory pool did not drain ({left:.0f} bytes)")
            print(
                f"round {r:2}: right {tally.counts.get('right', 0):4}  unexpected {len(tally.unexpected)}  "
                f"fds {state['fds']:4}  threads {state['threads']:3}  rss {state['rss'] / 2**20:7.1f} MiB  "
                + " ".join(f"{k}={v}" for k, v in sorted(tally.counts.items()) if k != "right"),
                flush=True,
            )
    finally:
        alive = q.proc.poll() is None
        peak = q.peak_rss() if alive else 0
        q.close()

    if not alive:
        failures.append("the server was not running at the end")
    # Leaks: descriptors return to the first idle round's count; RSS has no upward trend
    # over the later rounds (after the first third: caches and arenas warm up).
    if len(table) >= 3:
        fds = [row[3]["fds"] for row in table]
        if max(fds[1:]) > fds[0] + 4:
            failures.append(f"file descriptors grew: {fds}")
        rss = [row[3]["rss"] for row in table]
        settled = rss[len(rss) // 3:]
        half = len(settled) // 2
        early, late = max(settled[: half or 1]), max(settled[half:])
        if late > early * 1.15 + 32 * 2**20:
            failures.append(f"RSS kept growing: {[round(x / 2**20) for x in rss]} MiB")
    right = sum(row[1].get("right", 0) for row in table)
    print()
    print("| rounds | checked answers right | unexpected | fds first/last | RSS first/last idle (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    if table:
        print(
            f"| {len(table)} x {seconds:g}s | {right} | {sum(row[2] for row in table)} | "
            f"{table[0][3]['fds']}/{table[-1][3]['fds']} | "
            f"{table[0][3]['rss'] / 2**20:.0f}/{table[-1][3]['rss'] / 2**20:.0f} | "
            f"{peak / 2**20:.0f} |"
        )
    totals = {}
    for row in table:
        for k, v in row[1].items():
            totals[k] = totals.get(k, 0) + v
    print("events: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    if right == 0:
        failures.append("no checked answer at all")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
