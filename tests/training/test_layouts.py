"""Every device layout of a slice trains exactly what one process does on the same mesh: real separate processes
(gloo, ``--coordinator``) against one process with the same number of CPU devices and the same config, per-step
losses and eval metrics ≤ 1e-6 relative, exported weights ≤ 1e-6.

The layouts are those a pod slice produces, built from an explicit device order (``mesh.dcn_*``: which axis crosses
processes) where JAX's own order would not cross:

======  =========  ==============================  =========  ==========  ===========
case    processes  mesh (dcn: ranks across hosts)   objective  batches     grad accum
======  =========  ==============================  =========  ==========  ===========
A       2 × 1      tensor=2 (JAX order: crosses)   PerCE      bucketing   2
C       2 × 2      fsdp=2, tensor=2 (dcn_tensor)   NextQuill  bucketing   2
D       4 × 2      data=2, fsdp=2, tensor=2        PerCE      packing     2
                   (dcn_data=2, dcn_tensor=2)
======  =========  ==============================  =========  ==========  ===========

In A both processes are replicas of the one row block (before row layouts, each read its own half of the
batch and the run trained on inconsistent rows); in C each process reads both blocks; in D four processes read four
blocks, two readers each. Every run ends with an eval pass over ``data.eval``.

CI time: about 10 min of one worker's time on 2 cores (12 processes in all, most of it jit compilation;
measured 2026-12-08 beside the other xdist worker: A 233 s, C 280 s, D 114 s).
"""

import json

import numpy as np
import pytest

from tests.training.common import train_args
from tests.training.test_multiprocess import _env, _exported, _free_port, _run, varied  # noqa: F401

CASES = {
    "A-2x1-tensor2-perce-bucketing-accum2": (2, 1, ["--config.mesh.fsdp=1", "--config.mesh.tensor=2"], "perce",
                                             False, 2),
    "C-2x2-tensor-across-nextquill-bucketing-accum2": (2, 2, ["--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                                                              "--config.mesh.dcn_tensor=2"], "nextquill", False, 2),
    "D-4x2-data-fsdp-tensor-perce-packing-accum2": (4, 2, ["--config.mesh.data=2", "--config.mesh.fsdp=2",
                                                           "--config.mesh.tensor=2", "--config.mesh.dcn_data=2",
                                                           "--config.mesh.dcn_tensor=2"], "perce", True, 2),
}
STEPS = 3


def _finish_all(procs, timeout=1500):
    """Waits for every process; on any failure, shows each one's exit code and the end of its stderr."""
    done = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=timeout)]]
    if any(code != 0 for code, _ in done):
        pytest.fail("\n".join(f"--- process {i} (0 = the one-process run): exit {code}\n{err[-1500:]}"
                               for i, (code, err) in enumerate(done)))
    for _, err in done:
        assert "dropped" not in err and "truncated" not in err, err[-2000:]


def _metrics(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_layout_trains_what_one_process_trains(varied, tmp_path, case):
    processes, per_process, mesh, objective, packing, accum = CASES[case]
    model_dir, data = varied
    common = [*mesh, "--config.data.shuffle=true", f"--config.data.packing={str(packing).lower()}",
              "--config.data.bucket_multiple=32", "--config.train.global_batch_size=8",
              f"--config.train.grad_accum_steps={accum}", "--config.train.eval_batches=2",
              f"--config.checkpoint.every_steps={STEPS}"]
    argv = lambda work: train_args(model_dir, data, work, objective, steps=STEPS, extra=common)  # noqa: E731
    one = _run(argv(tmp_path / "one"), _env(processes * per_process))
    port = _free_port()
    many = [_run([*argv(tmp_path / "many"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", processes,
                  "--process-id", i], _env(per_process)) for i in range(processes)]
    _finish_all([one, *many])

    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "many")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"], (x, y)  # the same rows: the same response tokens per step
        for key in ("loss", "grad_norm", "eval_loss", "eval_nll"):
            if key in x:
                np.testing.assert_allclose(y[key], x[key], rtol=1e-6, err_msg=f"step {x['step']} {key}")
    assert "eval_loss" in a[-1] and "eval_loss" in b[-1]

    one_w, many_w = _exported(tmp_path / "one", tmp_path / "hf_one"), _exported(tmp_path / "many", tmp_path / "hf")
    assert one_w.keys() == many_w.keys() and len(one_w) > 0
    for name in one_w:
        np.testing.assert_allclose(many_w[name], one_w[name], rtol=1e-6, atol=1e-6, err_msg=name)
