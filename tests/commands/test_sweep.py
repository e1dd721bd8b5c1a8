"""`percausal sweep`: methods (with knobs) × LRs × seeds, each method's LR chosen on validation (never on test), mean
± std over seeds on test, resumable, plots. The orchestration is tested with `percausal train` / `eval` faked
(metrics files written by hand, so validation and test can be made to disagree); one tiny real sweep checks that it
runs end to end and that seeds change the runs."""

import json
import math
import time
from pathlib import Path

import pytest

from percausal_jax import cli
from percausal_jax.evaluation.plots import read_series
from percausal_jax.sweep import runner as sweep
from percausal_jax.sweep import training
from percausal_jax.sweep.spec import Method, parse_methods
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS

# fake metrics: validation prefers lr 1e-4 for ce and 3e-3 for perce[clip_max=2]; test prefers the other one
VAL_ROUGE_L = {("ce", 1e-4): 0.5, ("ce", 3e-3): 0.3, ("perce[clip_max=2]", 1e-4): 0.2, ("perce[clip_max=2]", 3e-3): 0.4}
TEST_ROUGE_L = {("ce", 1e-4): 0.2, ("ce", 3e-3): 0.9, ("perce[clip_max=2]", 1e-4): 0.9,
                ("perce[clip_max=2]", 3e-3): 0.1}
LABELS = {"ce": "ce", "perce_clip_max-2": "perce[clip_max=2]"}


def _flag(argv, name):
    return argv[argv.index(name) + 1]


class FakeRuns:
    """Stands in for `percausal train` / `percausal eval` (training.train_to_end, training.run_command): writes the files they would
    write."""

    def __init__(self, val: Path, test: Path):
        self.val, self.test, self.calls, self.cells = str(val), str(test), [], {}

    def __call__(self, argv, what):
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        work = Path(_flag(argv, "--workdir"))
        if argv[0] == "train":
            ov = dict(a.removeprefix("--config.").split("=", 1) for a in argv if a.startswith("--config."))
            assert ov["data.eval"] == self.val  # the runs' periodic eval is on validation, never on test
            method = LABELS[work.name.split("-lr")[0]]
            lr, seed = float(ov["optimizer.lr"]), int(ov["seed"])
            self.cells[work.name] = (method, lr, seed)
            rows = [{"step": s, "loss": 3.0 - s * 0.1, **({"eval_nll": 2.0 - s * 0.1 - seed * 0.01,
                                                          "eval_nll_personal": 3.0 - s * 0.2 - seed * 0.02,
                                                          "eval_nll_generic": 1.5 - s * 0.05} if s % 2 == 0 else {})}
                    for s in range(1, 5)]
            work.mkdir(parents=True, exist_ok=True)
            (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            return 1.0 + seed
        method, lr, seed = self.cells[work.name]
        data = _flag(argv, "--data")
        table = VAL_ROUGE_L if data == self.val else TEST_ROUGE_L
        assert data in (self.val, self.test)
        m = {"rouge1": 0.6, "rougeL": table[method, lr] + 0.1 * seed, "span_recall": 0.5 * seed,
             "nll_personal": 2.0 + seed, "nll_generic": 1.0 + 0.5 * seed, "n": 2}
        Path(_flag(argv, "--out")).with_suffix(".metrics.json").write_text(json.dumps(m))
        return 0.5


@pytest.fixture
def fake(tmp_path, monkeypatch):
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({**RECORDS[0], "personal_spans": [[2, 12]]}) + "\n")
    runs = FakeRuns(tmp_path / "val.jsonl", tmp_path / "test.jsonl")
    monkeypatch.setattr(training, "run_command", runs)
    monkeypatch.setattr(training, "train_to_end", lambda config, work, overrides, what: runs(
        ["train", "--config", config, "--workdir", work, *overrides], what))
    argv = ["sweep", "--config", "configs/tiny.py", "--out", str(tmp_path / "sw"), "--train",
            str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"), "--test", str(tmp_path / "test.jsonl"),
            "--objectives", "ce,perce[clip_max=2]", "--lrs", "1e-4,3e-3", "--seeds", "0,1"]
    return runs, argv, tmp_path / "sw"


