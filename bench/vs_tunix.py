"""PerCE (and CE) LoRA training: ``percausal train`` against the same objective as a custom loss of Tunix's
``PeftTrainer`` (``bench/tunix_side.py``), same compiler (jax/jaxlib/flax/optax at the same versions), same model
weights, same examples in the same batches and order, same batch, LoRA rank, optimizer and learning rate; the two
sides alternated run by run (ours, Tunix, ours, Tunix, ...) from this one command, each in a process of its own.

- Model: a random-init Hugging Face directory of Qwen2.5-0.5B's shape (``common.qwen25_shape_model``: hidden 896,
  14/2 heads, ffn 4864, V = 151,936 tied, q/k/v bias) at full depth (24 layers) unless ``--layers``; both sides load
  its safetensors (ours through the HF import, Tunix through ``tunix.models.qwen2.params``). fp32 weights and
  compute, no remat (both defaults); LoRA rank 16, alpha 16 on the seven projections.
- Data: prompt records whose texts tokenize to lengths drawn from the setting (``bench/lengths.py``); our pipeline
  (``Run.data_iterator``: featurizer, length buckets of ``data.bucket_multiple``, no shuffling) makes the batches
  of every step, and their examples (``common.unpack``) go to Tunix in the same batches and order; Tunix pads each
  pass to the micro-batch maximum rounded up to the same multiple. ``percausal train`` reads the same records with
  the same config, so it trains on the same batches.
- Timing: each run takes 2·K optimizer steps over K distinct batches (two epochs); epoch 1 compiles every shape,
  the K steps of epoch 2 are timed (ours: ``metrics.jsonl``'s ``step_time``; Tunix: the gaps between its loop's
  pulls from the data iterator, each after the previous step finished). Real tokens/s = Σ non-padding tokens of the passes each side runs (personal +
  counterfactual for PerCE, personal for CE; the same for both sides) / Σ timed step time, summed over rounds;
  the table also gives the median step.
- Memory: the compiled step's memory analysis (arguments + temporaries + outputs − aliased) at the largest batch
  shape (ours: the train step on the global batch with its accumulation; Tunix: its jitted train step on the
  largest micro-batch), and each process's peak RSS (``wait4``), which includes its imports.
- Losses: the first step's loss on both sides (same weights, LoRA B = 0, same batch). Ours is Σ w·nll / n over the
  batch; with accumulation Tunix's logged loss is the mean of micro-batch means, so its token-weighted mean is
  shown too; the two must agree to fp32 rounding (checked; the run fails otherwise).

Settings (``--setting``):
- ``longlamp``: LongLaMP-like lengths (P median 1000 / p90 2000 in [256, 2048], Q median 120, R median 250 / p90
  500), batch 2 as 2 micro-batches of 1 on both sides, K = 3 batches, PerCE (a full-depth step takes minutes on 2
  cores: CE there is left to ``--objectives``).
- ``short``: uniform short lengths (P ∈ [240, 272], Q ∈ [60, 68], R ∈ [48, 64]), batch 4, one micro-batch, K = 3,
  PerCE and CE.

Each run times K = 3 steps per side (``--rounds 2`` doubles that: ~2 h at full depth on 2 cores).

    .venv/bin/python bench/vs_tunix.py --objectives perce   # both settings, PerCE, 1 round (~50 min, 2 cores)
    .venv/bin/python bench/vs_tunix.py --setting short --objectives perce --rounds 1
    .venv/bin/python bench/vs_tunix.py --smoke               # 1 layer, tiny lengths, no RESULTS (~3 min)

The Tunix venv (``.venv-tunix``) is created on first use from ``bench/tunix-requirements.txt``.
Writes ``bench/results/vs_tunix.json`` and the RESULTS.md section "Tunix PeftTrainer vs percausal train".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, batch_spec, compile_train_step, info_block, machine_info, md_table, peak_bytes, \
    qwen25_shape_model, run_config, unpack, write_section
from lengths import LONGLAMP, Lengths, Uniform

TUNIX_VENV = REPO / ".venv-tunix"
TUNIX_REQUIREMENTS = REPO / "bench" / "tunix-requirements.txt"
RESULTS_JSON = REPO / "bench" / "results" / "vs_tunix.json"
TITLE = "Tunix PeftTrainer vs percausal train"
TARGETS = {"longlamp": (1.5, 0.5), "short": (1.0, None)}  # (≥ × Tunix's real tokens/s, ≤ × its compiled peak)
SHORT = Lengths("short", Uniform(240, 272), Uniform(60, 68), Uniform(48, 64), min_profile=32)
SETTINGS = {"longlamp": dict(lengths=LONGLAMP, batch=2, accum=2, batches=3, objectives=("perce",), layers=24),
            "longlamp-4l": dict(lengths=LONGLAMP, batch=2, accum=2, batches=3, objectives=("perce",), layers=4),
            "short": dict(lengths=SHORT, batch=4, accum=1, batches=3, objectives=("perce", "ce"), layers=24)}
LOSS_RTOL = 2e-4


def tunix_python() -> Path:
    """``.venv-tunix/bin/python``, creating the venv from the pinned requirements when missing."""
    py = TUNIX_VENV / "bin" / "python"
    stamp = TUNIX_VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != TUNIX_REQUIREMENTS.read_text():
        subprocess.run([sys.executable, "-m", "venv", str(TUNIX_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(TUNIX_REQUIREMENTS)], check=True)
        stamp.write_text(TUNIX_REQUIREMENTS.read_text())
    return py


def run_measured(cmd: list[str], log: Path) -> tuple[int, int]:
    """Runs ``cmd`` (output to ``log``) → (exit code, the process's peak RSS in bytes)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


def our_overrides(args, setting: dict, model_dir: Path, objective: str, records: Path | None = None) -> list[str]:
    lengths = setting["lengths"]
    return [f"model.path={model_dir}", "model.dtype=float32", "model.compute_dtype=float32",
            f"objective.name={objective}", f"lora.rank={args.rank}", f"lora.alpha={args.alpha}",
            "optimizer.name=adamw", f"optimizer.lr={args.lr}", "optimizer.schedule=constant",
            "optimizer.warmup_steps=0", "optimizer.warmup_ratio=0.0", "optimizer.weight_decay=0.0",
            "optimizer.grad_clip_norm=1.0", f"train.global_batch_size={setting['batch']}",
            f"train.grad_accum_steps={setting['accum']}", f"train.steps={2 * setting['batches']}",
            f"data.max_prompt_len={lengths.max_prompt_len}", f"data.max_response_len={lengths.max_response_len}",
            "data.shuffle=False", f"data.bucket_multiple={args.bucket_multiple}", f"seed={args.seed}",
            f"checkpoint.every_steps={10 * setting['batches']}"] + ([f"data.train={records}"] if records else [])


def prepare(args, name: str, setting: dict, model_dir: Path, work: Path) -> dict:
    """Records (JSONL for ``percausal train``), the examples of every step in order (``.npz`` for Tunix), the real
    tokens per step, and our compiled peak at the largest batch shape."""
    import jax

    from lengths import prompt_records
    from percausal_jax.training import setup

    B, K = setting["batch"], setting["batches"]
    run = setup.build(run_config(*our_overrides(args, setting, model_dir, "perce")), abstract=True,
                      devices=jax.devices()[:1])
    run = dataclasses.replace(run, tokenizer=setup.resolve_model(str(model_dir), "model.path").tokenizer)
    records = prompt_records(run.tokenizer, setting["lengths"].sample(B * K, args.seed), seed=args.seed)
    path = work / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    it = run.data_iterator(records, num_epochs=None, shuffle=False)
    batches = [next(it) for _ in range(2 * K)]
    steps = [unpack(b) for b in batches]
    if any(len(s) != B for s in steps):
        raise SystemExit(f"{name}: a pipeline batch holds {[len(s) for s in steps]} examples, expected {B} each")
    flat = [e for s in steps for e in s]
    arrays = {}
    for k, field in (("p", "prompt_ids"), ("c", "prompt_no_profile_ids"), ("r", "response_ids")):
        seqs = [np.asarray(getattr(e, field), np.int32) for e in flat]
        arrays[f"{k}_tok"] = np.concatenate(seqs)
        arrays[f"{k}_off"] = np.cumsum([0] + [len(s) for s in seqs])
    np.savez(work / f"{name}.npz", **arrays)
    tokens = {"perce": [sum(len(e.prompt_ids) + len(e.prompt_no_profile_ids) + 2 * (len(e.response_ids) - 1)
                            for e in s) for s in steps],
              "ce": [sum(len(e.prompt_ids) + len(e.response_ids) - 1 for e in s) for s in steps]}
    compiled = {}
    for objective in setting["objectives"]:
        orun = setup.build(run_config(*our_overrides(args, setting, model_dir, objective)), abstract=True,
                           devices=jax.devices()[:1])
        shapes = {tuple(x.shape[-1] for x in (b.personal.tokens, b.counterfactual.tokens, b.response.ids))
                  for b in batches}
        largest = max(shapes, key=lambda s: s[0] + (s[1] if objective == "perce" else 0))
        compiled[objective] = {"bytes": peak_bytes(compile_train_step(orun, batch_spec(orun, B, *largest))),
                               "shape": {"batch": B, "personal": largest[0], "counterfactual": largest[1],
                                         "response": largest[2]}, "distinct_shapes": len(shapes)}
    return {"records": path, "npz": work / f"{name}.npz", "tokens": tokens, "compiled": compiled,
            "examples": len(flat), "lengths": setting["lengths"].describe()}


def ours(args, name, setting, model_dir, objective, data, work: Path, r: int) -> dict:
    wd = work / f"ours-{name}-{objective}-{r}"
    done = work / f"{wd.name}.json"
    if done.exists():  # a finished run of an earlier invocation with the same --work
        return json.loads(done.read_text())
    cmd = [str(REPO / ".venv" / "bin" / "percausal"), "train", "--config", str(REPO / "configs" / "base.py"),
           "--workdir", str(wd), "--no-progress"] + \
          [f"--config.{o}" for o in our_overrides(args, setting, model_dir, objective, data["records"])]
    rc, peak = run_measured(cmd, work / f"{wd.name}.log")
    if rc:
        raise SystemExit(f"percausal train failed (exit {rc}); see {work / (wd.name + '.log')}")
    recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [m for m in recs if "step_time" in m]
    res = {"step_times": [m["step_time"] for m in recs], "first_loss": recs[0]["loss"], "peak_rss_bytes": peak,
           "peak_rss_source": "wait4"}
    done.write_text(json.dumps(res))
    return res


def tunix(args, name, setting, model_dir, objective, data, work: Path, r: int, remat: str = "none") -> dict:
    out = work / f"tunix-{name}-{objective}-{r}-remat_{remat}.json"
    cmd = [str(tunix_python()), str(REPO / "bench" / "tunix_side.py"), "--model-dir", str(model_dir),
           "--data", str(data["npz"]), "--objective", objective, "--batch", str(setting["batch"]),
           "--accum", str(setting["accum"]), "--steps", str(2 * setting["batches"]), "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--lr", str(args.lr), "--bucket-multiple", str(args.bucket_multiple),
           "--seed", str(args.seed), "--remat", remat, "--out", str(out)]
    if out.exists():  # a finished run of an earlier invocation with the same --work: its own ru_maxrss
        res = json.loads(out.read_text())
        peak = res["peak_rss_bytes"]
    else:
        rc, peak = run_measured(cmd, work / f"{out.stem}.log")
        if rc:
            raise SystemExit(f"tunix_side.py failed (exit {rc}); see {work / (out.stem + '.log')}")
        res = json.loads(out.read_text())
    compiled = {"bytes": res["compiled_peak_bytes"], "shape": res["largest_micro_batch"],
                "distinct_shapes": res["distinct_shapes"], "remat": remat}
    if "oom" in res:
        return {"oom": res["oom"], "compiled": compiled, "peak_rss_bytes": peak, "versions": res["versions"]}
    return {"remat": remat, "step_times": [s["time_s"] for s in res["steps"]], "first_loss": res["steps"][0]["loss_token_mean"],
            "first_loss_mean_of_micro_means": res["steps"][0]["loss_mean_of_micro_means"],
            "peak_rss_bytes": peak, "compiled": compiled, "versions": res["versions"]}


def summarize(K: int, tokens: list[int], runs: list[dict]) -> dict:
    timed = [t for run in runs for t in run["step_times"][K:2 * K]]
    real = sum(tokens[K:2 * K]) * len(runs)
    return {"tokens_per_s": real / sum(timed), "median_step_s": statistics.median(timed),
            "timed_steps": len(timed), "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs)}


def report(results: dict, info: dict, args) -> str:
    gib = lambda b: f"{b / 2**30:.2f}" if b else "n/a"  # noqa: E731
    rows = []
    rss = lambda run: gib(run["peak_rss_bytes"]) + ("" if run.get("peak_rss_source", "wait4") == "wait4"  # noqa
                                                    else "†")
    for name, s in results["settings"].items():
        for objective, o in s["objectives"].items():
            us, them = o["ours"], o["tunix"]
            if them is None:  # no Tunix step fits this machine
                tried = [x for x in (o["tunix_default_oom"], o["runs"]["tunix"][0]) if x]
                need = " / ".join(f"{gib(x['compiled']['bytes'])} ({x['compiled']['remat']})" for x in tried)
                rows.append([f"{name} ({s['layers']} layers)", objective, f"{us['tokens_per_s']:.1f}",
                             "out of memory", "Tunix cannot run it here", f"{us['median_step_s']:.2f} / –",
                             f"{gib(o['ours_compiled']['bytes'])} / {need}",
                             f"**{o['ours_compiled']['bytes'] / o['runs']['tunix'][0]['compiled']['bytes']:.2f}×**",
                             f"{rss(o['runs']['ours'][0])} / –", f"{o['runs']['ours'][0]['first_loss']:.6f} / –"])
                continue
            speed = us["tokens_per_s"] / them["tokens_per_s"]
            mem = o["ours_compiled"]["bytes"] / o["tunix_compiled"]["bytes"]
            target_speed, target_mem = TARGETS[name.split("-")[0]]
            label = "" if o["tunix_remat"] == "none" else f" (Tunix remat {o['tunix_remat']})"
            rows.append([f"{name} ({s['layers']} layers)", objective + label, f"{us['tokens_per_s']:.1f}", f"{them['tokens_per_s']:.1f}",
                         f"**{speed:.2f}×** (≥ {target_speed}×: {'met' if speed >= target_speed else 'missed'})",
                         f"{us['median_step_s']:.2f} / {them['median_step_s']:.2f}",
                         f"{gib(o['ours_compiled']['bytes'])} / {gib(o['tunix_compiled']['bytes'])}",
                         f"**{mem:.2f}×**" + (f" (≤ {target_mem}×: {'met' if mem <= target_mem else 'missed'})"
                                              if target_mem else ""),
                         f"{rss(o['runs']['ours'][0])} / {gib(them['peak_rss_bytes'])}",
                         f"{o['first_loss']['ours']:.6f} / {o['first_loss']['tunix']:.6f}"])
    table = md_table(["setting", "objective", "ours tok/s", "Tunix tok/s", "speed", "median step s (ours / Tunix)",
                      "compiled peak GiB (ours / Tunix)", "memory", "peak RSS GiB (ours / Tunix)",
                      "first-step loss (ours / Tunix)"], rows)
    ooms = "\n".join(
        f"- `{n}` {objective}: Tunix with its default (no remat) ran out of memory on this 24 GiB machine: its compiled "
        f"step needs {gib(o['tunix_default_oom']['compiled']['bytes'])} GiB at its largest micro-batch "
        f"({o['tunix_default_oom']['oom'][:90]}…); then with `RematConfig.DECODER`: "
        + ("out of memory as well, so no Tunix speed at this shape." if o["tunix"] is None else
           "the row above, whose memory ratio is against that run.")
        for n, s in results["settings"].items() for objective, o in s["objectives"].items() if o["tunix_default_oom"])
    ooms += ("\n- † sampled after each step (`metrics.jsonl` `host_rss_mib`, a lower bound): a run reused from an "
             "earlier invocation that did not record its `wait4` peak." if "†" in str(rows) else "")
    settings = "\n".join(f"- `{n}`: {s['lengths']}; batch {SETTINGS[n]['batch']} "
                         f"({SETTINGS[n]['accum']} micro-batch(es)), {s['examples']} examples = "
                         f"{2 * SETTINGS[n]['batches']} steps per run, the last {SETTINGS[n]['batches']} timed; "
                         f"our largest compiled batch: {json.dumps(s['compiled'])}" for n, s in results["settings"].items())
    return f"""{info_block(info)}

Model: random-init Qwen2.5-0.5B shape (layers per row; V = 151,936), fp32, LoRA rank {args.rank} on the
seven projections, AdamW lr {args.lr}, clip 1.0; {args.rounds} round(s) per side, alternated (ours, Tunix, ...).
Tunix {results['tunix_versions']}. Ours: `percausal train` (default attention, chunked response-only head);
Tunix: `PeftTrainer` + qwix LoRA + a PerCE/CE `loss_fn` over full `[B, L, V]` logits (`bench/tunix_side.py`).
Speed = real tokens/s over the timed steps (epoch 2); memory = compiled step (ours / Tunix) at the largest shape.

{settings}

{table}

{ooms}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="longlamp,longlamp-4l,short",
                    help="comma-separated: longlamp, longlamp-4l, short")
    ap.add_argument("--objectives", default=None, help="comma-separated perce, ce (default: the setting's)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per side, alternated (ours, Tunix, ours, ...)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the setting's)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bucket-multiple", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="1 layer, lengths ×0.1, 2 batches, 1 round, no RESULTS")
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    if args.objectives:
        for n in SETTINGS:
            SETTINGS[n] = {**SETTINGS[n], "objectives": tuple(o.strip() for o in args.objectives.split(",") if o)}
    names = [s.strip() for s in args.setting.split(",") if s.strip()]
    if args.smoke:
        args.layers, args.rounds = 1, 1
        for n in names:
            SETTINGS[n] = {**SETTINGS[n], "lengths": SETTINGS[n]["lengths"].scaled(0.1), "batches": 2}
        args.bucket_multiple = 16
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tunix_python()
    results = {"rounds": args.rounds, "settings": {}}
    with tempfile.TemporaryDirectory(prefix="vs_tunix-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            setting = SETTINGS[name]
            model_dir = qwen25_shape_model(args.layers or setting["layers"], args.seed)
            data = prepare(args, name, setting, model_dir, work)
            out = {"lengths": data["lengths"], "examples": data["examples"], "compiled": data["compiled"],
                   "layers": args.layers or setting["layers"], "objectives": {}}
            for objective in setting["objectives"]:
                runs, remat, oom = {"ours": [], "tunix": []}, "none", None
                for r in range(args.rounds):
                    runs["ours"].append(ours(args, name, setting, model_dir, objective, data, work, r))
                    res = tunix(args, name, setting, model_dir, objective, data, work, r, remat)
                    if "oom" in res:  # Tunix's default does not fit: what its user does next is rematerialize
                        oom, remat = res, "decoder"
                        print(f"{name} {objective}: Tunix (remat none) out of memory ({res['oom'][:120]}); "
                              "again with RematConfig.DECODER", file=sys.stderr)
                        res = tunix(args, name, setting, model_dir, objective, data, work, r, remat)
                    runs["tunix"].append(res)
                    for side in runs:
                        print(f"{name} {objective} round {r} {side}: "
                              f"{runs[side][-1].get('step_times') or runs[side][-1].get('oom')}", file=sys.stderr)
                    if "oom" in res:
                        break  # no Tunix step runs on this machine: nothing to alternate with
                K = setting["batches"]
                results["tunix_versions"] = runs["tunix"][0]["versions"]
                if "oom" in runs["tunix"][0]:
                    out["objectives"][objective] = {
                        "ours": summarize(K, data["tokens"][objective], runs["ours"]), "tunix": None,
                        "ours_compiled": data["compiled"][objective], "tunix_compiled": runs["tunix"][0]["compiled"],
                        "tunix_remat": remat, "tunix_default_oom": oom, "runs": runs}
                    continue
                first = {side: runs[side][0]["first_loss"] for side in runs}
                if abs(first["ours"] - first["tunix"]) > LOSS_RTOL * abs(first["ours"]):
                    raise SystemExit(f"{name} {objective}: first-step losses differ: ours {first['ours']}, "
                                     f"Tunix {first['tunix']} (same weights and batch: they must agree)")
                results["tunix_versions"] = runs["tunix"][0]["versions"]
                out["objectives"][objective] = {
                    "ours": summarize(K, data["tokens"][objective], runs["ours"]),
                    "tunix": summarize(K, data["tokens"][objective], runs["tunix"]),
                    "ours_compiled": data["compiled"][objective], "tunix_compiled": runs["tunix"][0]["compiled"],
                    "tunix_remat": remat, "tunix_default_oom": oom,
                    "first_loss": first | {"tunix_mean_of_micro_means":
                                           runs["tunix"][0]["first_loss_mean_of_micro_means"]},
                    "runs": runs}
            results["settings"][name] = out
    info = machine_info({"tunix venv": str(TUNIX_VENV.relative_to(REPO))})
    body = report(results, info, args)
    print(body)
    if not args.smoke:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps({"info": info, **results}, indent=1, default=str))
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
