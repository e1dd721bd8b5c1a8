"""A disk that fills up during ``prepare``, a checkpoint and ``export``: a child process under ``ulimit -f`` (the
kernel refuses writes past the limit with EFBIG, as a full disk refuses them with ENOSPC). Each command exits 3
with one line, and leaves no half-written file that a later command would read: prepare's output does not exist,
no checkpoint step is committed, the export directory does not exist. Re-run without the limit, each succeeds."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from percausal_jax.data.files import write_jsonl
from percausal_jax.data.synthetic import generate
from tests.training.common import train_args

REPO = Path(__file__).resolve().parents[2]
LIMIT = 24 << 10  # bytes per file: above the metrics / lock / JSON files, below the outputs and checkpoint arrays


def _run(argv, limit: int | None):
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "percausal_jax", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=cap if limit else None)


def _failed_cleanly(proc, command: str, quiet: bool = True) -> str:
    """Exit 3 and one error line, the last. ``quiet=False``: tensorstore's write callbacks, still queued when the
    failed save's event loop closes, print tracebacks of their own ("Event loop is closed") before that line."""
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert not quiet or "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"percausal {command}: error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_prepare_on_a_full_disk_writes_nothing(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", generate(n_users=12, items_per_user=6, outputs_per_user=8, seed=0))
    out = tmp_path / "out"
    out.mkdir()
    argv = ["prepare", "--source", "jsonl", "--input", tmp_path / "in.jsonl", "--out", out / "p.jsonl"]
    line = _failed_cleanly(_run(argv, LIMIT), "prepare")
    assert "File too large" in line and "nothing partial was published" in line
    assert _files(out) == []  # no output, no temporary file
    assert _run(argv, None).returncode == 0 and (out / "p.jsonl").stat().st_size > LIMIT


@pytest.mark.slow
def test_checkpoint_and_export_on_a_full_disk(setup, tmp_path):
    model_dir, data = setup
    work = tmp_path / "run"
    argv = train_args(model_dir, data, work, "ce", steps=4, extra=[
        "--config.mesh.fsdp=1", "--config.mesh.tensor=1", "--config.checkpoint.every_steps=2"])
    line = _failed_cleanly(_run(argv, LIMIT), "train", quiet=False)
    assert "checkpoint" in line and "File too large" in line and str(work) in line, line
    steps = [p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == []  # nothing committed: a re-run starts from step 0, not from a partial step 2

    assert _run(argv, None).returncode == 0  # room again: the same command trains
    assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    hf = tmp_path / "hf"
    line = _failed_cleanly(_run(["export", "--workdir", work, "--out", hf], LIMIT), "export")
    assert not hf.exists()  # no export directory at all
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # nor its temporary one
    assert _run(["export", "--workdir", work, "--out", hf], None).returncode == 0
    assert (hf / "config.json").is_file()


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
