"""A run knows its base: the checkpoint records the base model's name, hub commit and content fingerprint; resuming
or exporting against other weights exits 2 naming both; the same weights under another name need --base-moved;
checkpoints written before fingerprints still resume and export, with a note."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from percausal_jax import cli
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import weights_fingerprint
from percausal_jax.training import checkpoints
from tests.training.common import train_args

TENSOR = "model.layers.0.self_attn.q_proj.weight"


def _changed_copy(src, dest, tensor=TENSOR):
    """``src`` copied with one weight matrix changed (same shapes, dtype, sizes and header)."""
    shutil.copytree(src, dest)
    weights = load_file(dest / "model.safetensors")
    weights[tensor] = (weights[tensor] + np.float32(0.01)).astype(weights[tensor].dtype)
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _args(model_dir, data, work, steps, extra=()):
    return train_args(model_dir, data, work, "ce", steps=steps,
                      extra=["--config.lora.rank=4", "--config.data.eval=", *extra])


def _meta(work, step):
    return json.loads((work / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def _one_error(capsys, command):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"percausal {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    """A 2-step LoRA run on ``base``; ``same`` is a copy of it at another path, ``other`` has one tensor changed."""
    model_dir, data = setup
    d = tmp_path_factory.mktemp("base_identity")
    base = d / "base"
    shutil.copytree(model_dir, base)
    same = d / "same"
    shutil.copytree(base, same)
    other = _changed_copy(base, d / "other")
    work = d / "run"
    assert cli.main(_args(base, data, work, 2)) == 0
    return {"base": base, "same": same, "other": other, "data": data, "work": work, "fp": weights_fingerprint(base)}


def test_the_checkpoint_records_the_base(run):
    meta = _meta(run["work"], 2)
    assert meta["model_path"] == str(run["base"]) and meta["model_dir"] == str(run["base"].resolve())
    assert meta["model_revision"] is None  # a local directory (a hub id records its commit)
    assert meta["model_fingerprint"] == run["fp"] and run["fp"].startswith("sha256-v1:")


def test_fingerprint_is_the_weights_not_where_or_how_they_are_stored(run, tmp_path):
    fp = run["fp"]
    assert weights_fingerprint(run["same"]) == fp
    assert weights_fingerprint(run["other"]) != fp
    # re-sharded into two files with an index, other safetensors metadata, another transformers_version: the same
    resharded = tmp_path / "resharded"
    shutil.copytree(run["base"], resharded)
    weights = load_file(resharded / "model.safetensors")
    (resharded / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, part in shards.items():
        save_file({n: weights[n] for n in part}, resharded / fname, metadata={"written_by": "elsewhere"})
    (resharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    config = json.loads((resharded / "config.json").read_text())
    (resharded / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.1"}, indent=4))
    assert weights_fingerprint(resharded) == fp
    # a large tensor (hashed in sampled windows) changed; the config's architecture changed
    embed = _changed_copy(run["base"], tmp_path / "embed", "model.embed_tokens.weight")
    assert weights_fingerprint(embed) != fp
    (resharded / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert weights_fingerprint(resharded) != fp


def test_resume_on_other_weights_exits_2_naming_both(run, capsys):
    for extra in ([], ["--base-moved"]):  # other weights: refused, whatever the override says
        assert cli.main(_args(run["other"], run["data"], run["work"], 3, extra)) == 2
        line = _one_error(capsys, "train")
        assert f"{run['base']} ({run['fp']})" in line, line
        assert f"{run['other']} ({weights_fingerprint(run['other'])})" in line and "other weights" in line, line
    assert sorted(p.name for p in (run["work"] / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_export_against_other_weights_or_a_moved_copy(run, tmp_path, capsys):
    out = tmp_path / "hf"
    for extra in ([], ["--base-moved"]):
        argv = ["export", "--workdir", str(run["work"]), "--out", str(out), f"--config.model.path={run['other']}"]
        assert cli.main(argv + extra) == 2
        line = _one_error(capsys, "export")
        assert str(run["base"]) in line and str(run["other"]) in line and "other weights" in line, line
    argv = ["export", "--workdir", str(run["work"]), "--out", str(out), "--peft", f"--config.model.path={run['same']}"]
    assert cli.main(argv) == 2
    line = _one_error(capsys, "export")
    assert "--base-moved" in line and str(run["base"]) in line and str(run["same"]) in line, line
    assert not out.exists()
    assert cli.main(argv + ["--base-moved"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(run["same"])


def test_resume_on_a_moved_copy_needs_base_moved_then_records_it(run, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run["work"], work)
    moved = tmp_path / "moved"
    shutil.copytree(run["same"], moved)
    assert cli.main(_args(moved, run["data"], work, 3)) == 2
    line = _one_error(capsys, "train")
    assert "--base-moved" in line and f"{run['base']} ({run['fp']})" in line and f"{moved} ({run['fp']})" in line
    assert cli.main(_args(moved, run["data"], work, 3, ["--base-moved"])) == 0
    assert "base moved:" in capsys.readouterr().err
    meta = _meta(work, 3)
    assert meta["model_path"] == str(moved) and meta["model_fingerprint"] == run["fp"]
    assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # the recorded directory rewritten with other weights: export (no override) and resume both refuse it
    shutil.copy(run["other"] / "model.safetensors", moved / "model.safetensors")
    assert cli.main(["export", "--workdir", str(work), "--out", str(tmp_path / "hf")]) == 2
    assert "other weights" in _one_error(capsys, "export")
    assert cli.main(_args(moved, run["data"], work, 4)) == 2
    assert "other weights" in _one_error(capsys, "train")


def test_a_checkpoint_without_fingerprint_still_resumes_and_exports(run, tmp_path, capsys):
    work = tmp_path / "legacy"
    shutil.copytree(run["work"], work)
    meta_file = work / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["model_fingerprint"]
    meta_file.write_text(json.dumps(meta))  # as written before fingerprints were recorded
    assert cli.main(_args(run["base"], run["data"], work, 2)) == 0  # resumes (at its last step: no new step)
    err = capsys.readouterr().err
    assert "resumed from step 2" in err and "does not record its base model's fingerprint" in err, err
    assert cli.main(["export", "--workdir", str(work), "--out", str(tmp_path / "hf")]) == 0
    assert "does not record its base model's fingerprint" in capsys.readouterr().err


def test_check_base_rules():
    saved = {"model_path": "org/m", "model_dir": "/hub/snapshots/abc", "model_revision": "abc",
             "model_fingerprint": "sha256-v1:1111"}
    checkpoints.check_base(saved, dict(saved), "ck")  # the same
    checkpoints.check_base(saved, {**saved, "model_dir": "/other/hub/snapshots/abc"}, "ck")  # same name, same weights
    checkpoints.check_base(saved, {**saved, "model_path": "./m", "model_dir": "/hub/snapshots/abc"}, "ck")  # same dir
    with pytest.raises(UserError, match=r"org/m@abc \(sha256-v1:1111\).*org/m@def \(sha256-v1:2222\): other weights"):
        checkpoints.check_base(saved, {**saved, "model_revision": "def", "model_fingerprint": "sha256-v1:2222"}, "ck")
    moved = {**saved, "model_path": "/data/m", "model_dir": "/data/m", "model_revision": None}
    with pytest.raises(UserError, match="the same weights under another name; pass --base-moved"):
        checkpoints.check_base(saved, moved, "ck")
    checkpoints.check_base(saved, moved, "ck", base_moved=True)
