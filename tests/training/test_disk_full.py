"""A disk that fills up during ``prepare``, a checkpoint and ``export``. Where this process may mount (root, as in
CI's container), the output lives on a small tmpfs: a real "No space left on device" (ENOSPC) from the kernel,
whatever the file sizes. Elsewhere a child process under ``ulimit -f`` stands in (EFBIG, "File too large", and
files under the limit still get written); the tests' ids say which ran (``tmpfs-ENOSPC`` / ``rlimit-EFBIG``;
``DISK_FULL_MODE=rlimit-EFBIG`` forces the proxy where mounting works). Each command (prepare, train's checkpoint,
export, eval) exits 3 with one line and no traceback, and leaves no half-written file that a later command would
read: prepare's output does not exist, no checkpoint step is committed, the export directory does not exist, eval
wrote neither predictions nor metrics. With room again (the tmpfs remounted larger, or no limit), the same command
succeeds."""

import contextlib
import json
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from percausal_jax.data.files import write_jsonl
from percausal_jax.data.synthetic import generate
from tests.training.common import train_args

REPO = Path(__file__).resolve().parents[2]
LIMIT = 24 << 10  # ulimit -f: bytes per file, above the metrics / lock / JSON files, below outputs and arrays


def _can_mount() -> bool:
    probe = Path("/tmp") / f"percausal-mount-probe-{uuid.uuid4().hex[:8]}"
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    except OSError:
        return False
    finally:
        probe.rmdir()


MODE = os.environ.get("DISK_FULL_MODE") or ("tmpfs-ENOSPC" if _can_mount() else "rlimit-EFBIG")
FULL = {"tmpfs-ENOSPC": "No space left on device", "rlimit-EFBIG": "File too large"}[MODE]


class Disk:
    """``path`` on a disk of ``size`` bytes (a tmpfs), or, where mounting is refused, a ``ulimit -f`` for the
    commands run through :meth:`run`; :meth:`make_room` lifts either."""

    def __init__(self, path: Path, size: int, limit: int = LIMIT):
        self.path, self.limited, self.limit = path, True, limit
        path.mkdir(parents=True, exist_ok=True)
        if MODE == "tmpfs-ENOSPC":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def run(self, argv):
        limit = self.limit if self.limited and MODE == "rlimit-EFBIG" else None

        def cap():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-m", "percausal_jax", *map(str, argv)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600, preexec_fn=cap if limit else None)

    def fill(self) -> list[str]:
        """tmpfs: a file takes every byte left (the names of what is then on the disk); the proxy keeps its limit."""
        if MODE == "tmpfs-ENOSPC":
            try:
                with open(self.path / "filler", "wb", buffering=0) as f:
                    while True:
                        f.write(b"\0" * 4096)
            except OSError:
                pass
            return ["filler"]
        return []

    def make_room(self):
        self.limited = False
        if MODE == "tmpfs-ENOSPC":
            subprocess.run(["mount", "-o", "remount,size=256m", str(self.path)], check=True)

    def close(self):
        if MODE == "tmpfs-ENOSPC":
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@contextlib.contextmanager
def small_disk(path: Path, size: int, limit: int = LIMIT):
    disk = Disk(path, size, limit)
    try:
        yield disk
    finally:
        disk.close()


def _failed_cleanly(proc, command: str) -> str:
    """Exit 3 and one error line, the last, naming the operating system's words for it; no traceback, nor any other
    ERROR line (train: not from Orbax's background save threads either)."""
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"percausal {command}: error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert FULL in errors[0], errors[0]
    return errors[0]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", [MODE])
def test_prepare_on_a_full_disk_writes_nothing(tmp_path, mode):
    write_jsonl(tmp_path / "in.jsonl", generate(n_users=12, items_per_user=6, outputs_per_user=8, seed=0))
    with small_disk(tmp_path / "out", 16 << 10) as disk:
        out = disk.path
        argv = ["prepare", "--source", "jsonl", "--input", tmp_path / "in.jsonl", "--out", out / "p.jsonl"]
        line = _failed_cleanly(disk.run(argv), "prepare")
        assert "nothing partial was published" in line
        assert _files(out) == []  # no output, no temporary file
        disk.make_room()
        assert disk.run(argv).returncode == 0 and (out / "p.jsonl").stat().st_size > 16 << 10


