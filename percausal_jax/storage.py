"""Where files live: one path type for local disks and object stores, and local copies of remote inputs.

Every path a user gives (``--input``, ``--out``, ``--workdir``, ``--model``, ``data.train``, ``model.path``, ...)
goes through :func:`path`, which returns an ``etils.epath.Path``: a local path, or a ``gs://`` URL (and any other
protocol fsspec knows, e.g. ``s3://`` with ``s3fs`` installed). Writing outputs safely (object stores have no
rename) is :mod:`percausal_jax.atomic`'s job; this module is about reading and naming.

Some readers need a real local file (safetensors memory-maps, transformers loads tokenizers from a directory, the
ArrayRecord reader): :func:`local_dir` / :func:`local_file` copy a remote directory or file into
``$PERCAUSAL_CACHE/remote/<protocol>/<bucket>/<path>`` once (files whose size matches are not fetched again) and
return the local copy. :func:`resolve_hf_dir` adds Hugging Face hub ids (``org/name``), downloaded with
``huggingface_hub`` (which honours ``HF_HUB_OFFLINE`` and its cache).

Emulators: ``STORAGE_EMULATOR_HOST`` (gcsfs / google-cloud-storage) is honoured as is; when it is set and
``TENSORSTORE_GCS_HTTP_URL`` (tensorstore, Orbax's array writer) is not, the latter is set to the same server, and
gcsfs' zonal/hierarchical-bucket probe (which needs real credentials) is switched off. Without credentials both
clients go anonymous.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import Iterable, Union

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


def _version(src: epath.Path) -> str:
    """What identifies this content of a remote object: its generation (GCS) or content hash / ETag, else size and
    modification time. A rewrite of the same size changes it (the size alone would not)."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(os.fspath(src))
    info = fs.info(p)
    for key in ("generation", "md5Hash", "crc32c", "ETag", "etag"):
        if info.get(key):
            return f"{key}={info[key]}"
    return f"size={info.get('size')} mtime={info.get('mtime') or info.get('updated') or info.get('LastModified')}"


def _fetch(src: epath.Path, dest: pathlib.Path) -> None:
    """Copies one remote file to ``dest`` unless the copy there is of the same object version (``_version``,
    recorded next to it); via a temporary + rename."""
    version = _version(src)
    stamp = dest.with_name(f".{dest.name}.version")
    if dest.is_file() and stamp.is_file() and stamp.read_text() == version:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        with src.open("rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=16 << 20)
        stamp.unlink(missing_ok=True)  # never a stamp that vouches for the previous content
        os.replace(tmp, dest)
        stamp.write_text(version)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _walk(root: epath.Path) -> Iterable[tuple[epath.Path, str]]:
    """Files under ``root`` as ``(path, relative name)``."""
    for p in root.iterdir():
        if p.is_dir():
            for child, rel in _walk(p):
                yield child, f"{p.name}/{rel}"
        else:
            yield p, p.name


def local_file(p: PathLike, what: str = "file") -> pathlib.Path:
    """A local path holding ``p``'s bytes (``p`` itself when local; a cached copy of a remote file)."""
    src = path(p)
    if not src.is_file():
        raise UserError(f"{p}: no such {what}")
    if not is_remote(src):
        return pathlib.Path(os.fspath(src))
    dest = _cache_path(os.fspath(src))
    _fetch(src, dest)
    return dest


def local_dir(p: PathLike, what: str = "directory", include: tuple[str, ...] | None = None) -> pathlib.Path:
    """A local directory holding ``p``'s files (``p`` itself when local; for a remote directory a cached copy,
    refreshed file by file). ``include``: only names matching one of these globs are copied."""
    src = path(p)
    if not src.is_dir():
        raise UserError(f"{p}: no such {what}")
    if not is_remote(src):
        return pathlib.Path(os.fspath(src))
    dest = _cache_path(os.fspath(src))
    for f, rel in _walk(src):
        if include is None or any(pathlib.PurePath(rel).match(g) for g in include):
            _fetch(f, dest / rel)
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

    try:
        local = pathlib.Path(snapshot_download(s, repo_type=repo_type, revision=revision,
                                               allow_patterns=allow_patterns))
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, missing repo, network) is the user's to fix
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set: only the local hub cache is searched)" if offline else ""
        raise UserError(f"{s}: not a local {what}, and the hub download failed{hint}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
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
