"""Orbax checkpoints of a run: the train state, the Grain iterator state, and a JSON item with the config and the
parameter layout. Async saves, keep-N, restore onto any mesh from an abstract target, fallback to an older step when
the newest cannot be read, and a clear error when the layout does not match.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import grain
import jax
import orbax.checkpoint as ocp

from percausal_jax import storage
from percausal_jax.errors import StorageError, UserError
from percausal_jax.training import processes

ITEMS = ("state", "iter", "meta")
# Keys of the meta item that must match between the checkpoint and the run restoring it.
LAYOUT_KEYS = ("model_type", "num_params", "scan_layers", "param_dtype", "lora_rank", "objective", "optimizer")
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
    """Any failure of the storage inside the block (disk full, bucket unreachable after retries) becomes one
    :class:`StorageError` line naming ``what`` and ``where``, then ``hint``; committed checkpoints are untouched."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - tensorstore, gcsfs, aiohttp and OSError all raise their own types
        detail = (str(e).strip().splitlines() or [""])[0]
        if len(detail) > 240:  # tensorstore's messages name every layer and spec; the errno is named up front
            detail = f"{detail[:80]} … {detail[-150:]}"
        cause = os_error_text(e)
        cause = f"{cause}; " if cause else ""
        raise StorageError(f"{where}: {what} failed ({cause}{type(e).__name__}: {detail}); {hint}") from e


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_text(e: BaseException) -> str | None:
    """The operating system's words for the error behind ``e`` ("File too large", "No space left on device"):
    from an :class:`OSError` in its cause chain, or from the ``os_error_code`` tensorstore writes into its
    messages; ``None`` when there is neither."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
        if m := _OS_ERROR_CODE.search(str(e)):
            return os.strerror(int(m.group(1)))
        e = e.__cause__ or e.__context__
    return None


def directory(workdir: storage.PathLike) -> storage.Path:
    """``WORKDIR/checkpoints`` (absolute for local workdirs; a ``gs://`` workdir stays a URL)."""
    root = storage.path(workdir)
    return (root if storage.is_remote(root) else root.resolve()) / "checkpoints"


def manager(workdir: storage.PathLike, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """Orbax manager over ``WORKDIR/checkpoints``; on an object store a step counts once its
    ``commit_success.txt`` is written, so a partial save is never taken as the latest."""
    _bound_gcs_retries()
    return ocp.CheckpointManager(
        directory(workdir), item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))


def save(mngr: ocp.CheckpointManager, step: int, state, iterator, meta: dict, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if iterator is not None:
        args["iter"] = grain.checkpoint.CheckpointSave(iterator)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore(mngr: ocp.CheckpointManager, state, iterator, meta: dict, step: int | None = None):
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
    diffs = [f"{k}: checkpoint has {saved.get('layout', {}).get(k)!r}, this run has {current['layout'].get(k)!r}"
             for k in LAYOUT_KEYS if saved.get("layout", {}).get(k) != current["layout"].get(k)]
    if diffs:
        raise UserError(f"{where}: the checkpoint does not match this run's layout ({'; '.join(diffs)})")


def check_resumable(workdir: storage.PathLike, layout: dict) -> None:
    """Before a run loads anything: the newest checkpoint of ``workdir`` (if any) has this run's ``layout``."""
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


def read_meta(workdir: storage.PathLike, step: int | None = None) -> tuple[dict, int]:
    mngr = manager(workdir, async_save=False)
    s = step if step is not None else mngr.latest_step()
    if s is None:
        raise UserError(f"{workdir}: no checkpoint found")
    if s not in mngr.all_steps():
        raise UserError(f"{workdir}: no checkpoint at step {s} (have {sorted(mngr.all_steps())})")
    meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return json.loads(json.dumps(meta)), s
