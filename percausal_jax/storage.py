"""Where files live: one path type for local disks and object stores, and local copies of remote inputs.

Every path a user gives (``--input``, ``--out``, ``--workdir``, ``--model``, ``data.train``, ``model.path``, ...)
goes through :func:`path`, which returns an ``etils.epath.Path``: a local path, or a ``gs://`` URL (and any other
protocol fsspec knows, e.g. ``s3://`` with ``s3fs`` installed). Writing outputs safely (object stores have no
rename) is :mod:`percausal_jax.atomic`'s job; this module is about reading and naming.

Some readers need a real local file (safetensors memory-maps, transformers loads tokenizers from a directory, the
ArrayRecord reader): :func:`local_dir` / :func:`local_file` copy a remote directory or file into
``$PERCAUSAL_CACHE/remote/<protocol>/<bucket>/<path>`` and return the local copy. The copy is exact: each call
lists the remote afresh, deletes local files the remote no longer has, and reuses a file only if it was fetched at
the object version the listing names (GCS generation, else content hash / ETag, else size + mtime); see
:func:`local_dir` for the order of the steps and what concurrent processes see. :func:`resolve_hf_dir` adds
Hugging Face hub ids (``org/name``), downloaded with ``huggingface_hub`` (which honours ``HF_HUB_OFFLINE`` and its
cache): a repo, revision or access the hub refuses is a :class:`UserError` (exit 2); a hub that cannot be reached
(connection, timeout, server error) is a :class:`StorageError` (exit 3, "could not download ...").

Emulators: ``STORAGE_EMULATOR_HOST`` (gcsfs / google-cloud-storage) is honoured as is; when it is set and
``TENSORSTORE_GCS_HTTP_URL`` (tensorstore, Orbax's array writer) is not, the latter is set to the same server, and
gcsfs' zonal/hierarchical-bucket probe (which needs real credentials) is switched off. Without credentials both
clients go anonymous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import threading
import time
from typing import Iterable, Iterator, Union

from percausal_jax.errors import UserError


def _configure_emulators() -> None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_configure_emulators()  # before gcsfs or tensorstore read their environment
# gcsfs logs "out of retries" as an ERROR with a traceback before it raises; the raise reaches the user (as one
# StorageError line where a command writes, see training.checkpoints.storage_errors), the traceback need not
import logging  # noqa: E402

logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

from etils import epath  # noqa: E402

PathLike = Union[str, os.PathLike, epath.Path]
Path = epath.Path


def is_remote(p: PathLike) -> bool:
    """True for URLs of an object store / remote filesystem (``gs://b/x``), False for local paths."""
    s = os.fspath(p) if not isinstance(p, str) else p
    return "://" in s and not s.startswith("file://")


def path(p: PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``: ``~`` expanded for local paths; URLs kept verbatim (``Path("gs://b")`` would
    collapse the double slash)."""
    s = os.fspath(p)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PERCAUSAL_CACHE", "~/.cache/percausal")).expanduser()


def _cache_path(url: str) -> pathlib.Path:
    protocol, rest = url.split("://", 1)
    return cache_root() / "remote" / protocol / rest.strip("/")


# Files a reader opens first (as atomic.MARKERS, which imports this module): a refresh removes a changed marker
# before anything else and fetches it last, so a half-refreshed copy does not look loadable.
_MARKERS = ("config.json", "adapter_config.json")
_PART_MAX_AGE_S = 3600.0  # a temporary of another process's download not written to for this long is abandoned


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _version_of(info: dict) -> str:
    """What identifies this content of a remote object, from its listing / ``info`` entry: its generation (GCS)
    or content hash / ETag, else size and modification time. A rewrite of the same size changes it."""
    for key in ("generation", "md5Hash", "crc32c", "ETag", "etag"):
        if info.get(key):
            return f"{key}={info[key]}"
    return f"size={info.get('size')} mtime={info.get('mtime') or info.get('updated') or info.get('LastModified')}"


def _stamp(dest: pathlib.Path) -> pathlib.Path:
    """Where the object version of the cached copy ``dest`` is recorded."""
    return dest.with_name(f".{dest.name}.version")


def _is_current(dest: pathlib.Path, version: str) -> bool:
    stamp = _stamp(dest)
    try:
        return dest.is_file() and stamp.read_text() == version
    except OSError:
        return False


def _is_bookkeeping(name: str) -> bool:
    """A version stamp or a download in progress (not a copy of a remote file)."""
    return name.startswith(".") and (name.endswith(".version") or ".part-" in name)


def _fetch(fs, rpath: str, dest: pathlib.Path, version: str) -> None:
    """Copies the remote object ``rpath`` to ``dest`` unless the copy there was fetched at ``version`` (recorded
    next to it); via a temporary of this process + rename, so a reader never opens a half-written file. ``version``
    comes from a listing made just before: should the object be rewritten in between, the copy holds the newer
    content (one version of it: fsspec's ``get_file``) under the older stamp, and the next refresh fetches it
    again; never older content under a newer stamp."""
    if _is_current(dest, version):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{threading.get_ident()}")
    try:
        fs.get_file(rpath, os.fspath(tmp))
        _stamp(dest).unlink(missing_ok=True)  # never a stamp that vouches for the previous content
        os.replace(tmp, dest)
        _stamp(dest).write_text(version)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _cache_lock(dest: pathlib.Path) -> Iterator[None]:
    """Serializes refreshes of one cached copy across the processes of this machine (``flock`` on a file under
    ``$PERCAUSAL_CACHE/locks``; released by the kernel if the holder dies). Where the filesystem has no locks the
    refresh goes ahead unlocked (each file is still replaced by rename)."""
    import fcntl
    import hashlib

    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{hashlib.sha256(os.fspath(dest).encode()).hexdigest()[:32]}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _listing(fs, root: str) -> dict[str, str]:
    """``{relative name: object version}`` of every object under the remote directory ``root``, listed now."""
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # a listing cached by this process may predate another machine's export
    out = {}
    for name, info in fs.find(root, detail=True).items():
        if info.get("type", "file") != "file" or not name.startswith(root + "/"):
            continue
        rel = name[len(root) + 1:]
        if rel and not rel.endswith("/"):
            out[rel] = _version_of(info)
    return out


def _sync(fs, root: str, dest: pathlib.Path, include: tuple[str, ...] | None) -> bool:
    """Makes ``dest`` the remote directory ``root`` (its files matching ``include``). False when ``root`` has no
    files (not a directory)."""
    listing = _listing(fs, root)
    if not listing:
        return False
    wanted = {rel: v for rel, v in listing.items()
              if include is None or any(pathlib.PurePath(rel).match(g) for g in include)}
    local = sorted(p for p in dest.rglob("*") if p.is_file() or p.is_symlink()) if dest.is_dir() else []
    doomed, bookkeeping = [], []
    for p in local:
        rel = p.relative_to(dest).as_posix()
        if rel in listing:
            # a copy of an older version: replaced below if wanted, else deleted now; a marker leaves first
            if not _is_current(p, listing[rel]) and (rel not in wanted or p.name in _MARKERS):
                doomed.append(p)
        elif _is_bookkeeping(p.name):
            bookkeeping.append(p)
        else:
            doomed.append(p)  # the remote no longer has it
    # 1. markers, then the other files that are gone or stale remotely (stamp first: a file without one is stale)
    for p in sorted(doomed, key=lambda p: (p.name not in _MARKERS, os.fspath(p))):
        _stamp(p).unlink(missing_ok=True)
        p.unlink(missing_ok=True)
    # 2. stamps whose file is gone; temporaries of downloads that died (another process's live one is kept)
    now = time.time()
    for p in bookkeeping:
        with contextlib.suppress(OSError):
            if p.name.endswith(".version"):
                owner = p.with_name(p.name[1:-len(".version")])
                if not owner.is_file():
                    p.unlink()
            elif now - p.stat().st_mtime > _PART_MAX_AGE_S:
                p.unlink()
    # 3. directories left empty that the remote does not have
    prefixes = {str(pathlib.PurePosixPath(rel).parents[i]) for rel in listing
                for i in range(len(pathlib.PurePosixPath(rel).parents) - 1)}
    if dest.is_dir():
        for d in sorted((p for p in dest.rglob("*") if p.is_dir() and not p.is_symlink()),
                        key=lambda p: -len(p.parts)):
            if d.relative_to(dest).as_posix() not in prefixes:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty
    # 4. the payload, then the markers
    for rel in sorted(wanted, key=lambda r: (pathlib.PurePosixPath(r).name in _MARKERS, r)):
        _fetch(fs, f"{root.rstrip('/')}/{rel}", dest / rel, wanted[rel])
    return True


def _walk(root: epath.Path) -> Iterable[tuple[epath.Path, str]]:
    """Files under ``root`` as ``(path, relative name)``."""
    for p in root.iterdir():
        if p.is_dir():
            for child, rel in _walk(p):
                yield child, f"{p.name}/{rel}"
        else:
            yield p, p.name


def _existing(src: epath.Path, exists: bool, p: PathLike, what: str) -> pathlib.Path:
    if not exists:
        raise UserError(f"{p}: no such {what}")
    return pathlib.Path(os.fspath(src))


def local_file(p: PathLike, what: str = "file") -> pathlib.Path:
    """A local path holding ``p``'s bytes (``p`` itself when local; for a remote file a cached copy, fetched again
    when the object's version changed)."""
    src = path(p)
    if not is_remote(src):
        return _existing(src, src.is_file(), p, what)
    dest = _cache_path(os.fspath(src))
    fs, rpath = _fs(os.fspath(src))
    with _cache_lock(dest):
        try:
            fs.invalidate_cache(rpath)
            info = fs.info(rpath)
        except FileNotFoundError:
            info = None
        if info is None or info.get("type", "file") != "file":
            raise UserError(f"{p}: no such {what}")
        _fetch(fs, rpath, dest, _version_of(info))
    return dest


def local_dir(p: PathLike, what: str = "directory", include: tuple[str, ...] | None = None) -> pathlib.Path:
    """A local directory holding ``p``'s files: ``p`` itself when local; for a remote directory a cached copy that
    is made the remote listing on every call. ``include``: only names matching one of these globs are fetched.

    Each call, holding a lock on this copy (other processes of this machine wait rather than fetch the same files):
    lists the remote directory afresh; deletes local files it does not list (and local files it lists at another
    version, when ``include`` leaves them out), a changed marker (``config.json``, ``adapter_config.json``) first;
    fetches the files missing or at another version (temporary + rename), markers last. A file that vanishes
    between the listing and its fetch (a concurrent re-export) makes it list again (three tries).

    A process that read this copy earlier and is still reading it while another refresh replaces files sees what
    POSIX gives: files it has open or memory-mapped keep their old content; a file it opens afterwards is the new
    one, or gone (an error rather than a silent mix of two exports)."""
    src = path(p)
    if not is_remote(src):
        return _existing(src, src.is_dir(), p, what)
    dest = _cache_path(os.fspath(src))
    fs, root = _fs(os.fspath(src))
    with _cache_lock(dest):
        for attempt in range(3):
            try:
                if not _sync(fs, root, dest, include):
                    raise UserError(f"{p}: no such {what}")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
    return dest


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A model / tokenizer / dataset directory as named by the user, and where its files are on this machine."""

    name: str  # as the user gave it (hub id, local path or URL): what exports record
    local: pathlib.Path  # a local directory with the files
    revision: str | None = None  # hub commit of the snapshot, when it came from the hub


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (one slash, no scheme, not a path that exists)."""
    return (name.count("/") == 1 and "://" not in name and not name.startswith((".", "/", "~"))
            and not os.path.exists(os.path.expanduser(name)))


def resolve_hf_dir(name: PathLike, *, what: str, allow_patterns: list[str] | None = None,
                   repo_type: str = "model", revision: str | None = None) -> Resolved:
    """A local directory, a remote directory (``gs://...``, copied to the cache) or a hub id (downloaded with
    ``huggingface_hub.snapshot_download``; with ``HF_HUB_OFFLINE=1`` only the local hub cache is used)."""
    s = os.fspath(name)
    if is_remote(s):
        return Resolved(s, local_dir(s, what, tuple(allow_patterns) if allow_patterns else None))
    p = pathlib.Path(os.path.expanduser(s))
    if p.is_dir():
        return Resolved(s, p)
    if not looks_like_hub_id(s):
        raise UserError(f"{s}: no such {what} (expected a local directory, a gs:// URL or a hub id org/name)")
    from huggingface_hub import snapshot_download

    from percausal_jax.hub_errors import hub_failure

    try:
        local = pathlib.Path(snapshot_download(s, repo_type=repo_type, revision=revision,
                                               allow_patterns=allow_patterns))
    except Exception as e:  # noqa: BLE001 - sorted by hub_failure; anything it does not know is re-raised
        failure = hub_failure(e, s, what, repo_type, revision)
        if failure is None:
            raise
        raise failure from None
    rev = local.name if local.parent.name == "snapshots" else None
    return Resolved(s, local, rev)


TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "chat_template*", "vocab*", "merges.txt",
                      "added_tokens.json", "*.model", "config.json", "generation_config.json"]
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "merges.txt", "vocab*"]


def load_tokenizer(name: PathLike, what: str = "tokenizer"):
    """A transformers tokenizer from a local dir, a ``gs://`` dir or a hub id (never ``trust_remote_code``)."""
    from transformers import AutoTokenizer

    resolved = resolve_hf_dir(name, what=what, allow_patterns=TOKENIZER_PATTERNS)
    try:
        return AutoTokenizer.from_pretrained(str(resolved.local), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{name}: cannot load a tokenizer ({str(e).splitlines()[0]}); expected a Hugging Face "
                        "tokenizer directory or hub id") from None
