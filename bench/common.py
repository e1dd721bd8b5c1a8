"""Shared helpers of the benchmark scripts: machine info, the RESULTS.md section writer, random Llama configs,
synthetic paired batches (``collate``, one example per row), and runs built by the library's spine
(``setup.build`` from ``configs/base.py`` + overrides, abstractly for lower+compile).

Import-light on purpose: nothing here imports grain, ml_collections, transformers or torch at module level (the
spine helpers import them when called), so ``bench/gpu_mfu.py`` can use it on a machine that has only
jax/flax/optax and this repository.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
RESULTS_HEADER = """# Benchmarks

Numbers written by the scripts in `bench/` (each section: machine, exact command, date). Re-run a script to replace
its own section. Timings on a shared 2-core CPU machine are noisy: read ratios measured in one process, not absolute
times.
"""
AOT_HEADING = "## AOT memory plans (TPU)"

if str(REPO) not in sys.path:  # `python bench/x.py` from the repository root
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------------ machine & output


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(extra: dict | None = None) -> dict:
    import jax

    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        # what this process may run on (`taskset -c 0 …` pins a benchmark to one core: both sides, JAX and PyTorch,
        # then run single-threaded, away from whatever else the machine is doing)
        "cores used (affinity)": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
        "python": platform.python_version(),
    }
    try:
        info["load_avg_at_start"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    info.update(extra or {})
    return info


def command_line() -> str:
    exe = sys.executable
    rel = os.path.relpath(exe, REPO)
    exe = rel if not rel.startswith("..") else exe
    return " ".join([exe] + [shlex.quote(a) for a in sys.argv])


def info_block(info: dict) -> str:
    lines = [f"- command: `{command_line()}`"]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(lines)


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replaces (or appends) the ``## title`` section of RESULTS.md: everything from that heading to the next
    ``## `` heading. Creates the file with its header and the (empty) AOT heading when missing. Never writes
    under the AOT heading."""
    try:
        from filelock import FileLock
        lock = FileLock(str(path) + ".lock")
    except ImportError:  # GPU machine without filelock: one writer at a time is the caller's business
        import contextlib
        lock = contextlib.nullcontext()

    heading = f"## {title}"
    with lock:
        text = path.read_text() if path.exists() else RESULTS_HEADER + "\n" + AOT_HEADING + "\n"
        if AOT_HEADING not in text:
            text = text.rstrip("\n") + "\n\n" + AOT_HEADING + "\n"
        section = heading + "\n\n" + body.strip("\n") + "\n\n"
        pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
        if pattern.search(text):
            text = pattern.sub(lambda _: section, text, count=1)
        else:  # new sections go before the AOT heading (owned by someone else) so it stays last
            at = text.index(AOT_HEADING)
            text = text[:at] + section + text[at:]
        path.write_text(text.rstrip("\n") + "\n")
    try:
        os.remove(str(path) + ".lock")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- models & batches


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, *, tie: bool = False,
                 max_pos: int = 8192):
    from percausal_jax.models.config import ModelConfig

    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, rms_norm_eps=1e-5, max_position_embeddings=max_pos,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def round_up(n: int, m: int = 16) -> int:
    return -(-n // m) * m


def objective_names(arg: str | None = None) -> list[str]:
    """``--objectives a,b`` checked against the registry (unknown names are an error naming the choices); every
    registered objective when ``arg`` is empty."""
    from percausal_jax.objectives import OBJECTIVES, get

    return [get(n.strip()).name for n in arg.split(",") if n.strip()] if arg else list(OBJECTIVES)


def synthetic_examples(B: int, personal_prompt: int, cf_prompt: int, response: int, vocab: int, seed: int = 0):
    """B PairedExamples of random ids: the counterfactual prompt is the last ``cf_prompt`` tokens of the personal
    prompt (the query; the profile is the prefix), the response has exactly ``response`` ids (EOS last)."""
    from percausal_jax.data.pairing import PairedExample

    rs = np.random.RandomState(seed)
    out = []
    for _ in range(B):
        p = rs.randint(3, vocab, personal_prompt).tolist()
        p[0] = 1
        c = [1] + p[len(p) - cf_prompt + 1:]
        r = rs.randint(3, vocab, response - 1).tolist() + [2]
        out.append(PairedExample(tuple(p), tuple(c), tuple(r)))
    return out


def padded_shapes(examples, multiple: int = 16) -> tuple[int, int, int]:
    """(Lp, Lc, R) of one example per row, each pass padded to its own max length rounded up to ``multiple``."""
    return (round_up(max(e.personal_len for e in examples), multiple),
            round_up(max(e.counterfactual_len for e in examples), multiple),
            round_up(max(len(e.response_ids) for e in examples), multiple))


def collate_examples(examples, multiple: int = 16):
    """The :class:`~percausal_jax.data.pairing.PairedBatch` of one example per row, shaped by :func:`padded_shapes`."""
    from percausal_jax.data.pairing import collate

    return collate([[e] for e in examples], *padded_shapes(examples, multiple))


# ------------------------------------------------------------------------------------- runs built by the spine


def run_config(*overrides: str):
    """The typed :class:`~percausal_jax.config.RunConfig` of ``configs/base.py`` with ``a.b=value`` overrides."""
    from percausal_jax.config import RunConfig, load_config

    return RunConfig.from_config(load_config(str(REPO / "configs" / "base.py"), list(overrides)), where="bench")


def abstract_run(model_config, *overrides: str):
    """``setup.build(run_config(*overrides), abstract=True)`` on this machine's devices with ``model_config``: the
    run every command builds, with ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    import jax

    from percausal_jax.training import setup

    return setup.build(run_config(*overrides), abstract=True, devices=jax.devices(), model_config=model_config)


def batch_spec(run, batch: int, personal_len: int, counterfactual_len: int, response_len: int):
    """The abstract batch of these shapes, its leading axis sharded over the run's batch axes (as ``aot.plan``)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from percausal_jax.data.pairing import PairedBatch

    return PairedBatch.spec(batch, personal_len, counterfactual_len, response_len,
                            sharding=NamedSharding(run.mesh, PartitionSpec(("data", "fsdp"))))


def compile_train_step(run, batch):
    """lower+compile the run's jitted train step (state donated) on its abstract state and ``batch`` (a spec)."""
    import jax

    ref = run.params if run.objective.requirements.reference else None
    with jax.set_mesh(run.mesh):
        return run.train_step().lower(run.abstract_state(), run.frozen, ref, batch).compile()


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def peak_bytes(compiled) -> int | None:
    """arguments + temporaries + outputs − aliased (``aot.Plan.peak_bytes``); None without a memory analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def gib(b: float) -> str:
    return f"{b / 2**30:.3f}"


# ------------------------------------------------------------------------- a large-vocabulary HF model directory

# Qwen2.5-0.5B's architecture (config.json of Qwen/Qwen2.5-0.5B): qwen2 = q/k/v projections with bias, tied
# embeddings, 151,936-token vocabulary. Only the depth is a parameter of the benches (2-core budgets).
QWEN25_05B = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, head_dim=64, intermediate_size=4864,
                  vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  max_position_embeddings=32768, hidden_act="silu", num_hidden_layers=24)


def qwen25_shape_dir(out_dir, layers: int, seed: int = 0, tokenizer_from: str = "embedded") -> Path:
    """A randomly initialized Hugging Face model directory (safetensors, fp32) with Qwen2.5-0.5B's shape and
    ``layers`` decoder layers (``AutoModelForCausalLM.from_config``, torch seed ``seed``), plus the tokenizer of
    ``tokenizer_from`` (default: the embedded SmolLM2's, whose 49,152 ids all lie inside the 151,936-row embedding;
    the random prompts of the benches need a tokenizer only to turn their texts into ids). Both sides load these
    same weights: ours through the HF import (``model.path``), the PyTorch reference with ``from_pretrained``.
    Idempotent: an existing directory with the same ``layers`` and ``seed`` (``bench_shape.json``) is reused."""
    import json
    import shutil

    out = Path(out_dir)
    stamp = {"shape": "Qwen2.5-0.5B", "layers": layers, "seed": seed, "tokenizer_from": tokenizer_from}
    if (out / "bench_shape.json").exists() and json.loads((out / "bench_shape.json").read_text()) == stamp:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from percausal_jax.hf.checkpoint import resolve_model_dir
    from percausal_jax.hf.gguf import resolve_model_arg

    tok_dir = resolve_model_dir(resolve_model_arg(tokenizer_from)).local
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    config = AutoConfig.for_model("qwen2", **{**QWEN25_05B, "num_hidden_layers": layers}, **ids,
                                  use_sliding_window=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    for extra in ("chat_template.jinja",):
        if (Path(tok_dir) / extra).exists() and not (out / extra).exists():
            shutil.copy(Path(tok_dir) / extra, out / extra)
    (out / "bench_shape.json").write_text(json.dumps(stamp))
    del model
    return out


def bench_cache(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/percausal/bench/<parts>`` (default ``~/.cache``): model directories the benches build."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "percausal" / "bench"
    return root.joinpath(*parts)


def qwen25_shape_model(layers: int, seed: int = 0) -> Path:
    """:func:`qwen25_shape_dir` in the bench cache (built once per depth and seed)."""
    return qwen25_shape_dir(bench_cache(f"qwen2.5-0.5b-shape-{layers}l-seed{seed}"), layers, seed)


# ------------------------------------------------------------------------------------------- batches → examples


def unpack(batch) -> list:
    """The :class:`~percausal_jax.data.pairing.PairedExample`\\ s of a host ``PairedBatch`` (packed or not), row by
    row and segment by segment: the inverse of ``pairing.collate``, so a reference can run exactly the examples a
    pipeline batch holds."""
    from percausal_jax.data.pairing import PairedExample

    p, c, r = batch.personal, batch.counterfactual, batch.response
    out = []
    for b in range(r.ids.shape[0]):
        real = np.asarray(r.weight[b]) > 0
        for seg in sorted(set(np.asarray(r.segment_ids[b])[real].tolist())):
            ids = np.asarray(r.ids[b])[real & (np.asarray(r.segment_ids[b]) == seg)]
            n = len(ids)
            ps = np.asarray(p.tokens[b])[np.asarray(p.segment_ids[b]) == seg]
            cs = np.asarray(c.tokens[b])[np.asarray(c.segment_ids[b]) == seg]
            out.append(PairedExample(tuple(ps[:len(ps) - n + 1].tolist()), tuple(cs[:len(cs) - n + 1].tolist()),
                                     tuple(ids.tolist())))
    return out


def real_tokens(batch) -> tuple[int, int]:
    """(personal, counterfactual) non-padding tokens of a ``PairedBatch``."""
    return int((np.asarray(batch.personal.segment_ids) != 0).sum()), \
        int((np.asarray(batch.counterfactual.segment_ids) != 0).sum())


# ------------------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