def test_lr_is_chosen_on_validation_and_test_is_summarized_over_seeds(fake, capsys):
    runs, argv, out = fake
    assert cli.main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["criterion"]["metric"] == "rougeL" and "validation rougeL" in result["criterion"]["rule"]
    best = result["best"]
    assert best["ce"]["lr"] == 1e-4 and best["perce[clip_max=2]"]["lr"] == 3e-3  # validation's choice, not test's
    tested = {runs.cells[Path(_flag(a, "--workdir")).name][:2] for a in runs.calls
              if a[0] == "eval" and _flag(a, "--data") == runs.test}
    assert tested == {("ce", 1e-4), ("perce[clip_max=2]", 3e-3)}  # test evaluated only at the chosen LR
    # mean ± sample std over seeds 0, 1, by hand: test rougeL = base + 0.1 · seed
    for method, lr in (("ce", 1e-4), ("perce[clip_max=2]", 3e-3)):
        xs = [TEST_ROUGE_L[method, lr] + 0.1 * s for s in (0, 1)]
        mean = sum(xs) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 1)
        got = best[method]["test"]["rougeL"]
        assert got["n"] == 2 and got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(std)
        v = [VAL_ROUGE_L[method, lr] + 0.1 * s for s in (0, 1)]
        assert best[method]["val"]["mean"] == pytest.approx(sum(v) / 2)
        assert best[method]["run_s"]["mean"] == pytest.approx(((1 + 0.5) + (2 + 0.5)) / 2)  # train + test eval
        assert best[method]["test"]["nll_personal"]["mean"] == pytest.approx(2.5)
    assert len(result["cells"]) == 8 and {c["seed"] for c in result["cells"]} == {0, 1}
    assert sum(c["test"] is not None for c in result["cells"]) == 4
    knob = next(a for a in runs.calls if a[0] == "train" and "perce_clip_max-2" in _flag(a, "--workdir"))
    assert "--config.objective.perce.clip_max=2" in knob and "--config.objective.name=perce" in knob
    # the report states the rule first and shows each method at its chosen LR
    md = (out / "sweep.md").read_text()
    assert md.index("Selection (fixed before any run)") < md.index("| method |")
    assert "| ce | 0.0001 | 2 |" in md and "| perce[clip_max=2] | 0.003 | 2 |" in md
    assert "0.2500 ± 0.0707" in md  # ce test rougeL
    page = (out / "sweep.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    # plots: valid PNGs, one series per method in every panel
    for name, panels in (("nll_curves.png", {"eval NLL, personal tokens", "eval NLL, generic tokens"}),
                         ("test_metrics.png", {"nll_personal", "nll_generic", "rouge1", "rougeL", "span_recall"}),
                         ("tradeoff.png", {"nll_personal vs nll_generic"})):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), name
        series = read_series(png)
        assert set(series) == panels, name
        assert all(labels == ["ce", "perce[clip_max=2]"] for labels in series.values()), (name, series)
    from PIL import Image

    assert Image.open(out / "nll_curves.png").size[0] > 500


def test_a_finished_sweep_is_not_rerun_and_another_sweep_is_refused(fake, capsys):
    runs, argv, out = fake
    assert cli.main(argv) == 0
    first = (out / "sweep.json").read_text()
    n = len(runs.calls)
    assert n == 8 + 8 + 4  # train, validation eval, test eval at the chosen LR
    assert cli.main(argv) == 0
    assert len(runs.calls) == n  # every cell (and its test evaluation) read back, nothing run again
    assert json.loads((out / "sweep.json").read_text())["best"] == json.loads(first)["best"]
    capsys.readouterr()
    assert cli.main([*argv, "--max-new-tokens", "5"]) == 2
    assert "holds a cell of another sweep" in capsys.readouterr().err


def test_skipped_records_are_reported_and_strict_stops_before_training(fake, capsys):
    """--test with a record without output: the sweep's table names it (and the evaluations get --strict only when
    asked); --strict (or --config.data.strict=true): exit 2, one line naming file, line and field, nothing run."""
    runs, argv, out = fake
    test = Path(_flag(argv, "--test"))
    test.write_text(test.read_text() + json.dumps({**RECORDS[1], "completion": None}) + "\n")
    for strict in (["--strict"], ["--config.data.strict=true"]):
        assert cli.main([*argv, *strict]) == 2
        assert capsys.readouterr().err == (
            f"percausal sweep: error: {test}:2: field 'completion': expected a non-empty string, got null (strict: "
            "rows with an empty required field are errors; without --strict they are skipped and counted)\n")
        assert runs.calls == [] and not out.exists()
    assert cli.main([*argv, "--seeds", "0"]) == 0
    assert (f"--test={test}:\n"
            "kept 1, skipped 1\n"
            "  reason              count  first ids\n"
            "  empty_completion        1  r1\n") in capsys.readouterr().err
    assert not any("--strict" in a for a in runs.calls)


def test_select_nll_needs_no_generation_on_validation(fake):
    runs, argv, out = fake
    assert cli.main([*argv, "--select", "nll_personal"]) == 0
    assert not any(a[0] == "eval" and _flag(a, "--data") == runs.val for a in runs.calls)
    result = json.loads((out / "sweep.json").read_text())
    assert "lower is better" in result["criterion"]["rule"]
    # fake validation nll_personal (last eval line, step 4) falls with the seed only: a tie, the first LR wins
    assert all(b["lr"] == 1e-4 for b in result["best"].values())
    assert result["best"]["ce"]["val"]["mean"] == pytest.approx(((3.0 - 0.8) + (3.0 - 0.8 - 0.02)) / 2)


