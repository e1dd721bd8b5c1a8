"""Processes agree or stop, with real separate processes (gloo): a config that differs between processes, replicas
whose weights differ (each host's own copy of "the same" model directory), a workdir lock held or lost, and a
checkpoint step one process cannot read. Each must stop every process with one line (exit 4 for a disagreement, 2
for the lock), or, for the unreadable step, make every process fall back to the same older step."""

import json
import shutil
import subprocess
import sys

import pytest

from percausal_jax import cli
from percausal_jax.training import checkpoints
from tests.training.common import train_args
from tests.training.test_lock import _write_lock
from tests.training.test_multiprocess import REPO, _env, _free_port, varied  # noqa: F401

TWO = ["--config.mesh.fsdp=1", "--config.mesh.tensor=2"]  # both processes replicas of one row block


def _launch(argvs, cwds=None, devices=1):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "percausal_jax", *map(str, argv), "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", str(len(argvs)), "--process-id", str(i)],
                              cwd=(cwds or [REPO] * len(argvs))[i], env={**_env(devices), "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, argv in enumerate(argvs)]
    return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=1200)]]


def _last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_a_config_that_differs_between_processes_stops_every_process(varied, tmp_path):
    model_dir, data = varied
    argv = train_args(model_dir, data, tmp_path / "run", "perce", steps=2, extra=TWO)
    results = _launch([argv, [*argv, "--config.optimizer.lr=2e-3"]])
    for code, err in results:
        assert code == 4, err[-2000:]
        assert _last_line(err).startswith("percausal train: error: processes disagree on the config"), err[-2000:]
        assert "Traceback" not in err


