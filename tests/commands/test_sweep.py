"""`percausal sweep`: objectives × learning rates, best LR per method, all cells."""

import json

from percausal_jax import cli
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS


def test_sweep_tables(tmp_path):
    tiny_hf_model("llama", tmp_path / "model")
    tiny_tokenizer(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--config", "configs/tiny.py", "--out", str(out), "--train", str(data), "--test",
                     str(data), "--objectives", "ce,perce", "--lrs", "1e-4,3e-3", "--eval-limit", "2",
                     "--max-new-tokens", "3", "--metric", "rouge1", f"--config.model.path={tmp_path / 'model'}",
                     "--config.train.steps=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=4"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert set(result["cells"]) == {"ce", "perce"} and set(result["cells"]["ce"]) == {"0.0001", "0.003"}
    for method, best in result["best"].items():
        cells = result["cells"][method]
        assert best["rouge1"] == max(c["rouge1"] for c in cells.values())
    table = (out / "sweep.md").read_text()
    assert "| ce |" in table and "| perce |" in table and "Best learning rate" in table
