"""The Tunix side of ``bench/vs_tunix.py``: PerCE (or CE) as a custom loss of Tunix's ``PeftTrainer``, written the
way Tunix's documentation and CLI (``tunix/cli/peft_main.py``) write a loss, on Tunix's own Qwen2 model with qwix LoRA.

Runs in its own virtual environment (``.venv-tunix``, made by ``vs_tunix.py`` from ``bench/tunix-requirements.txt``:
Tunix pins ``safetensors<0.8`` while our transformers needs ≥ 0.8) with the same jax/jaxlib/flax/optax as ours, so the
compiler is the same. It never imports percausal_jax: everything it needs comes in the ``--data`` file and the
model directory, both written by ``vs_tunix.py``.

- Model: ``tunix.models.qwen2`` with ``ModelConfig.qwen2p5_0p5b()`` (``num_layers`` from the directory's config),
  weights from the directory's safetensors (``params.create_model_from_safe_tensors``), fp32, no remat (Tunix's
  default, as ours).
- LoRA: ``qwix.LoraProvider(module_path=<the seven projections>, rank, alpha)`` + ``qwix.apply_lora_to_model``, as
  ``tunix/cli/utils/model.py`` does; ``PeftTrainer`` then trains only ``nnx.LoRAParam``.
- Batches: each pass's rows right-padded to the micro-batch maximum rounded up to ``--bucket-multiple`` (the same
  shape rule as our bucketed pipeline: a kinder choice for Tunix than its examples' fixed ``max_target_length``);
  positions and the ``[B, L, L]`` causal mask from ``tunix.sft.utils`` (``build_positions_from_mask``,
  ``make_causal_attn_mask``), as ``peft_main.py``'s ``gen_model_input_fn``.
- Loss (``with_loss_fn``): the model's full ``[B, L, V]`` fp32 logits, ``log_softmax``, gold tokens gathered with
  ``take_along_axis`` (Tunix's default loss multiplies by a ``one_hot`` instead: one more ``[B, L, V]`` tensor, which
  we spare it). PerCE: both passes, PIR = log p_personal − log p_counterfactual on the response tokens under
  ``stop_gradient``, weight clip(PIR, 0.8, 5), loss = Σ w·nll / n; CE: the personal pass only, Σ nll / n.
- Gradient accumulation: ``TrainingConfig(gradient_accumulation_steps=A)`` (``optax.MultiSteps``: the mean of the
  micro-batch means); the per-micro-batch loss sums and token counts come back as ``aux`` so the driver can also
  form the token-weighted mean our trainer reports.
- Optimizer: ``clip_by_global_norm(1.0)`` then ``optax.adamw(lr, weight_decay=0)``, as our run's.
- ``--remat``: Tunix's ``RematConfig`` (default NONE, as ours); a step that runs out of memory is written as
  ``{"oom": ...}`` with its compiled peak, not raised.

Measured: the wall time between successive pulls from the data iterator, each pull first waiting for the previous
micro-step's result (so a gap is one micro-step, host work included, as our loop measures its steps), the compiled
step's memory analysis at the largest micro-batch shape, the process's RSS before training and its peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from common import peak_bytes, peak_rss_bytes, round_up, rss_bytes  # import-light: no percausal_jax

PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
CLIP_MIN, CLIP_MAX = 0.8, 5.0  # PerCE's defaults (shared/specs/perce.md)


def examples(path: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(personal prompt, counterfactual prompt, response) token ids of every example, in training order."""
    z = np.load(path)
    out = []
    for i in range(len(z["r_off"]) - 1):
        cut = lambda k: z[f"{k}_tok"][z[f"{k}_off"][i]:z[f"{k}_off"][i + 1]]  # noqa: E731
        out.append((cut("p"), cut("c"), cut("r")))
    return out


