"""Multi-process = single process: a 2-process run (gloo, one CPU device each, ``jax.distributed``) and a 1-process
run with 2 CPU devices of the same config give identical per-step losses and bitwise-identical exported weights,
for PerCE and NextQuill, with bucketing on (records of several lengths, so batches take different bucket shapes
and both processes must agree on each batch's shape).

Each process reads only its share of every global batch, so this checks the data split, the common bucket shape,
the cross-process gradient all-reduce (2 participants: a sum whose order cannot differ) and the checkpoint written
by two processes, which export then restores in one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from percausal_jax import cli

from tests.training.common import train_args

REPO = Path(__file__).resolve().parents[2]
WORDS = "warm light for reading lamp glimmerous toaster heats evenly zesty friends night walks".split()


@pytest.fixture(scope="module")
def varied(setup, tmp_path_factory):
    """12 records whose prompts and responses span several 32-token buckets, none over the length limits (a dropped
    example shifts only its own process's later batches, so runs with drops differ by design: pipeline.py)."""
    rows = []
    for i in range(12):
        profile = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4))
        item = WORDS[i % len(WORDS)]
        completion = " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(1 + 2 * (i % 3))) + "."
        rows.append({"id": f"v{i}", "prompt": f"User profile: {profile}. Write a review of the {item}.",
                     "prompt_no_profile": f"Write a review of the {item}.", "completion": " " + completion})
    path = tmp_path_factory.mktemp("varied") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return setup[0], path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _run(argv, env):
    return subprocess.Popen([sys.executable, "-m", "percausal_jax", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=1200):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    assert "dropped" not in err and "truncated" not in err, err[-3000:]
    return out


def _losses(work: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (work / "metrics.jsonl").read_text().splitlines()]


def _exported(work: Path, out: Path) -> dict[str, np.ndarray]:
    assert cli.main(["export", "--workdir", str(work), "--out", str(out)]) == 0  # restored onto this process's devices
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["nextquill"])  # PerCE: test_layouts.py, case A
def test_two_processes_equal_one_process_bitwise(varied, tmp_path, objective):
    model_dir, data = varied
    common = ["--config.data.shuffle=true", "--config.data.eval=", "--config.data.bucket_multiple=32",
              "--config.mesh.fsdp=2", "--config.mesh.tensor=1", "--config.train.grad_accum_steps=2",
              "--config.checkpoint.every_steps=2"]
    argv = lambda work: train_args(model_dir, data, work, objective, steps=4, extra=common)  # noqa: E731
    one = _run(argv(tmp_path / "one"), _env(2))
    port = _free_port()
    two = [_run([*argv(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", i], _env(1)) for i in range(2)]
    for proc in (one, *two):
        _finish(proc)

    losses = _losses(tmp_path / "one")
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert _losses(tmp_path / "two") == losses  # exact, not close
    iter_files = {p.name for p in (tmp_path / "two" / "checkpoints" / "4" / "iter").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= iter_files  # each process saved its own data position

    a, b = _exported(tmp_path / "one", tmp_path / "hf_one"), _exported(tmp_path / "two", tmp_path / "hf_two")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    # the runs trained: the export differs from the base model it started from
    base = load_file(str(model_dir / "model.safetensors"))
    assert any(not np.array_equal(base[k], a[k]) for k in a if k in base)
