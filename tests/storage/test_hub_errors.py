"""Hub download failures say what they are: a hub that cannot be reached (or fails) is a StorageError (exit 3,
"could not download ..."), a repo / revision the hub refuses is a UserError (exit 2). Loopback only: the hub
endpoint is a port on 127.0.0.1, and any connection or name lookup for another host fails the test."""

import http.server
import socket
import threading

import pytest

from percausal_jax import storage
from percausal_jax.errors import StorageError, UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture
def loopback_only(monkeypatch):
    """No socket of this process may reach beyond loopback while the test runs."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and not (isinstance(host, bytes) and host.decode() in LOOPBACK):
            raise AssertionError(f"the test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise AssertionError(f"the test tried to connect to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def online_hub(tmp_path, monkeypatch, loopback_only):
    """huggingface_hub online (HF_HUB_OFFLINE=0), with an empty hub cache in tmp_path; returns a function that
    points it at an endpoint. Its constants are read at import, so they are patched along with the variables."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def point_at(endpoint: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")

    return point_at


def test_unreachable_hub_is_a_storage_error(online_hub):
    with socket.socket() as s:  # a loopback port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    online_hub(f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError) as err:
        storage.resolve_hf_dir("org/tiny", what="model directory", revision="v1")
    msg = str(err.value)
    assert err.value.exit_code == 3
    assert msg.startswith("could not download model directory org/tiny (revision v1) from the Hugging Face hub")
    assert f"127.0.0.1:{port}" in msg and "Connection refused" in msg and "\n" not in msg


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub would for a missing repo / revision, or as a failing server."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        self.seen.append(self.path)
        status, code = 404, "RepoNotFound"
        if "/org/down" in self.path:
            status, code = 503, None
        elif "/org/tiny/revision/nope" in self.path:
            code = "RevisionNotFound"
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("repo,revision,expected,words", [
    ("org/absent", None, UserError, "hub refused it (revision main, repo type model) (no such repo"),
    ("org/tiny", "nope", UserError, "hub refused it (revision nope, repo type model): RevisionNotFoundError"),
    ("org/down", None, StorageError, "could not download model directory org/down (revision main)"),
])
def test_hub_answers_are_sorted_into_user_and_storage_errors(online_hub, repo, revision, expected, words):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online_hub(f"http://127.0.0.1:{server.server_address[1]}")
        _Hub.seen.clear()
        with pytest.raises(UserError) as err:
            storage.resolve_hf_dir(repo, what="model directory", revision=revision)
    finally:
        server.shutdown()
        server.server_close()
    assert type(err.value) is expected and err.value.exit_code == (3 if expected is StorageError else 2)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert any(repo in p for p in _Hub.seen)  # the answer came from this server


def test_offline_and_not_cached_stays_a_user_error(tmp_path, monkeypatch, loopback_only):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as err:
        storage.resolve_hf_dir("org/absent", what="model")
    assert type(err.value) is UserError and "HF_HUB_OFFLINE is set" in str(err.value)


def test_a_bug_keeps_its_traceback(online_hub, monkeypatch):
    """Anything that is not a hub or network failure is re-raised as is (a bug must look like a bug)."""
    import huggingface_hub

    def broken(*args, **kwargs):
        raise TypeError("snapshot_download() got an unexpected keyword argument")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(TypeError):
        storage.resolve_hf_dir("org/tiny", what="model")
