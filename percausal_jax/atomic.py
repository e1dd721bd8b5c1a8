"""Outputs that are never seen half-written, on a local disk or an object store.

* Local paths: everything is written to a temporary sibling and renamed into place; on error the temporary is
  removed and an existing target is left untouched.
* Object stores (``gs://``...) have no rename, but an object appears only when its upload completes. So a file is
  uploaded in one piece, and a directory is assembled locally and uploaded with its *marker* files — the ones a
  reader opens first (``config.json``, ``adapter_config.json``) — last: an interrupted export never looks loadable.
  Replacing an existing remote directory deletes its markers first and its stale files before the new markers go up.

:class:`Mirror` is the workdir side of the same rule: logs are appended to a local file and, for a remote
workdir, uploaded whole (``metrics.jsonl``, TensorBoard event files) at each :meth:`Mirror.sync`.
"""

from __future__ import annotations

import contextlib
import os
import re
import pathlib
import shutil
import tempfile
import time
from typing import Iterator

from percausal_jax import storage
from percausal_jax.storage import PathLike

MARKERS = ("config.json", "adapter_config.json")


@contextlib.contextmanager
def atomic_dir(out: PathLike, markers: tuple[str, ...] = MARKERS) -> Iterator[pathlib.Path]:
    """``with atomic_dir(out) as tmp:`` fill the local directory ``tmp``; on success it becomes ``out``."""
    target = storage.path(out)
    if storage.is_remote(target):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="percausal-upload-"))
        try:
            yield tmp
            _publish_remote(tmp, target, markers)
        except BaseException as e:
            _reraise(e, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    out = pathlib.Path(os.fspath(target)).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise(e, tmp)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _reraise(e: BaseException, where) -> None:
    converted = as_os_error(e, where)
    if converted is e:
        raise e
    raise converted from e


def as_os_error(e: BaseException, where) -> BaseException:
    """``e``, or the :class:`OSError` it reports in words only: writers in Rust (safetensors' ``SafetensorError``)
    say "I/O error: No space left on device (os error 28)" instead of raising one."""
    m = None if isinstance(e, OSError) else _OS_ERROR.search(str(e))
    if m is None:
        return e
    errno_ = int(m.group(1))
    return OSError(errno_, os.strerror(errno_), str(where))


def _local_files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _publish_remote(src: pathlib.Path, target: storage.Path, markers: tuple[str, ...]) -> None:
    names = _local_files(src)
    old = {rel for _, rel in storage._walk(target)} if target.is_dir() else set()
    for rel in sorted(old & set(markers)):  # 1. the old export stops looking loadable
        (target / rel).unlink()
    for rel in names:  # 2. the payload
        if rel not in markers:
            upload_file(src / rel, target / rel)
    for rel in sorted(old - set(names) - set(markers)):  # 3. stale files of the old export
        (target / rel).unlink()
    for rel in names:  # 4. the markers, last
        if rel in markers:
            upload_file(src / rel, target / rel)


def upload_file(src: pathlib.Path, dest: storage.Path) -> None:
    """One local file → one object, in one piece (the object is visible only once the upload completes)."""
    with open(src, "rb") as fin, dest.open("wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


def write_bytes(path: PathLike, data: bytes) -> storage.Path:
    """Writes ``data`` to ``path``: local via a temporary file and ``os.replace``; remote as one upload."""
    target = storage.path(path)
    if storage.is_remote(target):
        target.write_bytes(data)
        return target
    local = pathlib.Path(os.fspath(target))
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_text(path: PathLike, text: str) -> storage.Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w") -> Iterator:
    """``with atomic_file(path) as f:`` stream into a local temporary file; on success it becomes ``path``
    (renamed locally, uploaded whole to an object store); on error nothing is written."""
    target = storage.path(path)
    remote = storage.is_remote(target)
    if remote:
        parent = None
    else:
        parent = pathlib.Path(os.fspath(target)).parent
        parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if remote:
            upload_file(pathlib.Path(tmp), target)
        else:
            os.replace(tmp, os.fspath(target))
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


class Mirror:
    """A local directory standing for ``target``: ``target`` itself when local; for a remote ``target`` a staging
    directory whose files :meth:`sync` uploads whole when they changed. ``pull`` names files fetched from the
    target at start (to append to them, e.g. ``metrics.jsonl`` on resume)."""

    def __init__(self, target: PathLike, pull: tuple[str, ...] = (), min_interval_s: float = 30.0):
        self.target = storage.path(target)
        self.remote = storage.is_remote(self.target)
        self.min_interval_s = min_interval_s
        self._last_sync = time.monotonic()
        self._synced: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = pathlib.Path(os.fspath(self.target))
            self.local.mkdir(parents=True, exist_ok=True)
            return
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="percausal-workdir-"))
        for name in pull:
            if (self.target / name).is_file():
                (self.local / name).parent.mkdir(parents=True, exist_ok=True)
                (self.local / name).write_bytes((self.target / name).read_bytes())
                self._synced[name] = self._signature(self.local / name)

    @staticmethod
    def _signature(p: pathlib.Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_size, st.st_mtime_ns

    def sync(self, force: bool = True) -> None:
        """Uploads every file changed since the last sync (``force=False``: only if ``min_interval_s`` passed)."""
        if not self.remote or (not force and time.monotonic() - self._last_sync < self.min_interval_s):
            return
        for rel in _local_files(self.local):
            sig = self._signature(self.local / rel)
            if self._synced.get(rel) != sig:
                upload_file(self.local / rel, self.target / rel)
                self._synced[rel] = sig
        self._last_sync = time.monotonic()

    def close(self, upload: bool = True) -> None:
        """Final :meth:`sync` (skipped with ``upload=False``: the storage is known to be failing) and clean-up."""
        try:
            if upload:
                self.sync()
        finally:
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)
