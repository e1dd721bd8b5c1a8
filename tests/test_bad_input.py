"""Bad configs and arguments across every command, one table: wrong types, out-of-range values, unknown model types,
a tokenizer larger than the model's vocabulary, and a checkpoint of another model or objective in the workdir.

Each case: exit code 2, exactly one line on stderr naming the key / flag / file and what was expected, no
traceback, and nothing written (the output paths do not exist; an existing run directory is unchanged)."""

import dataclasses
import json
from pathlib import Path
from typing import Callable

import pytest

from percausal_jax import cli
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Models (a good one, one of another size, one whose vocabulary is smaller than its tokenizer, an unsupported
    model_type), prompt records, a config file with a wrongly typed value, and one finished 2-step CE run."""
    root = tmp_path_factory.mktemp("bad_input")
    for name, kw in {"model": {}, "other": {"hidden_size": 32, "intermediate_size": 64},
                     "smallvocab": {"vocab_size": 64}}.items():
        tiny_hf_model("llama", root / name, num_hidden_layers=1, **kw)
        tiny_tokenizer(root / name)
    mamba = root / "mamba"
    mamba.mkdir()
    for f in (root / "model").iterdir():
        (mamba / f.name).write_bytes(f.read_bytes())
    (mamba / "config.json").write_text(json.dumps({**json.loads((root / "model" / "config.json").read_text()),
                                                   "model_type": "mamba"}))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    (root / "badtype.py").write_text("from configs.base import get_config as base\n\n\ndef get_config():\n"
                                     "    c = base()\n    c.train.steps = '100'\n    return c\n")
    run = root / "run"
    assert cli.main(train(root, run, "--config.train.steps=2")) == 0
    return root


def train(root: Path, workdir: Path, *extra: str) -> list[str]:
    return ["train", "--config", "configs/tiny.py", "--workdir", str(workdir), "--no-progress",
            f"--config.model.path={root / 'model'}", f"--config.data.train={root / 'data.jsonl'}",
            "--config.objective.name=ce", "--config.mesh.fsdp=2", "--config.mesh.tensor=4", *extra]


@dataclasses.dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # root -> argv
    expect: tuple[str, ...]  # substrings of the one stderr line
    outputs: tuple[str, ...] = ()  # paths under root that must not exist afterwards


def T(id, *extra, expect, workdir="new_run"):
    return Case(f"train-{id}", lambda r: train(r, r / workdir, *extra), expect, (workdir,) if workdir != "run" else ())


def P(id, *extra, expect):
    return Case(f"prepare-{id}", lambda r: ["prepare", "--source", "jsonl", "--input", str(r / "data.jsonl"),
                                            "--out", str(r / "p.jsonl"), *extra],
                expect, ("p.jsonl",))


def S(id, *extra, model="model", expect):
    return Case(f"score-{id}", lambda r: ["score", "--model", str(r / model), "--data", str(r / "data.jsonl"),
                                          "--out", str(r / "s.jsonl"), "--html", str(r / "s.html"), *extra],
                expect, ("s.jsonl", "s.html"))


def E(id, *source, expect):
    return Case(f"eval-{id}", lambda r: ["eval", *source, "--data", str(r / "data.jsonl"),
                                         "--out", str(r / "e.jsonl"), "--no-meteor", "--no-progress"],
                expect, ("e.jsonl", "e.metrics.json"))


def X(id, *extra, workdir="run", expect):
    return Case(f"export-{id}", lambda r: ["export", "--workdir", str(r / workdir), "--out", str(r / "x"), *extra],
                expect, ("x",))


def G(id, *extra, model="model", expect):
    return Case(f"generate-{id}", lambda r: ["generate", "--model", str(r / model), "--prompt", "hi",
                                             "--template", "none", *extra], expect)


def A(id, *extra, topology="v5e:2x2", model="model", expect):
    return Case(f"aot-{id}", lambda r: ["aot", "--config", "configs/tiny.py", "--topology", topology,
                                        f"--config.model.path={r / model}", *extra], expect)


def W(id, *extra, expect):
    return Case(f"sweep-{id}", lambda r: ["sweep", "--config", "configs/tiny.py", "--out", str(r / "sw"), "--train",
                                          str(r / "data.jsonl"), "--val", str(r / "val.jsonl"), "--test",
                                          str(r / "data.jsonl"), f"--config.model.path={r / 'model'}", *extra],
                expect, ("sw",))


CASES = [
    # train: types, ranges, choices, unknown keys and objectives, models, tokenizers, data, resume
    T("type-override", "--config.train.steps=many", expect=("--config.train.steps=many", "expected a int")),
    Case("train-type-in-file", lambda r: ["train", "--config", str(r / "badtype.py"), "--workdir",
                                          str(r / "new_run")], ("badtype.py:6", "must match configs/base.py"),
         ("new_run",)),
    T("negative-lr", "--config.optimizer.lr=-0.001", expect=("optimizer.lr=-0.001", "expected a number > 0")),
    T("steps-0", "--config.train.steps=0", expect=("train.steps=0", "expected an integer ≥ 1")),
    T("k-0", "--config.data.k=0", expect=("data.k=0", "expected an integer ≥ 1")),
    T("clip-min-over-max", "--config.objective.name=perce", "--config.objective.perce.clip_min=6.0",
      expect=("objective.perce.clip_min=6.0 > objective.perce.clip_max=5.0", "expected clip_min ≤ clip_max")),
    T("nextquill-low-over-high", "--config.objective.name=nextquill", "--config.objective.nextquill.low=0.95",
      expect=("objective.nextquill.low=0.95 > objective.nextquill.high=0.9",)),
    T("batch-vs-devices", "--config.train.global_batch_size=6", "--config.train.grad_accum_steps=1",
      "--config.mesh.fsdp=4", "--config.mesh.tensor=2", expect=("6 rows", "not a multiple of mesh data×fsdp=4")),
    T("grad-accum-0", "--config.train.grad_accum_steps=0", expect=("train.grad_accum_steps=0", "≥ 1")),
    T("log-every-0", "--config.train.log_every=0", expect=("train.log_every=0", "≥ 1")),
    T("checkpoint-every-0", "--config.checkpoint.every_steps=0", expect=("checkpoint.every_steps=0", "≥ 1")),
    T("checkpoint-keep-0", "--config.checkpoint.keep=0", expect=("checkpoint.keep=0", "≥ 1")),
    T("warmup-ratio-2", "--config.optimizer.warmup_ratio=2.0", expect=("optimizer.warmup_ratio=2.0", "in [0, 1]")),
    T("b2-1", "--config.optimizer.b2=1.0", expect=("optimizer.b2=1.0", "in [0, 1)")),
    T("lora-rank-negative", "--config.lora.rank=-4", expect=("lora.rank=-4", "≥ 0")),
    T("mesh-0", "--config.mesh.tensor=0", expect=("mesh.tensor=0", "or -1")),
    T("max-prompt-len-0", "--config.data.max_prompt_len=0", expect=("data.max_prompt_len",)),
    T("nan-policy", "--config.train.nan_policy=maybe", expect=("train.nan_policy='maybe'", "expected one of")),
    T("unknown-key", "--config.train.stepz=3", expect=("unknown key 'train.stepz'", "did you mean 'train.steps'")),
    T("unknown-objective", "--config.objective.name=perse", expect=("objective.name='perse'", "unknown objective")),
    T("unknown-model-type", "--config.model.path={r}/mamba", expect=("mamba/config.json", "model_type 'mamba'")),
    T("tokenizer-vocab", "--config.model.path={r}/smallvocab",
      expect=("model.path=", "tokenizer has 259 tokens", "vocabulary (config.json vocab_size) has 64")),
    T("missing-data", "--config.data.train=/nonexistent/train.jsonl", expect=("/nonexistent/train.jsonl",)),
    T("resume-other-objective", "--config.objective.name=perce", "--config.train.steps=4", workdir="run",
      expect=("checkpoints/2", "objective: checkpoint has 'ce', this run has 'perce'")),
    T("resume-other-model", "--config.train.steps=4", "--config.model.path={r}/other", workdir="run",
      expect=("checkpoints/2", "num_params: checkpoint has")),
    T("unknown-flag", "--epochs=3", expect=("unrecognized arguments: --epochs=3",)),
    # prepare
    P("k-0", "--k", "0", expect=("--k=0", "expected an integer ≥ 1")),
    P("k-not-int", "--k", "four", expect=("argument --k: invalid int value: 'four'",)),
    P("max-prompt-len-negative", "--tokenizer", "{r}/model", "--max-prompt-len", "-5",
      expect=("--max-prompt-len=-5", "≥ 1")),
    P("template-choice", "--template", "fancy", expect=("argument --template: invalid choice: 'fancy'",)),
    Case("prepare-missing-input", lambda r: ["prepare", "--source", "jsonl", "--input", str(r / "none.jsonl"),
                                             "--out", str(r / "p.jsonl")], ("none.jsonl",), ("p.jsonl",)),
    # score
    S("clip-min-over-max", "--clip-min", "6", "--clip-max", "5", expect=("--clip-min=6.0 --clip-max=5.0",
                                                                          "expected 0 ≤ clip-min ≤ clip-max")),
    S("batch-0", "--batch-size", "0", expect=("--batch-size must be ≥ 1",)),
    S("delta-negative", "--delta", "-0.1", expect=("--delta=-0.1", "≥ 0")),
    S("clip-not-a-number", "--clip-min", "low", expect=("argument --clip-min: invalid float value: 'low'",)),
    S("unknown-model-type", model="mamba", expect=("config.json", "model_type 'mamba' is not supported")),
    S("tokenizer-vocab", model="smallvocab", expect=("smallvocab", "tokenizer has 259 tokens", "has 64")),
    # eval
    E("missing-workdir", "--workdir", "{r}/nowhere", expect=("nowhere", "no such run directory")),
    E("missing-step", "--workdir", "{r}/run", "--step", "99", expect=("no checkpoint at step 99",)),
    E("max-new-tokens-0", "--workdir", "{r}/run", "--max-new-tokens", "0", expect=("--max-new-tokens=0", "≥ 1")),
    E("top-p-2", "--model", "{r}/model", "--top-p", "2", expect=("--top-p=2.0", "in (0, 1]")),
    E("temperature-negative", "--model", "{r}/model", "--temperature", "-1", expect=("--temperature=-1.0", "≥ 0")),
    E("tokenizer-vocab", "--model", "{r}/smallvocab", expect=("tokenizer has 259 tokens",)),
    E("unknown-model-type", "--model", "{r}/mamba", expect=("model_type 'mamba'",)),
    E("override-with-model", "--model", "{r}/model", "--config.train.steps=3",
      expect=("--config.train.steps=3", "--model has no config")),
    # export
    X("missing-workdir", workdir="nowhere", expect=("nowhere", "no such run directory")),
    X("missing-step", "--step", "99", expect=("no checkpoint at step 99", "have [2]")),
    X("negative-step", "--step", "-1", expect=("--step=-1", "≥ 0")),
    X("peft-of-full-run", "--peft", expect=("--peft needs a LoRA run",)),
    X("dtype", "--dtype", "float64", expect=("dtype 'float64' is not supported",)),
    # generate
    G("max-new-tokens-0", "--max-new-tokens", "0", expect=("--max-new-tokens=0", "≥ 1")),
    G("contrast-negative", "--contrast", "-1", expect=("--contrast=-1.0", "≥ 0")),
    G("unknown-model-type", model="mamba", expect=("model_type 'mamba'",)),
    G("tokenizer-vocab", model="smallvocab", expect=("tokenizer has 259 tokens",)),
    # aot
    A("topology", topology="v9:1x1", expect=("topology 'v9:1x1'", "expected e.g. v5p:2x4x4")),
    A("mfu-0", "--mfu", "0", expect=("--mfu=0.0", "in (0, 1]")),
    A("steps-0", "--config.train.steps=0", expect=("train.steps=0",)),
    A("unknown-model-type", model="mamba", expect=("model_type 'mamba'",)),
    # sweep
    W("negative-lr", "--lrs", "1e-4,-1e-5", expect=("optimizer.lr=-1e-05", "> 0")),
    W("lrs-not-numbers", "--lrs", "fast,slow", expect=("--lrs 'fast,slow'", "expected comma-separated numbers")),
    W("unknown-objective", "--objectives", "ce,perse", expect=("'perse'", "unknown objective")),
    W("steps-0", "--config.train.steps=0", expect=("train.steps=0",)),
    W("max-new-tokens-0", "--max-new-tokens", "0", expect=("--max-new-tokens=0",)),
    W("val-is-test", "--val", "{r}/data.jsonl", expect=("is the --test file",)),
    W("unknown-knob", "--objectives", "ce,perce[clip_mx=2]", expect=("perce has no knob 'clip_mx'", "'clip_max'")),
    W("knob-type", "--objectives", "perce[clip_max=big]", expect=("objective.perce.clip_max",)),
    W("knob-range", "--objectives", "perce[clip_max=0.5,clip_min=1]", expect=("clip_min=1.0 > ",)),
    W("brackets", "--objectives", "perce[clip_max=2", expect=("unbalanced brackets",)),
    W("select", "--select", "bleu", expect=("--select 'bleu'", "rougeL")),
    W("seeds", "--seeds", "0,x", expect=("--seeds '0,x'", "comma-separated integers")),
    W("negative-seed", "--seeds", "0,-1", expect=("seed=-1",)),
    W("seed-override", "--config.seed=3", expect=("--config.seed=3", "use --seeds")),
    W("val-missing", "--val", "{r}/nope.jsonl", expect=("--val", "nope.jsonl: no such file")),
    W("select-needs-spans", "--select", "span_recall", expect=("--select span_recall", "personal_spans")),
]

def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(env, case, capsys):
    argv = [a.format(r=env) for a in case.argv(env)]  # "{r}" in a case: the fixture's directory
    run_before = _snapshot(env / "run")
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("percausal"), err
    for part in case.expect:
        assert part in err, (part, err)
    for out in case.outputs:
        assert not (env / out).exists(), f"{out} was written"
    assert _snapshot(env / "run") == run_before  # the finished run is untouched (lock released, nothing added)


def test_every_command_has_cases():
    commands = {c.id.split("-")[0] for c in CASES}
    assert commands == {"train", "prepare", "score", "eval", "export", "generate", "aot", "sweep"}
