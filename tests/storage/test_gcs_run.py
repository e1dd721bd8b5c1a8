"""The whole run on a bucket: data, base model and workdir on gs:// (the loopback GCS server), killed with SIGKILL
mid-run and resumed bit-exactly, then evaluated and exported from the bucket, and the export loaded by
transformers."""

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

from percausal_jax import cli, storage
from percausal_jax.training.export import restore_model
from tests.gcs import upload_tree
from tests.training.common import RECORDS, train_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bucket_run(gcs, tmp_path_factory):
    """A bucket holding a tiny model and 12 training records, and an uninterrupted 6-step run on it."""
    from tests.helpers import tiny_hf_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("gcsrun")
    os.environ["PERCAUSAL_CACHE"] = str(root / "cache")  # local copies of gs:// inputs
    model = root / "model"
    tiny_hf_model("llama", model)
    tiny_tokenizer(model)
    bucket = gcs.bucket()
    upload_tree(model, f"{bucket}/models/tiny")
    rows = [{**r, "id": f"{r['id']}-{k}", "completion": r["completion"] + ["", " Yes.", " Indeed."][k]}
            for k in range(3) for r in RECORDS]
    storage.path(f"{bucket}/data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    straight = f"{bucket}/runs/straight"
    assert cli.main(args(bucket, straight, 6)) == 0
    yield bucket, straight
    os.environ.pop("PERCAUSAL_CACHE", None)


def args(bucket, workdir, steps, extra=()):
    return train_args(f"{bucket}/models/tiny", f"{bucket}/data/train.jsonl", workdir, "perce", steps=steps,
                      extra=["--config.data.shuffle=true", "--config.data.eval=", *extra])


def losses(workdir):
    lines = storage.path(f"{workdir}/metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines], [json.loads(line)["step"] for line in lines]


def params(workdir):
    model = restore_model(workdir)[0]
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_straight_run_writes_everything_to_the_bucket(gcs, bucket_run):
    bucket, straight = bucket_run
    names = gcs.objects(bucket)
    prefix = "runs/straight/"
    assert f"{prefix}checkpoints/6/commit_success.txt" in names
    assert any(n.startswith(f"{prefix}checkpoints/6/iter/") for n in names)  # the Grain iterator state
    assert any(n.startswith(f"{prefix}tensorboard/events.out.tfevents") for n in names)
    assert losses(straight)[1] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigkill_on_the_bucket_resumes_exactly(gcs, bucket_run):
    bucket, straight = bucket_run
    work = f"{bucket}/runs/killed"
    run_args = args(bucket, work, 6, extra=["--config.checkpoint.every_steps=1"])
    proc = subprocess.Popen([sys.executable, "-m", "percausal_jax", *run_args], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(n.endswith("checkpoints/2/commit_success.txt") for n in gcs.objects(bucket)):
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, "timed out waiting for a committed checkpoint on the bucket"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = {int(n.split("/")[3]) for n in gcs.objects(bucket)
            if n.startswith("runs/killed/checkpoints/") and n.endswith("commit_success.txt")}
    assert 2 <= max(done) < 6, "the run was not interrupted mid-way"
    assert cli.main(run_args) == 0
    got, steps = losses(work)
    assert steps == [1, 2, 3, 4, 5, 6]  # one line per step, none repeated after the resume
    assert got == losses(straight)[0]
    for x, y in zip(params(straight), params(work)):
        np.testing.assert_array_equal(x, y)


def test_eval_reads_the_run_from_the_bucket_and_writes_there(bucket_run, capsys):
    bucket, straight = bucket_run
    out = f"{bucket}/eval/preds.jsonl"
    assert cli.main(["eval", "--workdir", straight, "--data", f"{bucket}/data/train.jsonl", "--out", out,
                     "--limit", "2", "--max-new-tokens", "4", "--no-meteor", "--no-progress", "--task",
                     "product_review"]) == 0
    rows = [json.loads(line) for line in storage.path(out).read_text().splitlines()]
    assert len(rows) == 2 and all("prediction" in r for r in rows)
    assert "rougeL" in json.loads(storage.path(f"{bucket}/eval/preds.metrics.json").read_text())
