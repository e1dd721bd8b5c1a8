"""Profile-contrastive decoding on the demo's synthetic users: CE- and PerCE-trained models × β.

For each trained model (``percausal train --config configs/demo.py``, objective ``ce`` and ``perce``, the same data,
budget and learning rate as ``percausal demo``) and each β of ``--betas`` (default 0, 0.5, 1, 2; α =
``--plausibility``, default 0.1), greedy generations for the test users' records (users never seen in training) are
scored with the metrics of ``percausal eval`` (ROUGE-1/L, METEOR when WordNet is present, span recall = fraction of
the planted personal spans reproduced) and timed: generated tokens per second of wall time over the whole test set
(featurizing included, negligible next to decoding), measured on a second pass after a first pass compiled every
shape (so compile time is excluded), and its ratio to β = 0 (the cost of the second, profile-free context: ``2B``
rows per step instead of ``B``, and a prefill over the longer of the two prompts for both). On the tiny ``--smoke``
model the ratio means nothing (per-step dispatch dominates).

Decoding is ``percausal eval``'s (:func:`percausal_jax.evaluation.evaluate.generate_for_records` with
``DecodeConfig.contrast``): the run's featurizer builds both prompts, the profile-free one exactly as training's
counterfactual pass sees it. Tokens are counted as generated ids (EOS included) by wrapping the ``generate`` it calls.

    .venv/bin/python bench/contrastive_decoding.py                          # demo-sized: trains CE and PerCE
    .venv/bin/python bench/contrastive_decoding.py --runs demo_out/runs --data demo_out/data   # reuse `make demo`
    .venv/bin/python bench/contrastive_decoding.py --smoke                  # a tiny random model: checks the script

``--write`` replaces this script's section of ``bench/RESULTS.md``; by default the table is only printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, info_block, machine_info, md_table, write_section

METHODS = ("ce", "perce")
TITLE = "Profile-contrastive decoding (synthetic users, CE vs PerCE × β)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--runs", default=None, help="folder with trained ce/ and perce/ workdirs (skips training)")
    p.add_argument("--data", default=None, help="folder with the synth train.jsonl / test.jsonl (with --runs)")
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: configs/demo.py)")
    p.add_argument("--betas", default="0,0.5,1,2")
    p.add_argument("--plausibility", type=float, default=0.1)
    p.add_argument("--eval-limit", type=int, default=8, help="test records (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny random Llama (SmolLM2's tokenizer) instead of SmolLM2-135M: checks the script only")
    p.add_argument("--write", action="store_true", help="write the table to bench/RESULTS.md")
    args = p.parse_args()
    betas = [float(b) for b in args.betas.split(",")]

    from percausal_jax import cli
    from percausal_jax.evaluation.wordnet import available

    out = Path(args.out or tempfile.mkdtemp(prefix="contrast_bench_")).resolve()
    data = Path(args.data).resolve() if args.data else out / "data"
    if not (data / "test.jsonl").exists():
        _call(cli, ["synth", "--out-dir", data, "--users", args.users, "--seed", 0])
    runs = Path(args.runs).resolve() if args.runs else out / "runs"
    model_path = _tiny_model(out / "tiny_model") if args.smoke else "embedded"
    for method in METHODS:
        if not (runs / method).exists():
            _train(cli, runs / method, method, data, model_path, args.steps)

    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    records = records[:args.eval_limit] if args.eval_limit else records
    meteor = available()
    rows = []
    for method in METHODS:
        results = _evaluate(runs / method, records, betas, args, meteor)
        base = results[0.0]["tokens_per_s"] if 0.0 in results else None
        for beta in betas:
            r = results[beta]
            rows.append([method, beta, r.get("span_recall", float("nan")), r["rouge1"], r["rougeL"],
                         r.get("meteor", float("nan")), r["tokens_per_s"],
                         r["tokens_per_s"] / base if base else float("nan"), r["tokens"]])
    table = md_table(["model", "β", "span recall", "ROUGE-1", "ROUGE-L", "METEOR", "decode tok/s",
                      "tok/s vs β=0", "tokens"], rows)
    info = machine_info({"model": "tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct + LoRA",
                         "test records": len(records), "α": args.plausibility,
                         "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                         "METEOR": "on" if meteor else "off (no WordNet)"})
    print("\n" + table)
    if args.write:
        write_section(TITLE, info_block(info) + "\n\n" + table)
    return 0


def _call(cli, argv) -> None:
    rc = cli.main([str(a) for a in argv])
    if rc:
        sys.exit(f"`percausal {argv[0]}` failed with exit code {rc}")


def _train(cli, workdir: Path, method: str, data: Path, model_path, steps: int | None) -> None:
    from percausal_jax.demo import mesh_overrides as _mesh_overrides

    config = REPO / "configs" / "demo.py"
    argv = ["train", "--config", config, "--workdir", workdir, "--no-progress", f"--config.objective.name={method}",
            f"--config.model.path={model_path}", f"--config.data.train={data / 'train.jsonl'}",
            f"--config.data.eval={data / 'test.jsonl'}", *_mesh_overrides(config)]
    if steps:
        argv.append(f"--config.train.steps={steps}")
    print(f"== train {method}", file=sys.stderr, flush=True)
    _call(cli, argv)


def _evaluate(workdir: Path, records: list[dict], betas: list[float], args, meteor: bool) -> dict[float, dict]:
    """β → metrics (``percausal eval``'s) + decode tokens/s (second pass, compile excluded) + generated tokens."""
    from percausal_jax.evaluation import evaluate
    from percausal_jax.training.export import restore_model

    model, run, _, _ = restore_model(workdir)
    tokenizer, fcfg = run.tokenizer, run.featurize_config
    counted = [0]
    plain_generate = evaluate.generate

    def counting_generate(*a, **kw):
        outs = plain_generate(*a, **kw)
        counted[0] += sum(map(len, outs))
        return outs

    evaluate.generate = counting_generate  # the function generate_for_records calls
    results = {}
    for beta in betas:
        dcfg = evaluate.DecodeConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     contrast=beta, plausibility=args.plausibility)
        evaluate.generate_for_records(model, tokenizer, records, fcfg, dcfg, progress=False)  # compiles every shape
        counted[0] = 0
        t0 = time.perf_counter()
        rows = evaluate.generate_for_records(model, tokenizer, records, fcfg, dcfg, progress=False)
        seconds = time.perf_counter() - t0
        tokens = counted[0]
        metrics = evaluate.score(rows, records, "synthetic", meteor=meteor)
        results[beta] = {**metrics, "tokens": tokens, "tokens_per_s": tokens / seconds}
        print(f"{workdir.name} β={beta}: {json.dumps(results[beta])}", file=sys.stderr, flush=True)
    evaluate.generate = plain_generate
    return results


def _tiny_model(out: Path) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template (the demo's prompts)."""
    if (out / "config.json").exists():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from percausal_jax.hf.gguf import embedded_model_dir

    src = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(str(src))
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    for extra in ("chat_template.jinja",):
        if (src / extra).exists() and not (out / extra).exists():
            shutil.copy(src / extra, out / extra)
    return out


if __name__ == "__main__":
    sys.exit(main())