def pass_rows(prompts, responses, multiple: int):
    """One pass's right-padded rows: inputs = (prompt + response)[:-1], targets the next tokens, and where each
    response token's prediction sits. tokens/targets/mask: [n, L]; index/resp_mask: [n, R]."""
    n = len(prompts)
    L = round_up(max(len(p) + len(r) - 1 for p, r in zip(prompts, responses)), multiple)
    R = round_up(max(len(r) for r in responses), multiple)
    tokens, targets = np.zeros((n, L), np.int32), np.zeros((n, L), np.int32)
    mask = np.zeros((n, L), bool)
    index, resp_mask = np.zeros((n, R), np.int32), np.zeros((n, R), bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = np.concatenate([p, r]).astype(np.int32)
        tokens[i, :len(seq) - 1], targets[i, :len(seq) - 1], mask[i, :len(seq) - 1] = seq[:-1], seq[1:], True
        index[i, :len(r)] = np.arange(len(p) - 1, len(seq) - 1)
        resp_mask[i, :len(r)] = True
    return tokens, targets, mask, index, resp_mask


def micro_batch(exs, multiple: int, objective: str) -> dict:
    p_tok, p_tgt, p_mask, p_idx, r_mask = pass_rows([e[0] for e in exs], [e[2] for e in exs], multiple)
    out = dict(p_tokens=p_tok, p_targets=p_tgt, p_mask=p_mask, p_index=p_idx, r_mask=r_mask)
    if objective == "perce":
        c_tok, c_tgt, c_mask, c_idx, _ = pass_rows([e[1] for e in exs], [e[2] for e in exs], multiple)
        out.update(c_tokens=c_tok, c_targets=c_tgt, c_mask=c_mask, c_index=c_idx)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True, help=".npz of examples written by vs_tunix.py")
    ap.add_argument("--objective", choices=("perce", "ce"), default="perce")
    ap.add_argument("--batch", type=int, required=True, help="examples per optimizer step")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bucket-multiple", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remat", choices=("none", "block", "decoder"), default="none",
                    help="Tunix's ModelConfig.remat_config (none is its default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    import qwix
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    t0 = time.perf_counter()
    hf = json.loads((Path(args.model_dir) / "config.json").read_text())
    cfg = dataclasses.replace(qwen2.ModelConfig.qwen2p5_0p5b(), num_layers=hf["num_hidden_layers"],
                              remat_config=getattr(qwen2.RematConfig, args.remat.upper()))
    model = qwen2_params.create_model_from_safe_tensors(args.model_dir, cfg)
    provider = qwix.LoraProvider(module_path=f".*({PROJECTIONS})", rank=args.rank, alpha=args.alpha)
    model = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(args.seed))
    load_s = time.perf_counter() - t0

    def gold_logprobs(model, tokens, targets, mask, index):
        """log p(target) at each response position: the full [B, L, V] logits, log-softmax, gather. [B, R]"""
        logits, _ = model(tokens, sft_utils.build_positions_from_mask(mask), None,
                          sft_utils.make_causal_attn_mask(mask))
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        return jnp.take_along_axis(logp, index, axis=1)

    def perce_loss(model, p_tokens, p_targets, p_mask, p_index, r_mask, c_tokens, c_targets, c_mask, c_index):
        lp = gold_logprobs(model, p_tokens, p_targets, p_mask, p_index)
        lc = gold_logprobs(model, c_tokens, c_targets, c_mask, c_index)
        w = jnp.clip(jax.lax.stop_gradient(lp - lc), CLIP_MIN, CLIP_MAX)
        n = r_mask.sum()
        loss_sum = -jnp.sum(jnp.where(r_mask, w * lp, 0.0))
        return loss_sum / n, {"loss_sum": loss_sum, "n": n}

    def ce_loss(model, p_tokens, p_targets, p_mask, p_index, r_mask):
        lp = gold_logprobs(model, p_tokens, p_targets, p_mask, p_index)
        n = r_mask.sum()
        loss_sum = -jnp.sum(jnp.where(r_mask, lp, 0.0))
        return loss_sum / n, {"loss_sum": loss_sum, "n": n}

    class Trainer(peft_trainer.PeftTrainer):
        """PeftTrainer keeping each micro-batch's aux (its documented override point)."""

        aux: list = []

        def _post_process_train_step(self, aux):
            self.aux.append(aux)

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.0))
    config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=args.steps,
                                         gradient_accumulation_steps=args.accum if args.accum > 1 else None)
    trainer = Trainer(model, optimizer, config).with_loss_fn(
        perce_loss if args.objective == "perce" else ce_loss, has_aux=True)

    exs = examples(Path(args.data))
    mb = args.batch // args.accum
    micro = [micro_batch(exs[i:i + mb], args.bucket_multiple, args.objective) for i in range(0, len(exs), mb)]
    need = args.steps * args.accum
    stream = [micro[i % len(micro)] for i in range(need)]  # epochs over the same order

    # The compiled step's memory at the largest micro-batch (what nnx.jit compiles inside the trainer).
    largest = max(micro, key=lambda b: b["p_tokens"].size + b.get("c_tokens", b["p_tokens"]).size)
    graphdef, state = nnx.split((trainer.model, trainer.optimizer))

    def pure_step(state, inputs):
        m, o = nnx.merge(graphdef, state)
        loss, aux, _ = trainer._train_step(m, o, inputs)
        return nnx.state((m, o)), loss

    t = time.perf_counter()
    compiled = peak_bytes(jax.jit(pure_step, donate_argnums=0).lower(state, largest).compile())
    plan_s = time.perf_counter() - t
    del graphdef, state

    pulls: list[float] = []

    def timed(batches):
        """Each pull waits for the previous micro-step to finish, then stamps the time: a gap is one micro-step,
        as our loop (which reads every step's metrics back) measures it."""
        for b in batches:
            if trainer.aux:
                jax.block_until_ready(trainer.aux[-1])
            pulls.append(time.perf_counter())
            yield b

    shapes = sorted({tuple(b["p_tokens"].shape) + tuple(b.get("c_tokens", np.zeros((0, 0))).shape[1:])
                     for b in micro})
    result = {"compiled_peak_bytes": compiled, "largest_micro_batch": {k: list(v.shape) for k, v in largest.items()},
              "distinct_shapes": len(shapes), "load_s": load_s, "plan_s": plan_s, "remat": args.remat,
              "versions": {m.__name__: getattr(m, "__version__", "?") for m in (jax, optax, qwix)}
              | {"tunix": _version("google-tunix"), "flax": _version("flax")}}
    rss_before = rss_bytes()
    t = time.perf_counter()
    try:
        trainer.train(timed(stream))
    except jax.errors.JaxRuntimeError as e:  # the step does not fit this machine: a result, not a crash
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        Path(args.out).write_text(json.dumps({**result, "oom": str(e).splitlines()[0],
                                              "peak_rss_bytes": peak_rss_bytes()}, indent=1))
        return
    pulls.append(time.perf_counter())  # train() waits for every in-flight step before returning
    train_s = time.perf_counter() - t

    aux = [jax.device_get(a) for a in trainer.aux]
    per_step = [pulls[(s + 1) * args.accum] - pulls[s * args.accum] for s in range(args.steps)]
    steps = []
    for s in range(args.steps):
        mbs = aux[s * args.accum:(s + 1) * args.accum]
        steps.append({"step": s + 1, "time_s": per_step[s],
                      "loss_mean_of_micro_means": float(np.mean([a["loss_sum"] / a["n"] for a in mbs])),
                      "loss_token_mean": float(sum(a["loss_sum"] for a in mbs) / sum(a["n"] for a in mbs))})
    Path(args.out).write_text(json.dumps({
        **result, "steps": steps, "train_s": train_s, "rss_before_train_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes()}, indent=1))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
