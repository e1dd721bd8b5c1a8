"""One writer per workdir (percausal_jax.lock), on a local disk and on gs:// (the loopback GCS server): a live
holder in another process makes `percausal train` exit 2 naming it; dead holders (pid gone, pid reused, lease
expired) are taken over with a warning; concurrent takers get the lock exactly once; the heartbeat advances and a
lost lock is noticed; a finished or failed run leaves no lock behind."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from percausal_jax import cli, storage
from percausal_jax.lock import LEASE_S, LOCK_NAME, WorkdirLock, read_holder
from tests.training.common import train_args

REPO = Path(__file__).resolve().parents[2]
# a second process that takes the lock, says so, and holds it until its stdin closes
HOLD = ("import sys; from percausal_jax.lock import WorkdirLock; lock = WorkdirLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.read(); lock.release()")
# a process that tries once and prints whether it got the lock (holding it until stdin closes)
TRY = ("import sys; from percausal_jax.errors import UserError; from percausal_jax.lock import WorkdirLock\n"
       "try:\n    lock = WorkdirLock(sys.argv[1]).acquire(); print('won', flush=True); sys.stdin.read()\n"
       "except UserError as e:\n    print('lost', e, flush=True)\n")


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('gcs').bucket()}/runs/x"


def _python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=os.environ.copy(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _write_lock(workdir: str, **holder) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "started": "2020-01-01T00:00:00Z",
              "heartbeat": time.time(), "lease_s": LEASE_S, "command": "train", "nonce": "n", **holder}
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    (storage.path(workdir) / LOCK_NAME).write_text(json.dumps(record))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _files(workdir: str) -> list[str]:
    root = storage.path(workdir)
    return sorted(rel for _, rel in storage._walk(root)) if root.exists() else []


def test_second_train_on_a_held_workdir_exits_2_naming_the_holder(setup, workdir, capsys):
    model_dir, data = setup
    holder = _python(HOLD, workdir)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        before = _files(workdir)
        assert cli.main(train_args(model_dir, data, workdir, "ce")) == 2
        err = capsys.readouterr().err.strip()
        record = read_holder(workdir)
        assert record["pid"] == holder.pid
        assert err.count("\n") == 0 and "Traceback" not in err, err
        assert f"host {socket.gethostname()}, pid {holder.pid}, started {record['started']}" in err, err
        assert _files(workdir) == before == [LOCK_NAME]  # nothing written, the holder's lock untouched
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and read_holder(workdir) is None  # released on exit


@pytest.mark.parametrize("case", ["pid_gone", "pid_reused", "lease_expired"])
def test_a_dead_holder_is_taken_over_with_a_warning(workdir, case, capsys):
    if case == "pid_gone":
        _write_lock(workdir, pid=_dead_pid())
    elif case == "pid_reused":  # a live pid whose start time is not the holder's: another program now
        _write_lock(workdir, pid=os.getppid(), pid_start="1")
    else:  # another host: only the heartbeat tells
        _write_lock(workdir, host="elsewhere", pid=1, heartbeat=time.time() - LEASE_S - 60)
    lock = WorkdirLock(workdir).acquire()
    try:
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "taking over the lock of a dead run" in err and "started 2020-01-01" in err
        assert read_holder(workdir)["pid"] == os.getpid() and read_holder(workdir)["nonce"] != "n"
    finally:
        lock.release()
    assert read_holder(workdir) is None


@pytest.mark.parametrize("case", ["live_pid", "fresh_lease"])
def test_a_live_holder_is_not_taken_over(workdir, case):
    if case == "live_pid":  # the test's parent process: alive, on this host
        _write_lock(workdir, pid=os.getppid())
    else:  # another host, heartbeat within the lease
        _write_lock(workdir, host="elsewhere", pid=1, heartbeat=time.time() - LEASE_S / 2)
    with pytest.raises(Exception, match="in use by another run") as e:
        WorkdirLock(workdir).acquire()
    assert type(e.value).__name__ == "UserError"
    assert read_holder(workdir)["nonce"] == "n"


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_concurrent_takers_get_the_lock_exactly_once(workdir, stale):
    if stale:
        _write_lock(workdir, pid=_dead_pid())
    procs = [_python(TRY, workdir) for _ in range(3)]
    lines = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.communicate("", timeout=60)
    assert sum(line == "won" for line in lines) == 1, lines
    assert all(line == "won" or line.startswith("lost") for line in lines), lines


def test_heartbeat_advances_and_a_lost_lock_is_noticed(workdir):
    lock = WorkdirLock(workdir, heartbeat_s=0.05).acquire()
    try:
        first = read_holder(workdir)["heartbeat"]
        deadline = time.time() + 30
        while read_holder(workdir)["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat did not advance"
            time.sleep(0.05)
        lock.check()  # still ours
        _write_lock(workdir, host="elsewhere", pid=4242)  # another run took it (e.g. after a stalled lease)
        while not lock.lost:
            assert time.time() < deadline, "the lost lock was not noticed"
            time.sleep(0.05)
        with pytest.raises(Exception, match="taken over by another run .host elsewhere, pid 4242"):
            lock.check()
    finally:
        lock.release()
    assert read_holder(workdir)["pid"] == 4242  # the new holder's lock is left alone


def test_a_run_takes_over_a_dead_lock_and_releases_it(setup, tmp_path, capsys):
    model_dir, data = setup
    work = tmp_path / "run"
    _write_lock(str(work), pid=_dead_pid())
    assert cli.main(train_args(model_dir, data, work, "ce", steps=2)) == 0
    assert "taking over the lock of a dead run" in capsys.readouterr().err
    assert not (work / LOCK_NAME).exists() and (work / "checkpoints" / "2").is_dir()


def test_a_failed_run_leaves_no_lock_and_no_workdir(setup, tmp_path, capsys):
    model_dir, data = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": 3}\n')
    work = tmp_path / "new" / "run"
    assert cli.main(train_args(model_dir, bad, work, "ce", extra=["--config.data.strict=true"])) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "new").exists()
