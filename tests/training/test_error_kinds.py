"""Errors say what they are: inside the metrics / checkpoint block only a storage failure (an OSError, an error of
the object store's client stack, a tensorstore error with an errno or a failed GCS/HTTP request) becomes a
StorageError (exit 3, "re-run"); a bug keeps its own type and traceback. And a resumed run's metrics.jsonl is
rewritten atomically."""

import errno
import json
import os

import pytest

from percausal_jax import cli
from percausal_jax.errors import StorageError
from percausal_jax.training import checkpoints, loop
from percausal_jax.training.checkpoints import storage_errors
from tests.training.common import train_args


def _raise(e: BaseException):
    with storage_errors("saving", "/w"):
        raise e


def _chained(cause: BaseException, outer: BaseException, explicit: bool):
    try:
        raise cause
    except BaseException as c:
        if explicit:
            raise outer from c
        raise outer


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), KeyError("step"), AttributeError("no .meta"),
                                 ValueError("shapes (4, 8) and (8, 3) do not match"), AssertionError(),
                                 ValueError("INVALID_ARGUMENT: Error writing gs://b/x: dtype mismatch")])
def test_a_bug_in_the_block_keeps_its_type(bug):
    with pytest.raises(type(bug)) as got:
        _raise(bug)
    assert got.value is bug and not isinstance(got.value, StorageError)


def test_a_bug_while_handling_a_storage_error_is_a_bug():
    with pytest.raises(TypeError):
        with storage_errors("saving", "/w"):
            _chained(OSError(errno.EIO, "I/O error"), TypeError("bug in the handler"), explicit=False)


@pytest.mark.parametrize("failure, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device; OSError"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied; PermissionError"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "Connection refused; ConnectionRefusedError"),
    (ValueError("OUT_OF_RANGE: Error writing local file \"/w/x\" [os_error_code='28']"), "No space left on device"),
    (ValueError('UNAVAILABLE: Error writing "run/checkpoints/4/state/d/0" in GCS: CURL error [7] Couldn\'t '
                "connect to server"), "ValueError: UNAVAILABLE"),
    (ValueError("DEADLINE_EXCEEDED: HTTP response code: 503 [source locations='tensorstore/kvstore/gcs_http/x']"),
     "ValueError: DEADLINE_EXCEEDED"),
])
def test_a_storage_failure_becomes_one_storage_error(failure, words):
    with pytest.raises(StorageError, match="saving failed") as got:
        _raise(failure)
    assert words in str(got.value) and got.value.__cause__ is failure


def test_object_store_client_errors_and_wrapped_os_errors_are_storage_errors():
    import aiohttp
    import google.auth.exceptions
    from gcsfs.retry import HttpError

    for failure in (aiohttp.ServerDisconnectedError(), HttpError({"code": 503, "message": "backend error"}),
                    google.auth.exceptions.TransportError("metadata server unreachable")):
        with pytest.raises(StorageError):
            _raise(failure)
    with pytest.raises(StorageError, match="Input/output error; RuntimeError"):  # raise ... from, or implicit
        with storage_errors("saving", "/w"):
            _chained(OSError(errno.EIO, "I/O error"), RuntimeError("commit failed"), explicit=False)
    with pytest.raises(StorageError, match="No space left on device"):  # a task group of async writes
        _raise(ExceptionGroup("writes", [OSError(errno.ENOSPC, "No space left on device")]))


def test_real_os_error_from_the_metrics_writer_is_a_storage_error(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # the writer's file cannot be opened: IsADirectoryError, from open()
    writer = loop.MetricsWriter(tmp_path)
    try:
        with pytest.raises(StorageError, match=r"writing the metrics of step 1 failed \(Is a directory"):
            with storage_errors("writing the metrics of step 1", tmp_path):
                writer.write({"step": 1, "loss": 1.0})
    finally:
        writer.close(upload=False)


@pytest.mark.slow
def test_a_bug_inside_train_propagates_with_its_traceback(setup, tmp_path, monkeypatch):
    """End to end: a TypeError in the checkpoint block of ``percausal train`` is raised as itself (the CLI does not
    turn it into an exit-3 "re-run" line)."""
    model_dir, data = setup

    def buggy_save(*args, **kwargs):
        raise TypeError("save() got an unexpected keyword argument 'forse'")

    monkeypatch.setattr(checkpoints, "save", buggy_save)
    argv = train_args(model_dir, data, tmp_path / "run", "ce", steps=1,
                      extra=["--config.data.eval=", "--config.train.grad_accum_steps=1"])
    with pytest.raises(TypeError, match="forse"):
        cli.main(argv)
    assert not (tmp_path / "run" / ".lock").exists()  # released as after any other error: not abandoned


# ---------------------------------------------------------------------------------------- metrics.jsonl on resume
def _metrics(path, steps):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps))


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name not in ("metrics.jsonl", "tensorboard"))


def test_resume_rewrites_metrics_by_rename(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, [1, 2, 3, 4])
    inode = path.stat().st_ino
    loop.MetricsWriter(tmp_path, resume_step=4).close()
    assert path.stat().st_ino == inode  # nothing to drop: untouched
    loop.MetricsWriter(tmp_path, resume_step=2).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not the old one truncated
    assert _leftovers(tmp_path) == []


def test_a_failed_rewrite_leaves_the_old_metrics_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, [1, 2, 3, 4])
    before = path.read_text()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the temporary file cannot be made durable: the rename never happens
    with pytest.raises(OSError, match="No space left"):
        loop.MetricsWriter(tmp_path, resume_step=2)
    monkeypatch.undo()
    assert path.read_text() == before and _leftovers(tmp_path) == []
