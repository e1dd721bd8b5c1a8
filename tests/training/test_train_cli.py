"""`percausal train` end to end on a tiny model (every objective), config overrides, export, and bad configs."""

import json

import numpy as np
import pytest

from percausal_jax import cli
from percausal_jax.config import RunConfig, load_config
from percausal_jax.objectives import NextQuill, PerCE
from percausal_jax.errors import UserError
from tests.helpers import torch_logits
from tests.training.common import train_args

@pytest.mark.parametrize("objective", ["ce", "perce", "nextquill", "lossce", "entce"])
def test_each_objective_decreases_its_loss(setup, tmp_path, objective):
    model_dir, data = setup
    assert cli.main(train_args(model_dir, data, tmp_path / "run", objective)) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    assert "eval_loss" in rows[-1] and rows[-1]["tokens_per_s"] > 0
    if objective == "perce":
        assert {"pir_mean", "frac_clip_min", "frac_clip_max", "weight_mean"} <= set(rows[0])
    if objective == "nextquill":
        assert "frac_upweighted" in rows[0]


def test_export_reloads_in_transformers_and_lora_merges(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    import percausal_jax as pj

    model_dir, data = setup
    work = tmp_path / "run"
    assert cli.main(train_args(model_dir, data, work, "perce", steps=3, extra=["--config.lora.rank=4"])) == 0
    out = tmp_path / "hf"
    assert cli.main(["export", "--workdir", str(work), "--out", str(out)]) == 0
    ids = np.arange(3, 15)[None]
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = pj.load_pretrained(model_dir)
    ours = pj.load_pretrained(out)
    np.testing.assert_allclose(torch_logits(exported, ids), np.asarray(ours(ids)), atol=1e-5)
    assert np.abs(np.asarray(ours(ids)) - np.asarray(base(ids))).max() > 1e-4  # the adapters moved the model
    assert (out / "tokenizer.json").is_file()


def test_rerun_resumes_from_the_last_checkpoint(setup, tmp_path):
    model_dir, data = setup
    work = tmp_path / "run"
    assert cli.main(train_args(model_dir, data, work, "ce", steps=3)) == 0
    assert cli.main(train_args(model_dir, data, work, "ce", steps=5)) == 0
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_layout_mismatch_on_resume_is_a_clear_error(setup, tmp_path, capsys):
    model_dir, data = setup
    work = tmp_path / "run"
    assert cli.main(train_args(model_dir, data, work, "ce", steps=3)) == 0
    assert cli.main(train_args(model_dir, data, work, "ce", steps=5, extra=["--config.model.scan_layers=false"])) == 2
    assert "scan_layers: checkpoint has True, this run has False" in capsys.readouterr().err


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config("configs/tiny.py", ["--config.optimizer.lr=0.5", "--config.data.packing=true",
                                          "--config.lora.targets=q_proj,v_proj", "--config.train.steps=7"])
    assert cfg.optimizer.lr == 0.5 and cfg.data.packing is True and cfg.train.steps == 7
    assert cfg.lora.targets == ("q_proj", "v_proj")
    with pytest.raises(UserError, match="unknown key 'optimizer.nope'"):
        load_config("configs/tiny.py", ["--config.optimizer.nope=1"])
    with pytest.raises(UserError, match="expected a int"):
        load_config("configs/tiny.py", ["--config.train.steps=many"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.py"))


def test_batch_not_divisible_is_exit_2(setup, tmp_path, capsys):
    model_dir, data = setup
    rc = cli.main(train_args(model_dir, data, tmp_path / "r", "ce", extra=["--config.train.global_batch_size=5"]))
    assert rc == 2 and "not a multiple of train.grad_accum_steps" in capsys.readouterr().err


def test_all_examples_dropped_is_a_clear_error(setup, tmp_path, capsys):
    model_dir, data = setup
    rc = cli.main(train_args(model_dir, data, tmp_path / "r", "ce", extra=["--config.data.max_response_len=2",
                                                                                 "--config.data.truncate_response=false"]))
    assert rc == 2 and "every example was dropped" in capsys.readouterr().err


@pytest.mark.parametrize("arg", [f"{t},{m}" for t in ("abstract", "review", "topic")
                                 for m in ("qwen3-4b", "qwen3-14b", "llama3-8b")])
def test_paper_configs_carry_the_spec_values(arg):
    """perce.md §2 / §4: the typed run config each variant builds (read and validated as training reads it)."""
    c = RunConfig.from_config(load_config(f"configs/perce_longlamp.py:{arg}"))
    assert c.objective == PerCE(clip_min=0.8, clip_max=5.0)
    assert c.data.retriever == "contriever" and c.data.k == 4
    assert c.data.max_prompt_len + c.data.max_response_len == 5000
    assert c.optimizer.name == "adamw" and c.optimizer.lr in (2e-6, 5e-6, 8e-6, 2e-5, 5e-5)
    assert c.train.steps == -(-3 * 2000 // c.train.global_batch_size)  # 3 epochs of 2,000 examples


def test_nextquill_config_carries_the_code_values():
    c = RunConfig.from_config(load_config("configs/nextquill_amazon.py"))
    assert c.objective == NextQuill(delta=0.05, high=0.9, low=0.1, alpha=0.1, per_sequence=True)
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.warmup_ratio) == (5e-6, 0.025, 0.01)
    assert c.data.counterfactual_mode == "placeholder" and c.data.retriever == "recency" and c.data.k == 8
    with pytest.raises(UserError, match="expected TASK,MODEL"):
        load_config("configs/perce_longlamp.py:email,qwen3-4b")


def test_peft_adapter_loads_with_peft_and_matches(setup, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from percausal_jax.training.export import restore_model

    model_dir, data = setup
    work = tmp_path / "run"
    assert cli.main(train_args(model_dir, data, work, "perce", steps=3,
                               extra=["--config.lora.rank=4", "--config.lora.targets=q_proj,v_proj,down_proj"])) == 0
    out = tmp_path / "adapter"
    assert cli.main(["export", "--workdir", str(work), "--out", str(out), "--peft"]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = np.arange(3, 15)[None]
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids)).logits.numpy()
    ours = restore_model(work)[0]
    np.testing.assert_allclose(ref, np.asarray(ours(ids)), atol=1e-5)
    # a full fine-tuning run has no adapter to export
    full = tmp_path / "full"
    assert cli.main(train_args(model_dir, data, full, "ce", steps=1)) == 0
    assert cli.main(["export", "--workdir", str(full), "--out", str(tmp_path / "x"), "--peft"]) == 2
    assert "needs a LoRA run" in capsys.readouterr().err
