"""One writer per workdir: ``WORKDIR/.lock``, taken before a run writes anything and released when it ends.

The lock is a small JSON object naming its holder (host, pid, start time, a random nonce) and a heartbeat. It is
created atomically, so of two runs started together exactly one gets it:

* local disks: the record is written to a temporary file and hard-linked to ``.lock`` (``link`` fails when the
  name exists, and a reader never sees a half-written record);
* ``gs://`` (gcsfs, as :mod:`percausal_jax.storage`): an upload with the precondition ``ifGenerationMatch=0``
  (create only if absent); replacing or deleting it is conditional on the generation that was read.

A lock whose holder is gone is taken over with a warning: on the same host when its pid no longer runs (or runs
another program: the pid's start time is recorded), on any host when its heartbeat is older than
:data:`LEASE_S`. A background thread refreshes the heartbeat every :data:`HEARTBEAT_S` (one small write), so a
live run's lease never expires however long it compiles, restores or evaluates; a run whose lock was taken over
meanwhile stops at its next :meth:`WorkdirLock.check`. A live holder's lock is an error (exit 2) naming it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Iterator

from percausal_jax import storage
from percausal_jax.errors import UserError

LOCK_NAME = ".lock"
LEASE_S = 600.0  # a holder on another host (or shared storage) counts as dead once its heartbeat is this old
HEARTBEAT_S = 60.0
log = logging.getLogger(__name__)


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), None where unknown."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    current = _proc_start(pid)
    return start is None or current is None or current == start


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------- backends
#
# Each stores one small object and offers: create-if-absent, read (bytes and a token identifying that version),
# replace-if-unchanged and delete-if-unchanged. ``token`` is the content (local) or the object generation (gs://);
# create and replace return the new version's token, or None when the name exists / the version changed.


class _LocalFile:
    """A lock file on a local (or NFS) disk. Conditional replace / delete run under a short-lived guard file
    (``.lock.guard``, O_CREAT|O_EXCL), so two runs taking over the same stale lock cannot both succeed."""

    GUARD_STALE_S = 30.0

    def __init__(self, path: pathlib.Path):
        self.path = path

    def create(self, data: bytes):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._durable_copy(data)
        try:
            os.link(tmp, self.path)
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def _durable_copy(self, data: bytes) -> str:
        """A temporary file next to the lock holding ``data``, on disk (fsync) before it is linked or renamed."""
        fd, tmp = tempfile.mkstemp(prefix=".lock.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read(self):
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        guard = self.path.with_name(self.path.name + ".guard")
        deadline = time.monotonic() + 2 * self.GUARD_STALE_S
        while True:
            try:
                os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - guard.stat().st_mtime > self.GUARD_STALE_S:  # its owner died inside
                        guard.unlink()
                        continue
                if time.monotonic() > deadline:
                    raise UserError(f"{guard}: held for over {self.GUARD_STALE_S:.0f} s; delete it if no run is "
                                    "using this workdir") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            guard.unlink(missing_ok=True)

    def replace(self, data: bytes, token):
        with self._guard():
            current = self.read()
            if current is None or current[1] != token:
                return None
            os.replace(self._durable_copy(data), self.path)
            return data

    def delete(self, token) -> bool:
        with self._guard():
            current = self.read()
            if current is None or current[1] != token:
                return False
            self.path.unlink()
            return True


class _GcsObject:
    """A lock object on GCS through gcsfs: JSON-API uploads and deletes with generation preconditions."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, path = fsspec.core.url_to_fs(url)
        self.bucket, _, self.key = path.partition("/")

    def _upload(self, data: bytes, generation: str):
        from urllib.parse import quote

        meta = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n" + meta.encode()
                + b"\n--==0==\nContent-Type: application/json\n\n" + data + b"\n--==0==--")
        try:
            out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
                               uploadType="multipart", ifGenerationMatch=generation, data=body, json_out=True,
                               headers={"Content-Type": 'multipart/related; boundary="==0=="'})
        except FileExistsError:  # 412: the precondition failed
            return None
        finally:
            self.fs.invalidate_cache(self.url)
        return out["generation"]

    def create(self, data: bytes):
        return self._upload(data, "0")

    def read(self):
        for _ in range(5):  # the content and the generation of one version (retried if replaced in between)
            try:
                meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
                _, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
                again = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            except FileNotFoundError:
                return None
            if meta["generation"] == again["generation"]:
                return data, meta["generation"]
        raise UserError(f"{self.url}: the lock object keeps changing while being read")

    def replace(self, data: bytes, token):
        return self._upload(data, str(token))

    def delete(self, token) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(token))
        except (FileNotFoundError, FileExistsError):
            return False
        finally:
            self.fs.invalidate_cache(self.url)
        return True


# --------------------------------------------------------------------------------------------------------- lock


def describe(holder: dict) -> str:
    """``host H, pid P, started T`` of a lock record."""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


