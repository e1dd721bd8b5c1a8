"""Orbax checkpoints of a run: the train state, the Grain iterator state, and a JSON item with the config and the
parameter layout. Async saves, keep-N, restore onto any mesh from an abstract target, fallback to an older step when
the newest cannot be read, and a clear error when the layout does not match.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import sys

import grain
import jax
import orbax.checkpoint as ocp

from percausal_jax import storage
from percausal_jax.errors import StorageError, UserError
from percausal_jax.training import processes

ITEMS = ("state", "iter", "meta")
# Keys of the meta item that must match between the checkpoint and the run restoring it.
LAYOUT_KEYS = ("model_type", "num_params", "scan_layers", "param_dtype", "lora_rank", "lora_quantize_base",
               "objective", "optimizer")
LAYOUT_DEFAULTS = {"lora_quantize_base": "none"}  # what checkpoints written before a key existed had
log = logging.getLogger(__name__)
# tensorstore (Orbax's array writer) retries a failing GCS request 32 times, up to 32 s apart (~15 min) by default;
# bounded here so that a storage outage fails the save in about a minute. gcsfs (the small files) retries 6 times.
RETRIES_ENV = "PERCAUSAL_STORAGE_RETRIES"


def _bound_gcs_retries() -> None:
    raw = os.environ.get(RETRIES_ENV, "6")
    try:
        n = int(raw)
        assert n >= 0
    except (ValueError, AssertionError):
        raise UserError(f"{RETRIES_ENV}={raw!r}: expected an integer >= 0 (retries of a failing storage request)")
    from orbax.checkpoint._src.serialization import tensorstore_utils  # the contexts every Orbax save opens

    policy = {"max_retries": n, "initial_delay": "1s", "max_delay": "16s"}
    for context in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
        context["gcs_request_retries"] = policy


RESUME_HINT = ("the last committed checkpoint is kept: re-run the same command once the storage is back (or has "
               "room) to resume from it")


@contextlib.contextmanager
def storage_errors(what: str, where, hint: str = RESUME_HINT):
    """A failure of the storage inside the block (disk full, no permission, bucket unreachable after retries:
    :func:`storage_cause` finds one) becomes one :class:`StorageError` line naming ``what`` and ``where``, then
    ``hint``; committed checkpoints are untouched. Anything else (a bug: TypeError, KeyError, a ValueError with no
    storage cause...) propagates as itself, with its traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if storage_cause(e) is None:
            raise
        detail = (str(e).strip().splitlines() or [""])[0]
        if len(detail) > 240:  # tensorstore's messages name every layer and spec; the errno is named up front
            detail = f"{detail[:80]} … {detail[-150:]}"
        cause = os_error_text(e)
        cause = f"{cause}; " if cause else ""
        raise StorageError(f"{where}: {what} failed ({cause}{type(e).__name__}: {detail}); {hint}") from e


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
# Clients of the object store and their HTTP stacks: any exception type of theirs is a transport/auth failure.
_TRANSPORT_MODULES = ("aiohttp", "gcsfs", "google.auth", "google.api_core", "google.resumable_media",
                      "google.cloud.storage", "requests", "urllib3")
# tensorstore (Orbax's array writer) raises ValueError & co. whose text starts with an absl status; a request to
# the object store that failed (after its retries) has one of these statuses and names the HTTP / GCS layer.
_TRANSPORT_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|PERMISSION_DENIED|"
                               r"UNAUTHENTICATED|ABORTED|INTERNAL|UNKNOWN|DATA_LOSS|CANCELLED)\b")
_TRANSPORT_LAYER = re.compile(r"CURL|HTTP|https?://|gs://|\bgcs|GCS|kvstore/gcs")


# A programming error raised while another exception was being handled (implicit ``__context__``) is a bug in the
# handler, whatever it was handling; only an explicit ``raise ... from storage_error`` carries the cause over.
_BUG_TYPES = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError, ImportError,
              NotImplementedError, RecursionError, ZeroDivisionError)


