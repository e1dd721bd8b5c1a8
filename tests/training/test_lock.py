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

import numpy as np
import pytest

from percausal_jax import cli, storage
from percausal_jax.lock import LEASE_S, LOCK_NAME, WorkdirLock, read_holder
from tests.training.common import train_args

REPO = Path(__file__).resolve().parents[2]
# a second process that takes the lock, says so, and holds it until its stdin closes
HOLD = ("import sys; from percausal_jax.lock import WorkdirLock; lock = WorkdirLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.read(); lock.release()")


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


# Takers that start together: each waits for the round's barrier file (polling every 0.5 ms) and then tries the
# round's workdir once, printing the monotonic time it left the barrier; the winner holds the lock until the round's
# end file appears. One process per taker for all rounds (a Python start-up per round would not fit the time).
TAKER = r"""
import os, sys, time
from percausal_jax.errors import UserError
from percausal_jax.lock import WorkdirLock

def wait_for(name):
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(sys.argv[1], name)):
        if time.monotonic() > deadline:
            sys.exit(f"no {name} in 120 s")
        time.sleep(0.0005)

for r, workdir in enumerate(sys.argv[2:]):
    print("ready", flush=True)
    wait_for(f"go-{r}")
    t, lock = time.monotonic(), None
    try:
        lock = WorkdirLock(workdir).acquire()
        print("won", t, time.monotonic(), flush=True)
    except UserError as e:
        print("lost", t, time.monotonic(), e, flush=True)
    wait_for(f"end-{r}")
    if lock is not None:
        lock.release()
    print("done", flush=True)
"""
ROUNDS, TAKERS = 20, 4


def test_concurrent_takers_get_the_lock_exactly_once(workdir, tmp_path):
    """20 rounds, each on a fresh workdir (free in even rounds; in odd ones holding a dead run's lock, which all
    try to take over): 4 processes released together by a barrier file (once all said they wait) race for it;
    exactly one writes the lock and holds it, the others are told it is in use by another run; the winner's release
    leaves no lock."""
    rounds = [f"{workdir}-{r}" for r in range(ROUNDS)]
    dead = _dead_pid()
    for w in rounds[1::2]:
        _write_lock(w, pid=dead)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_python(TAKER, str(barrier), *rounds) for _ in range(TAKERS)]

    def lines():
        out = [p.stdout.readline().strip() for p in procs]
        assert all(out), [p.stderr.read()[-2000:] for p, line in zip(procs, out) if not line]
        return out

    spreads, raced = [], 0
    try:
        for r, w in enumerate(rounds):
            assert lines() == ["ready"] * TAKERS
            (barrier / f"go-{r}").touch()
            results = [line.split(" ", 3) for line in lines()]
            winners = [p.pid for p, res in zip(procs, results) if res[0] == "won"]
            assert len(winners) == 1, (r, results)
            assert all(res[0] == "won" or (res[0] == "lost" and "in use by another run" in res[3])
                       for res in results), (r, results)
            assert read_holder(w)["pid"] == winners[0]
            starts = [float(res[1]) for res in results]
            spreads.append(max(starts) - min(starts))
            won_at = next(float(res[2]) for res in results if res[0] == "won")
            raced += any(res[0] == "lost" and float(res[1]) < won_at for res in results)
            (barrier / f"end-{r}").touch()
            assert lines() == ["done"] * TAKERS
            assert read_holder(w) is None, r
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read()[-2000:]
        assert raced >= ROUNDS // 4, f"only {raced} rounds had a loser start before the winner held the lock"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"barrier release spread: median {np.median(spreads) * 1e3:.1f} ms, max {max(spreads) * 1e3:.1f} ms; "
          f"{raced} of {ROUNDS} rounds had a loser start before the winner held the lock")


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
