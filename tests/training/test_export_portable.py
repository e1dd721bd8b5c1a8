"""Portable exports: a LoRA run trained on an fsdp=4 × tensor=2 mesh from a hub id exports on a 1-device machine
(full, merged, PEFT), from a local or gs:// workdir, to a local dir or a gs:// bucket; the base model is named as
the user named it; a moved base is given with --config.model.path; an interrupted gs:// export never looks
loadable; config.json carries the legacy RoPE/dtype keys older readers need."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import percausal_jax as pj
from percausal_jax import atomic, cli, storage
from percausal_jax.config import RunConfig, load_config
from percausal_jax.hf.checkpoint import hf_state_dict
from percausal_jax.hf.peft import adapter_tensors
from percausal_jax.models.lora import merge_lora
from percausal_jax.training.export import restore_model
from percausal_jax.training.loop import train
from tests.gcs import upload_tree
from tests.helpers import tiny_hf_model, tiny_tokenizer, torch_logits
from tests.training.common import RECORDS

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "acme/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
IDS = np.arange(3, 19)[None]


def fake_hub_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT) -> Path:
    """A hub cache entry as ``snapshot_download`` leaves it (``refs/main`` → ``snapshots/<commit>``)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    shutil.copytree(src, snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def run(tmp_path_factory, gcs):
    """One LoRA run, trained in this process on 8 devices as fsdp=4 × tensor=2, its base given as a hub id (the
    offline hub cache holds it): everything the tests export."""
    from huggingface_hub import constants

    d = tmp_path_factory.mktemp("portable")
    src = d / "src"
    tiny_hf_model("llama", src, rope_parameters=LLAMA3_ROPE)
    tiny_tokenizer(src)
    hub = d / "hub"
    snapshot = fake_hub_repo(hub, HUB_ID, src)
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    mp = pytest.MonkeyPatch()
    mp.setattr(constants, "HF_HUB_CACHE", str(hub))  # read at call time by snapshot_download / transformers
    mp.setenv("HF_HUB_CACHE", str(hub))
    mp.setenv("PERCAUSAL_CACHE", str(d / "cache"))
    cfg = load_config("configs/tiny.py", [
        f"--config.model.path={HUB_ID}", f"--config.data.train={data}", "--config.data.eval=",
        "--config.train.steps=3", "--config.train.global_batch_size=4", "--config.train.grad_accum_steps=1",
        "--config.data.shuffle=false", "--config.optimizer.schedule=constant", "--config.optimizer.lr=1e-2",
        "--config.lora.rank=4", "--config.lora.targets=q_proj,v_proj,down_proj",
        "--config.mesh.fsdp=4", "--config.mesh.tensor=2"])
    work = d / "run"
    train(RunConfig.from_config(cfg), work, progress=False)
    model, r, _, step = restore_model(work)
    assert (r.config.mesh.fsdp, r.config.mesh.tensor) == (4, 2)
    assert dict(r.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}  # restored onto another mesh than trained
    yield {"dir": d, "work": work, "snapshot": snapshot, "hub": hub, "src": src, "data": data, "model": model,
           "logits": np.asarray(model(IDS)), "step": step}
    mp.undo()


def _export_1dev(args, env=None):
    """``percausal export ...`` in a fresh process that sees one CPU device."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           **(env or {})}
    p = subprocess.run([sys.executable, "-m", "percausal_jax", "export", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def _merged_reference(run):
    """The restored model with its adapters merged, as HF tensors."""
    model, _, _, _ = restore_model(run["work"])
    merge_lora(model)
    return dict(hf_state_dict(model))


def test_full_merged_and_peft_exports_on_one_device(run, gcs, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    full, adapter = tmp_path / "full", tmp_path / "adapter"
    assert _export_1dev(["--workdir", run["work"], "--out", full]) == str(full)
    merged_url = gcs.bucket() + "/exports/merged"
    assert _export_1dev(["--workdir", run["work"], "--out", merged_url, "--merge-lora"]) == merged_url
    assert _export_1dev(["--workdir", run["work"], "--out", adapter, "--peft"]) == str(adapter)

    # full = merged, both equal to the restored model merged on 8 devices
    ref = _merged_reference(run)
    weights = load_file(full / "model.safetensors")
    assert set(weights) == set(ref)
    for name, value in ref.items():
        np.testing.assert_allclose(weights[name], value, atol=1e-6, rtol=0, err_msg=name)
    merged_local = storage.local_dir(merged_url)
    merged_weights = load_file(merged_local / "model.safetensors")
    for name in ref:
        np.testing.assert_array_equal(merged_weights[name], weights[name])
    assert (full / "tokenizer.json").is_file() and (merged_local / "tokenizer.json").is_file()

    # transformers loads both and gives our logits; the adapters moved the model
    for d in (full, merged_local):
        hf = AutoModelForCausalLM.from_pretrained(str(d)).eval()
        np.testing.assert_allclose(torch_logits(hf, IDS), run["logits"], atol=1e-5, rtol=0)
    base_logits = np.asarray(pj.load_pretrained(run["snapshot"])(IDS))
    assert np.abs(run["logits"] - base_logits).max() > 1e-3

    # the adapter: exactly the restored LoRA tensors, named after the user's base model and its hub commit
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and config["revision"] == COMMIT
    saved = load_file(adapter / "adapter_model.safetensors")
    expected = adapter_tensors(run["model"])
    assert set(saved) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(saved[name], value)
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(run["src"])).eval()
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(torch.tensor(IDS)).logits.numpy(), run["logits"], atol=1e-5)
    # AutoPeft finds the base by the recorded name and commit (here: in the offline hub cache)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    assert auto.base_model.model.config._name_or_path == HUB_ID
    with torch.no_grad():  # (it grows the vocabulary to the tokenizer's 259 entries: compare the first 256)
        auto_logits = auto(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(auto_logits[..., :run["logits"].shape[-1]], run["logits"], atol=1e-5)


def test_base_model_resolved_again_from_the_hub_cache_of_another_machine(run, tmp_path):
    """The trained-from snapshot is gone; this machine's own hub cache has the recorded commit."""
    other = tmp_path / "other_hub"
    fake_hub_repo(other, HUB_ID, run["src"])
    hidden = run["snapshot"].with_name("hidden")
    run["snapshot"].rename(hidden)
    try:
        out = tmp_path / "adapter"
        _export_1dev(["--workdir", run["work"], "--out", out, "--peft"], env={"HF_HUB_CACHE": str(other)})
    finally:
        hidden.rename(run["snapshot"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and config["revision"] == COMMIT


def test_moved_base_model_with_config_override(run, tmp_path, capsys):
    moved = tmp_path / "moved"
    run["snapshot"].rename(moved)
    try:
        # without the override: one line saying what is missing and what to pass
        assert cli.main(["export", "--workdir", str(run["work"]), "--out", str(tmp_path / "x"), "--peft"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--config.model.path" in err and HUB_ID in err, err
        assert not (tmp_path / "x").exists()
        out = tmp_path / "adapter"
        # another name for the base: refused until --base-moved says so (the weights are checked either way)
        assert cli.main(["export", "--workdir", str(run["work"]), "--out", str(out), "--peft",
                         f"--config.model.path={moved}"]) == 2
        assert "--base-moved" in capsys.readouterr().err and not out.exists()
        assert cli.main(["export", "--workdir", str(run["work"]), "--out", str(out), "--peft",
                         f"--config.model.path={moved}", "--base-moved"]) == 0
        full = tmp_path / "full"
        assert cli.main(["export", "--workdir", str(run["work"]), "--out", str(full),
                         f"--config.model.path={moved}", "--base-moved"]) == 0
    finally:
        moved.rename(run["snapshot"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(moved) and config["revision"] is None
    np.testing.assert_allclose(np.asarray(pj.load_pretrained(full)(IDS)), run["logits"], atol=1e-5)


def test_gs_workdir_and_gs_export_round_trip(run, gcs, tmp_path):
    from transformers import AutoModelForCausalLM

    bucket = gcs.bucket()
    work_url = upload_tree(run["work"], bucket + "/runs/r")
    model, _, cfg, step = restore_model(work_url)
    assert step == run["step"] and cfg.model.path == HUB_ID
    np.testing.assert_allclose(np.asarray(model(IDS)), run["logits"], atol=1e-6)
    out_url = bucket + "/exports/full"
    assert cli.main(["export", "--workdir", work_url, "--out", out_url]) == 0
    names = gcs.objects(bucket)
    assert "exports/full/config.json" in names and "exports/full/model.safetensors" in names
    local = storage.local_dir(out_url)
    hf = AutoModelForCausalLM.from_pretrained(str(local)).eval()
    np.testing.assert_allclose(torch_logits(hf, IDS), run["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", ["full", "peft"])
def test_interrupted_gs_export_leaves_nothing_loadable(run, gcs, monkeypatch, form):
    bucket = gcs.bucket()
    out = bucket + "/exports/x"
    extra = ["--peft"] if form == "peft" else []
    marker = "adapter_config.json" if form == "peft" else "config.json"
    assert cli.main(["export", "--workdir", str(run["work"]), "--out", out, *extra]) == 0
    assert f"exports/x/{marker}" in gcs.objects(bucket)
    real, calls = atomic.upload_file, []

    def dying_upload(src, dest):
        calls.append(Path(src).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-upload")
        real(src, dest)

    monkeypatch.setattr(atomic, "upload_file", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["export", "--workdir", str(run["work"]), "--out", out, *extra])
    names = gcs.objects(bucket)
    assert names and not any(n.endswith(("/config.json", "/adapter_config.json")) for n in names), names


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    work = str(run["work"])
    cases = [
        (["export", "--workdir", work, "--out", str(tmp_path / "o"), "--config.nope.x=1"], "no config section 'nope'"),
        (["export", "--workdir", work, "--out", str(tmp_path / "o"), "--config.model.nope=1"],
         "unknown key 'model.nope'"),
        (["export", "--workdir", work, "--out", str(tmp_path / "o"), "--config.lora.rank=two"], "expected a int"),
        (["export", "--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "no such run directory"),
        (["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "o")], "no checkpoint found"),
        (["export", "--workdir", work, "--step", "999", "--out", str(tmp_path / "o")], "no checkpoint at step 999"),
        # eval --workdir takes the same overrides
        (["eval", "--workdir", str(tmp_path / "missing"), "--data", str(run["data"]), "--out", str(tmp_path / "p"),
          f"--config.model.path={run['snapshot']}"], "no such run directory"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- legacy config.json keys
@pytest.mark.parametrize("family", ["llama3", "llama", "gemma3_text"])
def test_config_has_legacy_keys_and_both_layouts_load_identically(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model_type = "llama" if family.startswith("llama") else family
    kw = {"llama3": {"rope_parameters": LLAMA3_ROPE}, "llama": {},
          "gemma3_text": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"],
                          "rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                                 "factor": 8.0},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}}
    src = tmp_path / "src"
    tiny_hf_model(model_type, src, **kw[family])
    ours = pj.load_pretrained(src)
    logits = np.asarray(ours(IDS))
    out = pj.save_pretrained(ours, tmp_path / "export")
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == hf["torch_dtype"] == "float32"
    if family == "llama3":
        assert hf["rope_theta"] == 500000.0
        assert hf["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
        assert hf["rope_parameters"] == LLAMA3_ROPE
    elif family == "llama":
        assert hf["rope_theta"] == 10000.0 and hf["rope_scaling"] is None
    else:
        assert (hf["rope_theta"], hf["rope_local_base_freq"]) == (1e6, 1e4)
        assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    # both layouts in one file (transformers 5), and the legacy keys alone (what an older reader sees)
    legacy = {k: v for k, v in hf.items() if k not in ("rope_parameters", "dtype")}
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(out, legacy_dir)
    (legacy_dir / "config.json").write_text(json.dumps(legacy))
    for d in (out, legacy_dir):
        reloaded = AutoModelForCausalLM.from_pretrained(str(d)).eval()
        np.testing.assert_allclose(torch_logits(reloaded, IDS), logits, atol=1e-5, rtol=0, err_msg=str(d))
        assert pj.load_pretrained(d).config == ours.config


def test_export_round_trip_without_layer_scan(run, tmp_path):
    """The same LoRA run trained with ``model.scan_layers=false`` (one module per layer, no stacked parameters):
    ``export`` (full, merged and PEFT) gives tensors named per layer as the scanned run's; each merged weight is the
    base weight plus alpha/r · B·A of the exported adapter, computed here from the files; transformers loads the
    full export, and PEFT the adapter on the base, and both compute the restored model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rank, alpha = 4, 16.0
    cfg = load_config("configs/tiny.py", [
        f"--config.model.path={HUB_ID}", f"--config.data.train={run['data']}", "--config.data.eval=",
        "--config.train.steps=3", "--config.train.global_batch_size=4", "--config.train.grad_accum_steps=1",
        "--config.data.shuffle=false", "--config.optimizer.schedule=constant", "--config.optimizer.lr=1e-2",
        f"--config.lora.rank={rank}", f"--config.lora.alpha={alpha}", "--config.lora.targets=q_proj,v_proj,down_proj",
        "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.model.scan_layers=false"])
    work = tmp_path / "run"
    train(RunConfig.from_config(cfg), work, progress=False)
    model, r, _, _ = restore_model(work)
    assert r.config.model.scan_layers is False
    logits = np.asarray(model(IDS))

    full, merged, adapter = tmp_path / "full", tmp_path / "merged", tmp_path / "adapter"
    for out, extra in ((full, []), (merged, ["--merge-lora"]), (adapter, ["--peft"])):
        assert cli.main(["export", "--workdir", str(work), "--out", str(out), *extra]) == 0
    weights, base = load_file(full / "model.safetensors"), load_file(run["src"] / "model.safetensors")
    assert set(weights) == set(_merged_reference(run))  # per-layer names, as exported from the scanned run
    merged_weights = load_file(merged / "model.safetensors")
    for name in weights:
        np.testing.assert_array_equal(merged_weights[name], weights[name])
    lora = load_file(adapter / "adapter_model.safetensors")
    assert set(lora) == set(adapter_tensors(run["model"]))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == rank
    targets = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight"))
    assert len(targets) == 3 * 2  # q_proj, v_proj, down_proj of both layers
    for t in targets:
        a, b = lora[f"base_model.model.{t}.lora_A.weight"], lora[f"base_model.model.{t}.lora_B.weight"]
        assert np.abs(b).max() > 0  # trained (B starts at zero)
        np.testing.assert_allclose(weights[f"{t}.weight"], base[f"{t}.weight"] + alpha / rank * (b @ a),
                                   atol=1e-6, rtol=0, err_msg=t)
    for name in set(weights) - {f"{t}.weight" for t in targets}:  # the rest is the base, untouched
        np.testing.assert_array_equal(weights[name], base[name], err_msg=name)
    hf = AutoModelForCausalLM.from_pretrained(str(full)).eval()
    np.testing.assert_allclose(torch_logits(hf, IDS), logits, atol=1e-5, rtol=0)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(run["src"])).eval(),
                                           str(adapter)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, IDS), logits, atol=1e-5, rtol=0)