@pytest.mark.slow
@pytest.mark.parametrize("mode", [MODE])
def test_checkpoint_export_and_eval_on_a_full_disk(setup, tmp_path, mode):
    model_dir, data = setup
    with small_disk(tmp_path / "disk", 256 << 10) as disk, small_disk(tmp_path / "out", 256 << 10) as out:
        work = disk.path / "run"
        argv = train_args(model_dir, data, work, "ce", steps=4, extra=[
            "--config.mesh.fsdp=1", "--config.mesh.tensor=1", "--config.checkpoint.every_steps=2"])
        line = _failed_cleanly(disk.run(argv), "train")
        assert "checkpoint" in line and str(work) in line, line
        steps = [p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
        assert steps == []  # nothing committed: a re-run starts from step 0, not from a partial step 2

        disk.make_room()
        assert disk.run(argv).returncode == 0  # room again: the same command trains
        assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

        hf = out.path / "hf"
        _failed_cleanly(out.run(["export", "--workdir", work, "--out", hf]), "export")
        assert _files(out.path) == []  # no export directory's files at all, nor a temporary one's
        out.make_room()
        assert out.run(["export", "--workdir", work, "--out", hf]).returncode == 0
        assert (hf / "config.json").is_file()

        with small_disk(tmp_path / "eval", 64 << 10, limit=256) as ev:
            before = ev.fill()
            preds = ev.path / "preds.jsonl"
            argv = ["eval", "--workdir", work, "--data", data, "--out", preds, "--no-meteor", "--no-progress",
                    "--max-new-tokens", "16"]
            _failed_cleanly(ev.run(argv), "eval")
            assert _files(ev.path) == before  # neither predictions nor metrics, nor a temporary file
            ev.make_room()
            assert ev.run(argv).returncode == 0, "room again: the same eval writes both"
            assert preds.is_file() and (ev.path / "preds.metrics.json").is_file()


def test_a_storage_failure_names_the_os_error_first():
    """tensorstore's messages spell out every driver and spec and bury the errno at the end ("[os_error_code=
    '27']"); the one line names the operating system's words for it, whatever the clipping keeps."""
    from percausal_jax.errors import StorageError
    from percausal_jax.training.checkpoints import storage_errors

    buried = ValueError('OUT_OF_RANGE: Error opening "zarr" driver: ' + "x" * 400 + " [os_error_code='27']")
    with pytest.raises(StorageError, match=r"saving failed \(File too large; ValueError: OUT_OF_RANGE"):
        with storage_errors("saving", "/w"):
            raise buried
    with pytest.raises(StorageError, match=r"No space left on device; RuntimeError: wrapped"):
        with storage_errors("saving", "/w"):
            try:
                raise OSError(28, "No space left on device")
            except OSError as e:
                raise RuntimeError("wrapped") from e
    with pytest.raises(StorageError, match=r"saving failed \(TimeoutError: no errno\)"):
        with storage_errors("saving", "/w"):
            raise TimeoutError("no errno")


def test_a_rust_writer_s_os_error_in_words_becomes_an_os_error():
    """safetensors (Rust) reports a full disk as ``SafetensorError: ... (os error 28)``: atomic writers turn it into
    the OSError the CLI reports as a storage failure (exit 3); other errors pass unchanged."""
    from percausal_jax.atomic import as_os_error

    e = as_os_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "/o")
    assert isinstance(e, OSError) and e.errno == 28 and e.filename == "/o"
    bug = KeyError("params")
    assert as_os_error(bug, "/o") is bug


def test_only_background_storage_failures_are_kept_quiet():
    """The train path's quiet failure: Orbax's background-thread ERROR logs and asyncio's "never retrieved" logs
    are dropped when their exception is a storage failure (the main thread reports it once); a bug logged the same
    way, and any other logger's record, still shows. Late write completions ("Event loop is closed" raised in
    asyncio) are dropped by the unraisable hook; any other unraisable exception reaches the previous hook."""
    import logging

    from percausal_jax.training.checkpoints import _BackgroundStorageFailures, _late_write_callbacks

    full = ValueError("RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']")

    def record(name, path, exc, msg="_SignalingThread.run() raised an exception"):
        return logging.LogRecord(name, logging.ERROR, path, 1, msg, None, (type(exc), exc, None))

    keep = _BackgroundStorageFailures().filter
    orbax = "/x/orbax/checkpoint/_src/futures/future.py"
    assert not keep(record("absl", orbax, full))
    assert not keep(record("asyncio", "/x/asyncio/base_events.py", full, "Future exception was never retrieved"))
    assert keep(record("absl", orbax, KeyError("params")))  # a bug in a background thread is not hidden
    assert keep(record("absl", "/x/elsewhere.py", full))  # nor a storage error someone else logs

    seen = []
    hook = _late_write_callbacks(seen.append)

    def unraisable(exc):
        try:
            import asyncio

            loop = asyncio.new_event_loop()
            loop.close()
            if exc is None:
                loop.call_soon_threadsafe(print)
            raise exc
        except BaseException as e:
            return type("U", (), {"exc_type": type(e), "exc_value": e, "exc_traceback": e.__traceback__})()

    late, other = unraisable(None), unraisable(RuntimeError("Event loop is closed"))
    hook(late)
    assert seen == []
    hook(other)  # same words, raised outside asyncio: passed on
    assert seen == [other]