def test_method_specs():
    assert parse_methods("ce,perce[clip_max=2,clip_min=0.5],nextquill") == [
        Method("ce"), Method("perce", (("clip_max", "2"), ("clip_min", "0.5"))), Method("nextquill")]
    m = parse_methods("perce[clip_max=2]")[0]
    assert m.label == "perce[clip_max=2]" and m.slug == "perce_clip_max-2"
    assert m.overrides() == ["--config.objective.name=perce", "--config.objective.perce.clip_max=2"]
    assert [x.objective for x in parse_methods(None)] == ["ce", "perce", "nextquill", "lossce", "entce"]


@pytest.mark.slow
def test_real_sweep_tiny_model(tmp_path):
    """The real `percausal train` / `eval` under the sweep, on a tiny LoRA model: one method with a knob × one LR ×
    2 seeds (each LR or method is another XLA compile, ~15-40 s on one loaded core: the 2 × 2 × 2 grid is the
    faked tests'). Seeds change the runs; the report and its plots come out."""
    tiny_hf_model("llama", tmp_path / "model", num_hidden_layers=1)
    tiny_tokenizer(tmp_path / "model")
    spans = {"r0": [[2, 12]], "r3": [[20, 35]]}
    rows = [{**r, "personal_spans": spans.get(r["id"], [])} for r in RECORDS]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**r, "id": f"{r['id']}{k}"}) + "\n"
                                                  for k in "ab" for r in rows))  # 8 records: batches differ by seed
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    out = tmp_path / "sw"
    t0 = time.perf_counter()
    assert cli.main(["sweep", "--config", "configs/tiny.py", "--out", str(out),
                     "--train", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"),
                     "--test", str(tmp_path / "test.jsonl"),
                     "--objectives", "entce[max_weight=3]", "--lrs", "1e-2", "--seeds", "0,1",
                     "--eval-limit", "2", "--max-new-tokens", "4", f"--config.model.path={tmp_path / 'model'}",
                     "--config.train.steps=2", "--config.lora.rank=4", "--config.train.eval_every=1",
                     "--config.train.grad_accum_steps=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]) == 0
    print(f"real sweep: {time.perf_counter() - t0:.1f} s")
    result = json.loads((out / "sweep.json").read_text())
    best = result["best"]["entce[max_weight=3]"]
    assert best["lr"] == 1e-2 and best["test"]["rougeL"]["n"] == 2 and best["run_s"]["n"] == 2
    losses = {}
    for c in result["cells"]:
        lines = [json.loads(x) for x in (Path(c["workdir"]) / "metrics.jsonl").read_text().splitlines()]
        losses[c["seed"]] = [r["loss"] for r in lines]
        assert [r["step"] for r in lines if "eval_nll" in r] == [1, 2]  # eval every step, on validation
    assert losses[0] != losses[1]  # another seed: another run (data order and LoRA init)
    series = read_series((out / "nll_curves.png").read_bytes())
    assert len(series) == 2 and all(v == ["entce[max_weight=3]"] for v in series.values())  # personal, generic
    assert (out / "sweep.html").read_text().count("data:image/png;base64,") >= 2


def test_cells_share_compiled_programs_through_the_persistent_cache(tmp_path, monkeypatch):
    """Inside the sweep's block a compiled program is written to $PERCAUSAL_CACHE/jax-compilation and a second,
    identical program (a new function object, as each cell builds its own) is loaded from it instead of compiled;
    outside the block nothing is written and the process's settings are as before."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setenv("PERCAUSAL_CACHE", str(tmp_path))
    cache = tmp_path / "jax-compilation"

    def program():  # a fresh function object each call: jit's in-memory cache cannot serve it
        return jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0 + 17.0)

    events = []

    def listen(event, **_):
        if event.startswith("/jax/compilation_cache/cache_"):
            events.append(event.rsplit("/", 1)[1])

    x = jnp.arange(48.0).reshape(6, 8)
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.monitoring.register_event_listener(listen)
    try:
        with sweep.persistent_compilation_cache(min_compile_s=0.0):
            program()(x).block_until_ready()
            written = sorted(p.name for p in cache.iterdir())
            assert any(name.startswith("jit_") for name in written), written
            assert events.count("cache_hits") == 0
            program()(x).block_until_ready()  # loaded, not compiled
            assert events.count("cache_hits") == 1, events
            assert sorted(p.name for p in cache.iterdir()) == written
        assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
        events.clear()
        program()(x).block_until_ready()
        jax.jit(lambda x: jnp.sin(x) - 5.0)(x).block_until_ready()
        assert events == [] and sorted(p.name for p in cache.iterdir()) == written  # the cache is off again
    finally:
        jax.monitoring.unregister_event_listener(listen)
