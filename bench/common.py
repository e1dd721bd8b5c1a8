"""Shared helpers of the benchmark scripts: machine info, the RESULTS.md section writer, random Llama configs,
synthetic paired batches, and abstract (allocation-free) train states for lower+compile.

Import-light on purpose: nothing here imports grain, ml_collections, transformers or torch at module level, so
``bench/gpu_mfu.py`` can use it on a machine that has only jax/flax/optax and this repository.
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


def collate_examples(examples, multiple: int = 16) -> dict:
    """One example per row, each pass padded to its own max length (rounded up to ``multiple``)."""
    from percausal_jax.data.pairing import collate

    Lp = round_up(max(e.personal_len for e in examples), multiple)
    Lc = round_up(max(e.counterfactual_len for e in examples), multiple)
    R = round_up(max(len(e.response_ids) for e in examples), multiple)
    return collate([[e] for e in examples], Lp, Lc, R).as_dict()


def abstract_batch(batch: dict):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)


def objective_config():
    """The library's objective defaults (ml_collections); falls back to a plain-dict copy when ml_collections is
    missing (GPU machine): the objectives only call ``cfg[name]``, ``.get`` and attribute access."""
    from percausal_jax.objectives.losses import default_config

    return default_config()


def abstract_model(mc, *, dtype="float32", param_dtype="float32", scan_layers=False, remat="none",
                   attention_impl="xla"):
    """(graphdef, params, frozen) of a CausalLM built abstractly (ShapeDtypeStructs, nothing allocated)."""
    import jax.numpy as jnp
    from flax import nnx

    from percausal_jax.models.decoder import CausalLM

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    abstract = nnx.eval_shape(lambda: CausalLM(mc, dtype=dt[dtype], param_dtype=dt[param_dtype],
                                               scan_layers=scan_layers, remat_policy=remat,
                                               attention_impl=attention_impl, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)


def abstract_train_state(params, tx):
    import jax
    import jax.numpy as jnp

    from percausal_jax.training.step import TrainState

    opt = jax.eval_shape(tx.init, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return TrainState(step=scalar, params=params, opt_state=opt, nan_skips=scalar)


def compile_train_step(graphdef, params, frozen, batch_abs, objective: str, obj_cfg, tx, *, chunk_size=8192,
                       donate=True):
    """lower+compile the library's train step on abstract inputs; returns the Compiled object."""
    import jax
    import optax

    from percausal_jax.objectives import registry
    from percausal_jax.training.step import make_train_step

    step = make_train_step(graphdef, tx, optax.constant_schedule(1e-5), objective, obj_cfg, chunk_size=chunk_size)
    state = abstract_train_state(params, tx)
    needs_ref = bool(registry.get(objective).requirements(obj_cfg[objective]).reference)
    jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
    return jitted.lower(state, frozen, params if needs_ref else None, batch_abs).compile()


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def gib(b: float) -> str:
    return f"{b / 2**30:.3f}"
