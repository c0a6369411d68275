"""The one way tests and benchmarks start `quiver serve`: on loopback port 0, with its
metrics endpoint on its own port 0, the bound addresses read back from the address
files it writes once it accepts connections, its log kept in a file.

Used by tests/e2e (conftest.Server) and benches/ (harness.Quiver, soak, transport).
"""

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

REPO = Path(__file__).resolve().parents[1]


def quiver_binary() -> Path:
    """$QUIVER_BIN, or the release binary in the cargo target directory."""
    if "QUIVER_BIN" in os.environ:
        return Path(os.environ["QUIVER_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "quiver"


class QuiverProcess:
    """`quiver serve ARGS`, started and waited for; `client` is a pyarrow Flight client
    (plaintext) unless `connect` is false."""

    def __init__(
        self,
        args: list[str],
        workdir: Path,
        connect: bool = True,
        binary: str | os.PathLike | None = None,
        start_timeout: float = 600,
        env: dict[str, str] | None = None,
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        self.addr_file = workdir / "addr"
        self.metrics_addr_file = workdir / "metrics-addr"
        for f in (self.addr_file, self.metrics_addr_file):
            f.unlink(missing_ok=True)
        self.log = open(workdir / "server.log", "w+")
        self.proc = subprocess.Popen(
            [
                str(binary or quiver_binary()), "serve",
                "--listen", "127.0.0.1:0", "--listen-addr-file", str(self.addr_file),
                # Every server gets its own metrics port: none share (or fight over) 9464.
                "--metrics-listen", "127.0.0.1:0", "--metrics-addr-file", str(self.metrics_addr_file),
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # Extra variables on top of ours (the AWS settings of S3 tests).
            env={**os.environ, **env} if env else None,
        )
        deadline = time.monotonic() + start_timeout
        while not self.addr_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"quiver exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"quiver did not start:\n{self.logs()}")
            time.sleep(0.05)
        self.addr = self.addr_file.read_text().strip()
        self.port = int(self.addr.rsplit(":", 1)[1])
        # Written before the Flight address file.
        self.metrics_addr = self.metrics_addr_file.read_text().strip()
        self.client = flight.connect(f"grpc://{self.addr}") if connect else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def http_get(self, path: str) -> tuple[int, str]:
        """Status and body of GET `path` on the metrics endpoint."""
        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape_text(self) -> str:
        status, text = self.http_get("/metrics")
        assert status == 200, text
        return text

    def query(self, sql: str) -> pa.Table:
        return self.client.do_get(flight.Ticket(sql.encode())).read_all()

    def peak_rss(self) -> int:
        """The server's peak resident set (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise KeyError("VmHWM")

    def stop(self, timeout: float = 20):
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.client is not None:
            self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self.log.close()
