"""README is the acceptance test: its "Training on real data" and "Training on a TPU pod" blocks run as written.

Only three things are substituted, none of them in the text of the commands:
- the hub: an offline Hugging Face cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``) holding tiny stand-ins under the
  README's hub ids (``Qwen/Qwen3-4B``, ``Qwen/Qwen3-14B``, and ``LongLaMP/LongLaMP`` in the hub's parquet layout);
- the model: those stand-ins are tiny random Qwen3 models;
- the bucket: ``gs://my-bucket`` is a bucket on the loopback GCS server;
- and one size: the paper schedule (188 steps of 32 sequences up to 5,000 tokens) does not fit CI's 2 CPU cores,
  so the train command gets ``--config.train.steps=3 --config.train.global_batch_size=8`` appended.
The ``pip install`` line is the set-up ``make`` already did (checked: libtpu imports); the ``launch/tpu_pod.sh``
line needs a TPU slice and ``gcloud`` and is not run (its per-host command is the ``percausal train`` above).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from percausal_jax import storage
from tests.data.tokenizer_fixture import longlamp_rows
from tests.helpers import hub_snapshot, tiny_hf_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SIZES = "--config.train.steps=3 --config.train.global_batch_size=8"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def readme_commands(section: str) -> list[str]:
    """The shell commands of the first ```bash block under ``## {section}`` (continuations joined)."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def hub_entry(cache: Path, repo_type: str, repo_id: str) -> Path:
    return hub_snapshot(cache, repo_id, repo_type, COMMIT)


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    for name in ("Qwen/Qwen3-4B", "Qwen/Qwen3-14B"):
        snap = hub_entry(cache, "model", name)
        tiny_hf_model("qwen3", snap, head_dim=16)
        tiny_tokenizer(snap)
    data = hub_entry(cache, "dataset", "LongLaMP/LongLaMP") / "product_review_user"
    data.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        rows = longlamp_rows(split, n)
        half = len(rows) // 2
        write_parquet(data / f"{split}-00000-of-00002.parquet", rows[:half])
        write_parquet(data / f"{split}-00001-of-00002.parquet", rows[half:])
    return cache


def run(command: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def environment(hub: Path, tmp_path: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_CACHE": str(hub),
            "HF_HUB_OFFLINE": "1", "PERCAUSAL_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow
def test_training_on_real_data_block_runs_as_written(gcs, hub, tmp_path):
    gcs.bucket("my-bucket")
    env = environment(hub, tmp_path)
    commands = readme_commands("Training on real data")
    assert [c.split()[1] for c in commands] == ["prepare", "prepare", "train", "eval", "export"]
    for command in commands:
        if command.startswith("percausal train"):
            command += " " + SIZES
        run(command, env)
    train = [json.loads(x) for x in storage.path("gs://my-bucket/prepared/prw.train.jsonl").read_text().splitlines()]
    assert len(train) == 12 and all(r["task"] == "product_review" and r["template"] == "chat" for r in train)
    steps = [json.loads(x)["step"] for x in
             storage.path("gs://my-bucket/runs/prw/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    preds = storage.path("gs://my-bucket/runs/prw/preds.jsonl").read_text().splitlines()
    assert len(preds) == 4
    # the export on the bucket is a model transformers loads (from a local copy of the objects)
    from transformers import AutoModelForCausalLM

    local = storage.local_dir("gs://my-bucket/exported/prw")
    model = AutoModelForCausalLM.from_pretrained(str(local))
    assert model.config.model_type == "qwen3"
    assert "my-bucket/runs/prw/checkpoints" not in json.dumps(model.config.to_dict())


@pytest.mark.slow
def test_tpu_pod_block_compiles_for_the_slice(hub, tmp_path):
    commands = readme_commands("Training on a TPU pod")
    assert commands[0].startswith("pip install") and "launch/tpu_pod.sh" in commands[2]
    import libtpu  # noqa: F401  (what the pip line installs; `make` installs the tpu extra)

    out = run(commands[1], environment(hub, tmp_path)).stdout
    assert "topology v5p:2x4x4: 32 chips" in out and "FITS" in out