def _chain(e: BaseException):
    """``e``, its causes, contexts (not those of a programming error: see ``_BUG_TYPES``) and the members of
    exception groups, each once."""
    seen, todo = set(), collections.deque([e])
    while todo:
        e = todo.popleft()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        context = None if e.__suppress_context__ or isinstance(e, _BUG_TYPES) else e.__context__
        todo.extend([e.__cause__, context, *getattr(e, "exceptions", ())])


def _transport_type(cls: type) -> bool:
    return any(c.__module__ == m or c.__module__.startswith(m + ".") for c in cls.__mro__ for m in _TRANSPORT_MODULES)


def storage_cause(e: BaseException) -> BaseException | None:
    """The exception in ``e``'s chain that says the storage failed, or None (then ``e`` is not a storage error):
    an :class:`OSError` (ENOSPC, EFBIG, EACCES, a refused connection, a timeout...), an error of the object store's
    client stack (aiohttp, gcsfs, google-auth, requests, urllib3), or a tensorstore error carrying an
    ``os_error_code`` or a failed GCS/HTTP request."""
    for x in _chain(e):
        if isinstance(x, OSError) or _transport_type(type(x)):
            return x
        text = str(x)
        if _OS_ERROR_CODE.search(text) or (_TRANSPORT_STATUS.search(text) and _TRANSPORT_LAYER.search(text)):
            return x
    return None


