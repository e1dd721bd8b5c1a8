"""Exact resume (re-run, SIGTERM, kill -9, truncated checkpoint); multi-process runs: test_multiprocess.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from percausal_jax import cli
from percausal_jax.training.export import restore_model
from tests.training.common import RECORDS, train_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data12(setup, tmp_path_factory):
    """12 records, so the shuffled order (and the iterator state) matters for the result."""
    rows = [{**r, "id": f"{r['id']}-{k}", "completion": r["completion"] + " " * 0 + ["", " Yes.", " Indeed."][k]}
            for k in range(3) for r in RECORDS]
    path = tmp_path_factory.mktemp("d12") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return setup[0], path


def _args(model_dir, data, work, steps, extra=()):
    return train_args(model_dir, data, work, "perce", steps=steps,
                      extra=["--config.data.shuffle=true", "--config.data.eval=", *extra])


def _losses(work):
    return [json.loads(line)["loss"] for line in (Path(work) / "metrics.jsonl").read_text().splitlines()]


def _params(work):
    model = restore_model(work)[0]
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_same_run(a, b):
    assert _losses(a) == _losses(b)
    for x, y in zip(_params(a), _params(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(data12, tmp_path_factory):
    work = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(_args(*data12, work, steps=6)) == 0
    return work


def test_rerun_with_more_steps_is_bitwise_identical(data12, straight, tmp_path):
    work = tmp_path / "run"
    assert cli.main(_args(*data12, work, steps=3)) == 0
    assert cli.main(_args(*data12, work, steps=6)) == 0
    _assert_same_run(straight, work)


def _spawn(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "percausal_jax", *args], cwd=REPO, env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_lines(work, n, proc, timeout=240):
    metrics = Path(work) / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_killed_run_resumes_exactly(data12, straight, tmp_path, sig):
    """SIGTERM: checkpoint at the current step and exit 0. kill -9 (checkpoint every step, async saves in flight):
    the restart uses the newest complete checkpoint. Either way the finished run equals the straight one."""
    work = tmp_path / "run"
    args = _args(*data12, work, steps=6, extra=["--config.checkpoint.every_steps=1"])
    proc = _spawn(args)
    _wait_for_lines(work, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, err[-2000:]
    steps_done = len(_losses(work))
    assert 2 <= steps_done < 6, "the run was not interrupted mid-way"
    # metrics.jsonl may hold steps after the last complete checkpoint: the resumed run rewrites them
    assert cli.main(args) == 0
    losses = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()}
    assert [losses[s] for s in range(1, 7)] == _losses(straight)
    for x, y in zip(_params(straight), _params(work)):
        np.testing.assert_array_equal(x, y)


def test_truncated_latest_checkpoint_falls_back(data12, straight, tmp_path, caplog):
    work = tmp_path / "run"
    assert cli.main(_args(*data12, work, steps=4, extra=["--config.checkpoint.every_steps=2"])) == 0
    latest = work / "checkpoints" / "4" / "state"
    files = sorted((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for f in files[-3:]:  # cut the biggest data files in half
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        assert cli.main(_args(*data12, work, steps=6, extra=["--config.checkpoint.every_steps=2"])) == 0
    assert any("step 4" in r.getMessage() for r in caplog.records)
    for x, y in zip(_params(straight), _params(work)):
        np.testing.assert_array_equal(x, y)