class WorkdirLock:
    """``with WorkdirLock(workdir):`` the workdir is this process's until the block ends (see the module doc)."""

    def __init__(self, workdir: storage.PathLike, command: str = "train", lease_s: float = LEASE_S,
                 heartbeat_s: float = HEARTBEAT_S):
        root = storage.path(workdir)
        self.workdir = workdir
        self.remote = storage.is_remote(root)
        self.path = root / LOCK_NAME
        self.backend = _GcsObject(os.fspath(self.path)) if self.remote else \
            _LocalFile(pathlib.Path(os.fspath(self.path)).resolve())
        self.lease_s, self.heartbeat_s, self.command = lease_s, heartbeat_s, command
        self.record: dict | None = None
        self.token = None
        self.lost: str | None = None  # set by the heartbeat thread when another run took the lock
        self._created_dir: pathlib.Path | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def _new_record(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
                "started": _iso(now), "heartbeat": now, "lease_s": self.lease_s, "command": self.command,
                "nonce": uuid.uuid4().hex}

    @staticmethod
    def _encode(record: dict) -> bytes:
        return (json.dumps(record) + "\n").encode()

    def _dead(self, holder: dict) -> str | None:
        """Why ``holder`` is gone (None: it may be alive)."""
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"], holder.get("pid_start")):
                return f"its process {holder['pid']} is no longer running on this host"
            return None
        age = time.time() - float(holder.get("heartbeat", 0.0))
        lease = float(holder.get("lease_s", self.lease_s))
        return f"its last heartbeat is {age:.0f} s old (lease {lease:.0f} s)" if age > lease else None

    def acquire(self) -> "WorkdirLock":
        if not self.remote:
            parent = pathlib.Path(os.fspath(self.path)).resolve().parent
            missing = parent
            while not missing.parent.exists():
                missing = missing.parent
            self._created_dir = missing if not missing.exists() else None
        for _ in range(20):  # create; or take over a dead holder's lock; retried when another run changes it
            record = self._new_record()
            token = self.backend.create(self._encode(record))
            if token is not None:
                self.record, self.token = record, token
                break
            current = self.backend.read()
            if current is None:
                continue  # released in between
            data, token = current
            try:
                holder = json.loads(data)
                assert isinstance(holder, dict)
            except (ValueError, AssertionError):
                raise UserError(f"{self.path}: not a lock record ({data[:60]!r}); delete it if no run is using "
                                f"{self.workdir}") from None
            why = self._dead(holder)
            if why is None:
                age = time.time() - float(holder.get("heartbeat", 0.0))
                raise UserError(f"{self.workdir}: in use by another run ({describe(holder)}, heartbeat {age:.0f} s "
                                f"ago; lock {self.path}); wait for it to end or use another --workdir")
            new = self.backend.replace(self._encode(record), token)
            if new is not None:
                print(f"warning: {self.workdir}: taking over the lock of a dead run ({describe(holder)}): {why}",
                      file=sys.stderr)
                self.record, self.token = record, new
                break
        else:
            raise UserError(f"{self.path}: could not take the lock (it kept changing); is another run starting?")
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - storage hiccups: the next beat retries; the lease is long
                log.warning("%s: lock heartbeat failed (%s: %s)", self.path, type(e).__name__, e)

    def refresh(self) -> None:
        """Writes a new heartbeat (if the lock is still this run's; else records who took it in :attr:`lost`)."""
        with self._mutex:
            if self.record is None or self.lost:
                return
            record = {**self.record, "heartbeat": time.time()}
            new = self.backend.replace(self._encode(record), self.token)
            if new is not None:
                self.record, self.token = record, new
                return
            current = self.backend.read()
            holder = json.loads(current[0]) if current else {}
            self.lost = describe(holder) if current else "nobody (the lock file was deleted)"

    def check(self) -> None:
        """Raises when another run has taken this workdir over (this run must stop writing to it)."""
        if self.lost:
            raise UserError(f"{self.workdir}: the workdir lock was taken over by another run ({self.lost}); "
                            "stopping so that only one run writes it")

    def abandon(self) -> None:
        """Stops the heartbeat and leaves the lock file in place (the storage is failing: a delete would only
        retry); the next run on this workdir takes it over, as from any dead run."""
        self._stop.set()
        with self._mutex:
            self.record = None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self.record is not None and not self.lost:
                self.backend.delete(self.token)
            self.record = None
        if self._created_dir is not None:  # a run that failed before writing leaves no empty workdir behind
            for d in [pathlib.Path(os.fspath(self.path)).resolve().parent, *pathlib.Path(
                    os.fspath(self.path)).resolve().parent.parents]:
                with contextlib.suppress(OSError):
                    d.rmdir()
                if d == self._created_dir:
                    break

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(workdir: storage.PathLike) -> dict | None:
    """The lock record of ``workdir`` (None when unlocked)."""
    p = storage.path(workdir) / LOCK_NAME
    backend = _GcsObject(os.fspath(p)) if storage.is_remote(p) else _LocalFile(pathlib.Path(os.fspath(p)))
    current = backend.read()
    return None if current is None else json.loads(current[0])
