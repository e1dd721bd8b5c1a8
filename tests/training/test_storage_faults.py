"""Storage faults: the GCS server killed in the middle of a checkpoint save.

The server is the real ``fake-gcs-server`` (filesystem backend, so its objects survive a restart) behind
:class:`tests.gcs.KillSwitch`, which kills it the moment a request names the step-4 checkpoint.
- A short outage (a few seconds, then the server is back): with the default retry bound the run rides it out and
  its losses equal an uninterrupted run's.
- An outage longer than the bound (here set to one retry, about a second, so that the test need not wait out the
  default's minute): the run fails with one line (exit 3), never takes the partial step 4 as its latest checkpoint,
  and, re-run once the server is back, resumes from step 2 and ends exactly where an uninterrupted run ends."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gcs import GcsServer, KillSwitch, free_port
from tests.training.common import train_args

REPO = Path(__file__).resolve().parents[2]


def _run(argv, **env):
    full = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run([sys.executable, "-m", "percausal_jax", *map(str, argv)], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=600)


def _argv(setup, work):
    model_dir, data = setup
    return train_args(model_dir, data, work, "perce", steps=6, extra=[
        "--config.mesh.fsdp=1", "--config.mesh.tensor=1", "--config.checkpoint.every_steps=2",
        "--config.data.shuffle=true", "--config.data.eval="])


def _losses(text: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, text.splitlines())]


def _one_error_line(stderr: str, code_expected: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("percausal train: error:")]
    assert len(errors) == 1 and code_expected in errors[0], stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def expected(setup, tmp_path_factory):
    """The uninterrupted run's losses (local disk)."""
    work = tmp_path_factory.mktemp("straight") / "run"
    straight = _run(_argv(setup, work))
    assert straight.returncode == 0, straight.stderr[-3000:]
    return _losses((work / "metrics.jsonl").read_text())


@pytest.mark.slow
def test_a_short_gcs_outage_mid_checkpoint_is_ridden_out(setup, tmp_path, expected):
    server = GcsServer(free_port(), root=tmp_path / "gcs").start()
    try:
        bucket = server.bucket()
        switch = KillSwitch(server, "run/checkpoints/4/", outage_s=4.0)
        env = {"STORAGE_EMULATOR_HOST": switch.url, "TENSORSTORE_GCS_HTTP_URL": switch.url}
        assert "PERCAUSAL_STORAGE_RETRIES" not in os.environ  # the default bound
        run = _run(_argv(setup, f"{bucket}/run"), **env)
        assert switch.fired.is_set() and switch.restored.is_set(), run.stderr[-3000:]
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        assert _losses(server.read(bucket, "run/metrics.jsonl").decode()) == expected
        names = server.objects(bucket)
        assert {f"run/checkpoints/{s}/commit_success.txt" for s in (2, 4, 6)} <= set(names), names
    finally:
        server.stop()


@pytest.mark.slow
def test_gcs_server_killed_mid_checkpoint_then_resumed_exactly(setup, tmp_path, expected):
    server = GcsServer(free_port(), root=tmp_path / "gcs").start()
    try:
        bucket = server.bucket()
        switch = KillSwitch(server, "run/checkpoints/4/")
        env = {"STORAGE_EMULATOR_HOST": switch.url, "TENSORSTORE_GCS_HTTP_URL": switch.url,
               "PERCAUSAL_STORAGE_RETRIES": "1"}
        failed = _run(_argv(setup, f"{bucket}/run"), **env)
        assert switch.fired.is_set(), failed.stderr[-3000:]
        assert failed.returncode == 3, failed.stderr[-3000:]
        line = _one_error_line(failed.stderr, "checkpoint")
        assert f"{bucket}/run" in line and "saving checkpoints" in line and "re-run the same command" in line

        server.start()  # back, with what it had stored before it died
        names = server.objects(bucket)
        assert "run/checkpoints/2/commit_success.txt" in names
        assert "run/checkpoints/4/commit_success.txt" not in names  # step 4 is partial: never the latest
        env = {"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url}
        resumed = _run(_argv(setup, f"{bucket}/run"), **env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "taking over" in resumed.stderr.lower() or "took over" in resumed.stderr.lower(), resumed.stderr
        got = _losses(server.read(bucket, "run/metrics.jsonl").decode())
        assert got == expected  # steps 3..6 recomputed from step 2's state: the uninterrupted run's losses
        assert "run/checkpoints/6/commit_success.txt" in server.objects(bucket)
    finally:
        server.stop()
