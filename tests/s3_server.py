"""moto's S3 server on loopback, recording every request it answers: the S3-compatible
store of the S3 table tests (tests/e2e/test_s3.py) and benchmarks (benches/s3.py).

What it counts is counted at the store, in a WSGI layer around moto's own application,
independent of Quiver's metrics.
"""

import socket
import threading

import boto3
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


class _TrackedHandler(MotoRequestHandler):
    """Remembers its connection, so that stopping the server can cut it."""

    def setup(self):
        super().setup()
        self.server.open_connections.add(self.connection)

    def finish(self):
        self.server.open_connections.discard(self.connection)
        super().finish()


class S3Server(ThreadedMotoServer):
    """moto's S3 server on 127.0.0.1, recording every request it answers."""

    def __init__(self, port: int = 0):
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str, int]] = []  # method, path, range, body bytes
        # Cleared while the store "hangs": requests are accepted and read, never answered.
        self.answering = threading.Event()
        self.answering.set()
        self.held = 0  # requests waiting while paused

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ, start_response):
            if not self.answering.is_set():
                with self.lock:
                    self.held += 1
                self.answering.wait()
            body = list(app(environ, start_response))
            with self.lock:
                self.log.append(
                    (
                        environ["REQUEST_METHOD"],
                        environ.get("PATH_INFO", "") + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else ""),
                        environ.get("HTTP_RANGE", ""),
                        sum(len(c) for c in body),
                    )
                )
            return body

        self._server = make_server(self._ip_address, self._port, counted, True, request_handler=_TrackedHandler)
        self._server.open_connections = set()
        self._server_ready_event.set()
        self._server.serve_forever()

    def stop(self) -> None:
        """Stops answering: closes the listening socket and every open connection (moto's
        own `stop` leaves both, so kept-alive connections would go on being served)."""
        server = self._server
        server.shutdown()
        server.server_close()
        for connection in list(server.open_connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()

    def pause(self) -> None:
        """Hangs: connections are still accepted and requests read, but nothing is answered
        until `resume` (a store that is up but stuck, the worst kind of outage)."""
        self.answering.clear()

    def resume(self) -> None:
        self.answering.set()

    def lists(self, since: int = 0) -> int:
        """Listing requests (ListObjectsV2 pages) since `mark()` returned `since`."""
        with self.lock:
            return sum(1 for e in self.log[since:] if e[0] == "GET" and "list-type" in e[1])

    def mark(self) -> int:
        with self.lock:
            return len(self.log)

    def object_gets(self, since: int = 0) -> list[tuple[str, str, str, int]]:
        """GETs of objects (not listings) since `mark()` returned `since`."""
        with self.lock:
            return [e for e in self.log[since:] if e[0] == "GET" and "list-type" not in e[1] and e[1].count("/") > 1]

    def start(self) -> None:
        """Starts (or restarts, on the same port) answering."""
        super().start()
        host, port = self.get_host_and_port()
        # A restart comes back on the same port.
        self._port = port
        self.endpoint = f"http://{host}:{port}"
        self.port = port
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
        )

    def aws_env(self) -> dict[str, str]:
        """The environment that points Quiver (object_store) at this server."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }
