"""A command that drives training in-process stops when that training is preempted (issue 26, item 2): a real SIGTERM
mid-cell ends `percausal sweep` with exit 75 and one line saying how to resume, the cell is not cached, and running
the same command again resumes it to the result of an uninterrupted sweep."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from percausal_jax import cli
from percausal_jax.sweep.training import Preempted, stopped_early
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS

REPO = Path(__file__).resolve().parents[1]
STEPS = 60  # ~20 ms a step on CPU once compiled: SIGTERM after step 1 lands well before the last step


def test_stopped_early_reads_the_loops_last_record():
    assert not stopped_early({}, 6)  # a finished run, re-run: no step ran
    assert not stopped_early({"step": 6, "nan_skips": 0}, 6)
    assert not stopped_early({"step": 8, "nan_skips": 2}, 6)  # skipped non-finite steps are made up for
    assert stopped_early({"step": 7, "nan_skips": 2}, 6)
    assert stopped_early({"step": 3, "nan_skips": 0}, 6)
    assert stopped_early({"step": 6, "nan_skips": 0, "preempted": True}, 6)  # said explicitly by the loop
    assert Preempted("x").exit_code == 75


def test_demo_stops_when_a_training_is_preempted(tmp_path, monkeypatch, capsys):
    """The demo's trainings run through train_to_end: ce finished (re-run: no step ran), perce returns after 3 of 12
    steps as the loop does when preempted: exit 75, one line, nothing evaluated. (The real SIGTERM is the sweep
    test's.)"""
    from percausal_jax.hf import gguf
    from percausal_jax.training import loop

    calls = []

    def train(rc, workdir, progress=True):
        calls.append((rc.objective.name, rc.train.steps, Path(workdir).name))
        return {} if rc.objective.name == "ce" else {"step": 3, "nan_skips": 0, "loss": 1.0}

    monkeypatch.setattr(gguf, "embedded_model_dir", lambda: tmp_path / "model")
    monkeypatch.setattr(loop, "train", train)
    out = tmp_path / "demo_out"
    assert cli.main(["demo", "--out", str(out), "--users", "4"]) == 75
    assert calls == [("ce", 12, "ce"), ("perce", 12, "perce")]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"percausal demo: error: train perce: training was preempted after 3 of 12 steps (checkpoint saved in "
        f"{out / 'runs' / 'perce'}); nothing after it ran: re-run the same command to resume")
    assert sorted(p.name for p in out.iterdir()) == ["data"]  # no eval, export, scores or report


def _sweep_argv(tmp_path, out):
    return ["sweep", "--config", "configs/tiny.py", "--out", str(out), "--train", str(tmp_path / "train.jsonl"),
            "--val", str(tmp_path / "val.jsonl"), "--test", str(tmp_path / "test.jsonl"), "--objectives", "ce",
            "--lrs", "1e-2", "--seeds", "0", "--select", "nll", "--eval-limit", "1", "--max-new-tokens", "2",
            f"--config.model.path={tmp_path / 'model'}", f"--config.train.steps={STEPS}", "--config.lora.rank=4",
            "--config.train.grad_accum_steps=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
            "--config.checkpoint.every_steps=1000"]  # a checkpoint only at the end, or when preempted


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_mid_cell_stops_the_sweep_and_a_rerun_resumes_it(tmp_path):
    tiny_hf_model("llama", tmp_path / "model", num_hidden_layers=1)
    tiny_tokenizer(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**r, "id": f"{r['id']}{k}"}) + "\n"
                                                  for k in "ab" for r in RECORDS))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[2:]))
    out = tmp_path / "sw"
    argv = _sweep_argv(tmp_path, out)
    work = out / "ce-lr0.01-s0"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "percausal_jax", *argv], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ((work / "metrics.jsonl").exists() and (work / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.perf_counter() - t0 < 300, "no training step logged"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the training loop's handler is installed: step 1 is logged
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    reached = re.search(r"^preempted: checkpoint saved at step (\d+);", err, re.M)
    assert proc.returncode == 75 and reached, err[-3000:]
    step = int(reached[1])
    assert 1 <= step < STEPS
    assert err.rstrip("\n").splitlines()[-1] == (
        f"percausal sweep: error: ce lr=0.01 seed=0: training was preempted after {step} of {STEPS} steps "
        f"(checkpoint saved in {work}); nothing after it ran: re-run the same command to resume")
    assert "Traceback" not in err
    assert (work / "checkpoints" / str(step)).is_dir()
    assert not (work / "cell.json").exists() and not (out / "sweep.json").exists()  # not cached, no report

    # the same command again: the cell resumes from its checkpoint and finishes; the sweep completes
    assert cli.main(argv) == 0
    resumed = json.loads((work / "cell.json").read_text())["cell"]
    metrics = _lines(work / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))  # every step once

    # equal to a sweep that was never interrupted
    straight_out = tmp_path / "straight"
    assert cli.main(_sweep_argv(tmp_path, straight_out)) == 0
    straight_work = straight_out / "ce-lr0.01-s0"
    straight = json.loads((straight_work / "cell.json").read_text())["cell"]
    assert [r["loss"] for r in metrics] == [r["loss"] for r in _lines(straight_work / "metrics.jsonl")]
    assert resumed["val"] == straight["val"] and resumed["test"] == straight["test"]
    assert _lines(work / "test_preds.jsonl") == _lines(straight_work / "test_preds.jsonl")
    print(f"preempted sweep, resumed, and a straight one: {time.perf_counter() - t0:.1f} s")