def os_error_text(e: BaseException) -> str | None:
    """The operating system's words for the error behind ``e`` ("File too large", "No space left on device"):
    from an :class:`OSError` in its chain (:func:`_chain`), or from the ``os_error_code`` tensorstore writes into
    its messages; ``None`` when there is neither."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno:
            return os.strerror(x.errno)
        if m := _OS_ERROR_CODE.search(str(x)):
            return os.strerror(int(m.group(1)))
    return None


def directory(workdir: storage.PathLike) -> storage.Path:
    """``WORKDIR/checkpoints`` (absolute for local workdirs; a ``gs://`` workdir stays a URL)."""
    root = storage.path(workdir)
    return (root if storage.is_remote(root) else root.resolve()) / "checkpoints"


class _BackgroundStorageFailures(logging.Filter):
    """Drops the ERROR logs (with tracebacks) of a storage failure in Orbax's background save threads — Orbax's own
    (on the absl logger) and asyncio's "Future exception was never retrieved" for the writes of the same failed
    save: the exception reaches the main thread at the next save or wait, which reports it once
    (:func:`storage_errors`). Anything else, and every failure that is not the storage's, passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = "orbax" in record.pathname or record.name == "asyncio"
        if record.levelno < logging.ERROR or not ours:
            return True
        e = record.exc_info[1] if record.exc_info else None
        return storage_cause(e if e is not None else Exception(record.getMessage())) is None


def _late_write_callbacks(hook):
    """An unraisable-exception hook that drops "Event loop is closed" from ``call_soon_threadsafe``: the completion
    of a tensorstore write arriving after Orbax closed the event loop of a save that had already failed (the
    failure itself is reported, once). Every other unraisable exception goes to ``hook``."""

    def quiet(u):
        frame = u.exc_traceback
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        late = (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
                and frame is not None and "asyncio" in frame.tb_frame.f_code.co_filename)
        if not late:
            hook(u)

    quiet.percausal = True
    return quiet


def _quiet_background_failures() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BackgroundStorageFailures) for f in logger.filters):
            logger.addFilter(_BackgroundStorageFailures())
    if not getattr(sys.unraisablehook, "percausal", False):
        sys.unraisablehook = _late_write_callbacks(sys.unraisablehook)


def manager(workdir: storage.PathLike, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """Orbax manager over ``WORKDIR/checkpoints``; on an object store a step counts once its
    ``commit_success.txt`` is written, so a partial save is never taken as the latest."""
    _bound_gcs_retries()
    _quiet_background_failures()
    return ocp.CheckpointManager(
        directory(workdir), item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))


def save(mngr: ocp.CheckpointManager, step: int, state, iterator, meta: dict, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if iterator is not None:
        args["iter"] = grain.checkpoint.CheckpointSave(iterator)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore(mngr: ocp.CheckpointManager, state, iterator, meta: dict, step: int | None = None,
            base_moved: bool = False):
    """Restores the newest readable step (or ``step``) into the shapes/shardings of ``state`` and into
    ``iterator``; returns ``(state, step)`` or ``(None, None)`` when there is no checkpoint.

    Decided once for all processes: the candidate steps are process 0's listing; before a step is restored, every
    process checks its own files of it (:func:`missing_or_damaged`: items present, JSON metadata and this
    process's data position readable), and the step is skipped by all — with the reason logged — when any process
    found a problem. The restore itself is collective: in one process a missing, truncated or corrupt file found
    while reading (:func:`unreadable`) still falls back; across processes (whose restore may be inside a collective
    when one fails), and for any other error, the run stops."""
    steps = processes.broadcast_ints(sorted(mngr.all_steps(), reverse=True) if step is None else [step])
    if not steps:
        return None, None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    skipped = []
    for s in steps:
        problem = missing_or_damaged(mngr.directory / str(s), iterator is not None)
        if not processes.all_ok(problem is None):
            skipped.append(f"step {s}: {problem or 'another process found its files missing or damaged'}")
            log.warning("checkpoint step %s is unreadable (%s); trying an older one", s, skipped[-1])
            continue
        try:
            saved_meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            check_layout(saved_meta, meta, mngr.directory / str(s))
            if meta.get("model_fingerprint"):
                check_base(saved_meta, meta, mngr.directory / str(s), base_moved, quiet=True)
            args = {"state": ocp.args.StandardRestore(abstract)}
            if iterator is not None:
                args["iter"] = grain.checkpoint.CheckpointRestore(iterator)
            return mngr.restore(s, args=ocp.args.Composite(**args)).state, s
        except Exception as e:  # noqa: BLE001 - only damaged files of a one-process run fall back
            why = unreadable(e) if jax.process_count() == 1 else None
            if why is None:
                raise
            skipped.append(f"step {s}: {why}")
            log.warning("checkpoint step %s is unreadable (%s); trying an older one", s, why)
    raise UserError(f"{mngr.directory}: no readable checkpoint ({'; '.join(skipped)[:500]})")


def missing_or_damaged(step_dir, with_iterator: bool = True) -> str | None:
    """What is missing or unreadable among this process's files of a saved step (None: nothing found): each
    item's directory, the JSON metadata, and this process's data-iterator position."""
    names = ["_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA", "state/_sharding"]
    if with_iterator:
        names.append(f"iter/process_{jax.process_index()}-of-{jax.process_count()}.json")
    for name in names:
        f = step_dir / name
        try:
            json.loads(f.read_text())
        except FileNotFoundError:
            return f"{f}: missing"
        except (ValueError, UnicodeDecodeError) as e:
            return f"{f}: not complete JSON ({e})"
    return None


_UNREADABLE_STATUS = re.compile(r"\b(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE)\b|does not exist|was not found in the checkpoint|[Tt]runcated|[Cc]orrupt")


def unreadable(e: BaseException) -> str | None:
    """Why ``e`` means a checkpoint's files are missing, truncated or corrupt (None: it means something else, e.g.
    a bug or a layout mismatch, which must not be papered over by an older step)."""
    if isinstance(e, UserError):
        return None
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError, EOFError)):
            return f"{type(e).__name__}: {e}"[:300]
        if m := _UNREADABLE_STATUS.search(str(e)):
            return f"{type(e).__name__} ({m.group(0)}): {str(e).splitlines()[0] if str(e) else ''}"[:300]
        e = e.__cause__ or e.__context__
    return None


def check_layout(saved: dict, current: dict, where) -> None:
    old = {k: saved.get("layout", {}).get(k, LAYOUT_DEFAULTS.get(k)) for k in LAYOUT_KEYS}
    diffs = [f"{k}: checkpoint has {old[k]!r}, this run has {current['layout'].get(k)!r}"
             for k in LAYOUT_KEYS if old[k] != current["layout"].get(k)]
    if diffs:
        raise UserError(f"{where}: the checkpoint does not match this run's layout ({'; '.join(diffs)})")


def check_resumable(workdir: storage.PathLike, layout: dict, base: dict | None = None,
                    base_moved: bool = False) -> None:
    """Before a run loads anything: the newest checkpoint of ``workdir`` (if any) has this run's ``layout`` and,
    given ``base`` (:func:`check_base`'s keys), was trained on these weights."""
    if not directory(workdir).is_dir():
        return
    mngr = manager(workdir, async_save=False)
    step = mngr.latest_step()
    if step is None:
        return
    try:
        saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # noqa: BLE001 - unreadable: restore() falls back to an older step and checks that one
        return
    check_layout(saved, {"layout": layout}, mngr.directory / str(step))
    if base is not None:
        check_base(saved, base, mngr.directory / str(step), base_moved)


# The base model's identity in a checkpoint's meta: the name as the user gave it (model.path: a directory, gs://
# URL or hub id), the local directory it was read from, the hub commit (when from the hub), and the content
# fingerprint of its weights (hf.checkpoint.weights_fingerprint).
BASE_KEYS = ("model_path", "model_dir", "model_revision", "model_fingerprint")


def describe_base(meta: dict) -> str:
    """``NAME[@REVISION] (sha256-v1:...)``."""
    name = meta.get("model_path") or meta.get("model_dir")
    revision = f"@{meta['model_revision']}" if meta.get("model_revision") else ""
    return f"{name}{revision} ({meta.get('model_fingerprint') or 'no fingerprint'})"


def _same_place(saved: dict, current: dict) -> bool:
    """The base is named as before: the same name, or another name of the same local directory (``m``, ``/a/m``)."""
    if saved.get("model_path") == current.get("model_path"):
        return True
    a, b = saved.get("model_dir"), current.get("model_dir")
    return bool(a) and a == b


def check_base(saved: dict, current: dict, where, base_moved: bool = False, quiet: bool = False) -> None:
    """The base model of this run / export (``current``: :data:`BASE_KEYS`) must hold the weights the checkpoint
    was trained on (``saved``: its meta): another fingerprint is an error, always; the same weights under another
    name or directory are accepted only with ``base_moved`` (``--base-moved``: the user says the base moved).
    A checkpoint written before fingerprints were recorded is not checked (said once, unless ``quiet``)."""
    old, new = saved.get("model_fingerprint"), current.get("model_fingerprint")
    talk = not quiet and jax.process_index() == 0
    if not old or not new or old.split(":")[0] != new.split(":")[0]:
        why = ("does not record its base model's fingerprint (written before base models were fingerprinted)"
               if not old else f"records its base model's fingerprint as {old}, not comparable with {new}")
        if talk:
            print(f"{where}: the checkpoint {why}: not checked that {current.get('model_path')} holds the weights "
                  f"it was trained on ({saved.get('model_path') or saved.get('model_dir')}); checkpoints written "
                  "from now on record it", file=sys.stderr)
        return
    if old != new:
        raise UserError(f"{where}: the checkpoint was trained on base model {describe_base(saved)}, but the base "
                        f"model given now is {describe_base(current)}: other weights; use the base it was trained "
                        f"on (--config.model.path={saved.get('model_path') or saved.get('model_dir')})")
    if _same_place(saved, current):
        return
    if not base_moved:
        raise UserError(f"{where}: the checkpoint was trained on base model {describe_base(saved)}; the base "
                        f"model given now is {describe_base(current)}: the same weights under another name; pass "
                        "--base-moved to confirm that the base moved, or name it as before")
    if talk:
        print(f"base moved: {describe_base(saved)} -> {describe_base(current)} (the same weights)", file=sys.stderr)


def read_meta(workdir: storage.PathLike, step: int | None = None) -> tuple[dict, int]:
    mngr = manager(workdir, async_save=False)
    s = step if step is not None else mngr.latest_step()
    if s is None:
        raise UserError(f"{workdir}: no checkpoint found")
    if s not in mngr.all_steps():
        raise UserError(f"{workdir}: no checkpoint at step {s} (have {sorted(mngr.all_steps())})")
    meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return json.loads(json.dumps(meta)), s