@pytest.mark.slow
def test_replicas_fed_different_rows_stop_at_the_first_logged_step(varied, tmp_path):
    """Both processes name model.path=model, relative to their own working directory (as hosts with their own
    copy would); process 1's tokenizer maps two letters to each other's ids. Config, data and mesh agree; the rows they feed for their
    one block cannot."""
    model_dir, data = varied
    for host in ("a", "b"):
        shutil.copytree(model_dir, tmp_path / host / "model")
    tokenizer = tmp_path / "b" / "model" / "tokenizer.json"
    spec = json.loads(tokenizer.read_text())
    vocab = spec["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]  # the same size, other ids
    tokenizer.write_text(json.dumps(spec))
    argv = [*train_args("model", data, tmp_path / "run", "perce", steps=2, extra=TWO)]
    argv[argv.index("configs/tiny.py")] = str(REPO / "configs" / "tiny.py")
    results = _launch([argv, argv], cwds=[tmp_path / "a", tmp_path / "b"])
    for code, err in results:
        assert code == 4, err[-2000:]
        assert ("step 1: processes fed different rows for row block 0 (process(es) [1] differ from process 0"
                in _last_line(err)), err[-2000:]
    assert not (tmp_path / "run" / "checkpoints" / "1").exists()  # stopped before writing anything of step 1


LOSS = """
import sys
from percausal_jax.training.distributed import initialize
initialize(sys.argv[1], 2, int(sys.argv[2]))
from percausal_jax.errors import ProcessMismatch
from percausal_jax.training import processes
processes.check_same_loss(1, 2.5)  # the same everywhere: passes
try:
    processes.check_same_loss(2, 2.5 if sys.argv[2] == "0" else 2.5000002)  # one float32 ulp apart
except ProcessMismatch as e:
    print(e)
    sys.exit(e.exit_code)
"""


@pytest.mark.slow
def test_different_losses_stop_every_process():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LOSS, f"127.0.0.1:{port}", str(i)], cwd=REPO,
                              env={**_env(1), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 4, err[-2000:]
        assert "step 2: processes computed different losses (process 0: 2.5, process 1: 2.50000024)" in out, out


@pytest.mark.slow
def test_a_held_workdir_lock_stops_every_process(varied, tmp_path):
    model_dir, data = varied
    work = tmp_path / "run"
    _write_lock(str(work))  # held by this (live) test process
    argv = train_args(model_dir, data, work, "perce", steps=2, extra=TWO)
    for code, err in _launch([argv, argv]):
        assert code == 2, err[-2000:]
        assert "in use by another run" in _last_line(err) or "could not take the workdir lock" in _last_line(err)


LOST = """
import sys, time
from percausal_jax.training.distributed import initialize
initialize(sys.argv[1], 2, int(sys.argv[2]))
from percausal_jax.errors import UserError
from percausal_jax.training import processes
from percausal_jax.training.loop import SharedLock
from tests.training.test_lock import _write_lock
with SharedLock(sys.argv[3], heartbeat_s=0.05) as lock:
    processes.all_ok(True)
    lock.check()  # still ours: nobody stops
    if lock.lock is not None:
        _write_lock(sys.argv[3], host="elsewhere", pid=4242)  # another run took the workdir over
        while not lock.lock.lost:
            time.sleep(0.05)
    processes.all_ok(True)
    try:
        lock.check()
    except UserError as e:
        print("stopped:", e)
        sys.exit(2)
print("went on")
"""


@pytest.mark.slow
def test_a_lost_workdir_lock_stops_every_process_not_only_process_0(tmp_path):
    port, work = _free_port(), str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-c", LOST, f"127.0.0.1:{port}", str(i), work], cwd=REPO,
                              env={**_env(1), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 2, (i, out, err[-2000:])
        assert "taken over by another run" in out


@pytest.mark.slow
def test_a_step_one_process_cannot_read_makes_every_process_fall_back(varied, tmp_path):
    """Process 1's data position of the newest step is deleted: only process 1 fails to read step 4. Every
    process must fall back to step 2 (not process 0 to 4 and process 1 to 2), and the resumed run continue
    exactly as the uninterrupted one."""
    model_dir, data = varied
    work = tmp_path / "run"
    argv = train_args(model_dir, data, work, "perce", steps=4,
                      extra=["--config.mesh.fsdp=2", "--config.mesh.tensor=1", "--config.checkpoint.every_steps=2",
                             "--config.data.eval="])
    for code, err in _launch([argv, argv]):
        assert code == 0, err[-2000:]
    straight = [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    (work / "checkpoints" / "4" / "iter" / "process_1-of-2.json").unlink()
    argv6 = train_args(model_dir, data, work, "perce", steps=6,
                       extra=["--config.mesh.fsdp=2", "--config.mesh.tensor=1", "--config.checkpoint.every_steps=2",
                              "--config.data.eval="])
    results = _launch([argv6, argv6])
    for code, err in results:
        assert code == 0, err[-2000:]
    assert "resumed from step 2" in results[0][1] and "resumed from step 4" not in results[0][1]
    assert "checkpoint step 4 is unreadable" in results[0][1]  # process 0 read it, and still fell back
    resumed = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()}
    assert [resumed[s] for s in (3, 4)] == straight[2:4]


def test_a_bug_while_restoring_is_not_taken_for_an_unreadable_step(setup, tmp_path, monkeypatch):
    """Only missing, truncated or corrupt files fall back to an older step; any other exception stops the run
    with its traceback (a bug must look like a bug)."""
    model_dir, data = setup
    work = tmp_path / "run"
    args = lambda steps: train_args(model_dir, data, work, "ce", steps=steps,  # noqa: E731
                                    extra=["--config.checkpoint.every_steps=2", "--config.data.eval="])
    assert cli.main(args(4)) == 0
    from percausal_jax.data import rows

    def broken(self, state):
        raise RuntimeError("a bug in set_state")

    monkeypatch.setattr(rows.ProcessRows, "set_state", broken)
    with pytest.raises(RuntimeError, match="a bug in set_state"):
        cli.main(args(6))


@pytest.mark.parametrize("error, why", [
    (FileNotFoundError(2, "No such file or directory", "x/state/manifest.ocdbt"), "FileNotFoundError"),
    (json.JSONDecodeError("Expecting ',' delimiter", "{", 0), "JSONDecodeError"),
    (KeyError('Item "iter" was not found in the checkpoint.'), "was not found in the checkpoint"),
    (ValueError("File x/iter/process_1-of-2.json does not exist."), "does not exist"),
    (ValueError("DATA_LOSS: Error reading chunk"), "DATA_LOSS"),
    (RuntimeError("a bug"), None), (TypeError("unsupported operand"), None), (KeyError("params"), None),
])
def test_unreadable_names_only_missing_or_damaged_files(error, why):
    got = checkpoints.unreadable(error)
    assert (got is None) if why is None else (why in got)
