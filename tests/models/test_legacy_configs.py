"""Hub checkpoints in the config.json layout transformers 4.4x wrote: ours against transformers 5 on the same directory.

Each case saves a tiny random checkpoint with transformers (bfloat16 weights, as hub checkpoints ship them), then
rewrites its config.json into the legacy layout: no ``rope_parameters`` / ``layer_types`` / ``dtype``; instead
``rope_theta`` + ``rope_scaling`` (llama3, linear with the old ``type`` key), Qwen2/3's ``use_sliding_window`` /
``max_window_layers`` / ``sliding_window``, Gemma2's implicit alternation, Gemma3's ``sliding_window_pattern`` /
``rope_local_base_freq`` / ``query_pre_attn_scalar``, and ``torch_dtype``. transformers 5.23 accepts all of these
(it normalizes them into ``rope_parameters`` / ``layer_types`` on load).

The values are chosen so every legacy key matters at the test's 64 positions (non-default thetas, a llama3 scaling
whose original context is 16, windows of 8 applied to only some layers), and ``MUTATIONS`` proves it: dropping (or
changing) each key moves transformers' logits by >= MARGIN, so a reader that ignored the key could not match.
Both models run in float32 (transformers is told ``dtype=float32``; ours loads float32 by default).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import percausal_jax as pj
from percausal_jax.errors import UserError
from tests.helpers import tiny_hf_model, torch_logits

IDS = np.random.RandomState(7).randint(0, 256, (2, 64))
ATOL = 2e-5  # observed float32 error: ~1.5e-6
MARGIN = 1e-2  # each legacy key moves transformers' logits by at least this much (observed: >= 0.03)
TRANSFORMERS_5_KEYS = ("rope_parameters", "layer_types", "dtype", "_sliding_window_pattern")
DROP = "<drop>"  # a mutation value: remove the key

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
QWEN_WINDOW = {"rope_theta": 1e6, "rope_scaling": None, "use_sliding_window": True, "sliding_window": 8}

# name -> (model_type, tiny_hf_model overrides, legacy config.json keys)
CASES = {
    "llama3": ("llama", {}, {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}),  # Llama 3.1
    "llama_linear": ("llama", {}, {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "mistral": ("mistral", {}, {"rope_theta": 1e6, "sliding_window": 8}),  # Mistral v0.1: every layer slides
    "qwen2": ("qwen2", {"num_hidden_layers": 3}, {**QWEN_WINDOW, "max_window_layers": 1}),  # layers 1, 2 slide
    # Qwen2.5's hub configs: a sliding_window that use_sliding_window=false switches off
    "qwen2_window_off": ("qwen2", {"num_hidden_layers": 3}, {**QWEN_WINDOW, "use_sliding_window": False,
                                                             "max_window_layers": 1}),
    "qwen3": ("qwen3", {"num_hidden_layers": 3, "head_dim": 24}, {**QWEN_WINDOW, "max_window_layers": 2}),
    "gemma": ("gemma", {}, {"rope_theta": 1e5, "hidden_act": "gelu"}),  # gemma-7b's legacy "gelu" (= tanh GELU)
    # Gemma2 hub configs: no layer pattern key (even layers slide), caps 50 / 30
    "gemma2": ("gemma2", {"num_hidden_layers": 3}, {"rope_theta": 1e5, "sliding_window": 8,
                                                   "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
                                                   "final_logit_softcapping": 30.0, "cache_implementation": "hybrid"}),
    # Gemma3 4B's text config: linear-scaled global RoPE, a local base for the sliding layers, a layer pattern
    "gemma3": ("gemma3_text", {"num_hidden_layers": 3}, {"rope_theta": 1e5, "rope_local_base_freq": 1e3,
                                                        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                                        "sliding_window_pattern": 3, "sliding_window": 8,
                                                        "query_pre_attn_scalar": 32}),
}

# (case, label, config changes) whose effect on transformers' logits is >= MARGIN
MUTATIONS = [
    ("llama3", "no_rope_theta", {"rope_theta": DROP}),
    ("llama3", "no_rope_scaling", {"rope_scaling": DROP}),
    ("llama_linear", "no_rope_theta", {"rope_theta": DROP}),
    ("llama_linear", "no_rope_scaling", {"rope_scaling": DROP}),
    ("mistral", "no_rope_theta", {"rope_theta": DROP}),
    ("mistral", "no_sliding_window", {"sliding_window": DROP}),
    ("qwen2", "no_rope_theta", {"rope_theta": DROP}),
    ("qwen2", "no_use_sliding_window", {"use_sliding_window": DROP}),
    ("qwen2", "no_max_window_layers", {"max_window_layers": DROP}),
    ("qwen2", "all_layers_slide", {"max_window_layers": 0}),
    ("qwen2_window_off", "window_on", {"use_sliding_window": True}),
    ("qwen3", "no_rope_theta", {"rope_theta": DROP}),
    ("qwen3", "no_use_sliding_window", {"use_sliding_window": DROP}),
    ("qwen3", "all_layers_slide", {"max_window_layers": 0}),
    ("gemma", "no_rope_theta", {"rope_theta": DROP}),
    ("gemma2", "no_rope_theta", {"rope_theta": DROP}),
    ("gemma2", "no_sliding_window", {"sliding_window": DROP}),
    ("gemma2", "no_query_pre_attn_scalar", {"query_pre_attn_scalar": DROP}),
    ("gemma2", "odd_layers_slide", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    ("gemma3", "no_rope_theta", {"rope_theta": DROP}),
    ("gemma3", "no_rope_local_base_freq", {"rope_local_base_freq": DROP}),
    ("gemma3", "no_rope_scaling", {"rope_scaling": DROP}),
    ("gemma3", "no_sliding_window_pattern", {"sliding_window_pattern": DROP}),
    ("gemma3", "no_sliding_window", {"sliding_window": DROP}),
    ("gemma3", "no_query_pre_attn_scalar", {"query_pre_attn_scalar": DROP}),
]
# Keys whose absence transformers fills with a default that does not move these logits by MARGIN (only checked for
# ours-matches-transformers: the default must be transformers' default).
ABSENT_ONLY = [
    ("gemma", "no_hidden_act", {"hidden_act": DROP}),  # transformers: gelu_pytorch_tanh
    ("gemma2", "no_attn_logit_softcapping", {"attn_logit_softcapping": DROP}),  # transformers: 50.0
    ("gemma2", "no_final_logit_softcapping", {"final_logit_softcapping": DROP}),  # transformers: 30.0
]
def _mutation_params(mutations):
    """pytest params ``case, changes`` (id ``case-label``)."""
    return [pytest.param(case, changes, id=f"{case}-{label}") for case, label, changes in mutations]


class LegacyCheckpoint:
    """One case's tiny checkpoint; ``dir(changes)`` is a directory with the legacy config.json (plus changes)."""

    def __init__(self, root, model_type, overrides, legacy):
        import torch

        self.root = root
        src = root / "src"
        tiny_hf_model(model_type, None, **overrides).to(torch.bfloat16).save_pretrained(str(src))
        hf = json.loads((src / "config.json").read_text())
        self.config = {k: v for k, v in hf.items() if k not in TRANSFORMERS_5_KEYS}
        self.config.update(legacy, torch_dtype="bfloat16")
        self._src, self._dirs, self._hf = src, {}, {}

    def dir(self, changes: dict | None = None):
        key = json.dumps(changes or {}, sort_keys=True)
        if key not in self._dirs:
            d = self.root / f"v{len(self._dirs)}"
            shutil.copytree(self._src, d)
            cfg = dict(self.config)
            for k, v in (changes or {}).items():
                if v == DROP:
                    cfg.pop(k)
                else:
                    cfg[k] = v
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
            self._dirs[key] = d
        return self._dirs[key]

    def hf_logits(self, changes: dict | None = None) -> np.ndarray:
        """transformers' float32 logits on IDS for ``dir(changes)`` (cached)."""
        import torch
        from transformers import AutoModelForCausalLM

        d = self.dir(changes)
        if d not in self._hf:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
            self._hf[d] = torch_logits(model, IDS)
        return self._hf[d]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case name -> LegacyCheckpoint, built on first use."""
    built = {}

    class Lazy(dict):
        def __missing__(self, name):
            model_type, overrides, legacy = CASES[name]
            built[name] = LegacyCheckpoint(tmp_path_factory.mktemp(name), model_type, overrides, legacy)
            return built[name]

    return Lazy()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_legacy_layout_matches_transformers(checkpoints, case, scan):
    ck = checkpoints[case]
    d = ck.dir()
    on_disk = json.loads((d / "config.json").read_text())
    assert not set(on_disk) & set(TRANSFORMERS_5_KEYS), "the config must be in the legacy layout only"
    ours = np.asarray(pj.load_pretrained(d, scan_layers=scan)(IDS))
    np.testing.assert_allclose(ours, ck.hf_logits(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case, changes", _mutation_params(MUTATIONS))
def test_legacy_key_changes_transformers_logits(checkpoints, case, changes):
    """The legacy key is live: without it (or changed) transformers' logits move by >= MARGIN."""
    ck = checkpoints[case]
    assert _max_diff(ck.hf_logits(changes), ck.hf_logits()) >= MARGIN


@pytest.mark.parametrize("case, changes", _mutation_params(MUTATIONS + ABSENT_ONLY))
def test_mutated_layout_matches_transformers(checkpoints, case, changes):
    """Without the key (or changed) ours still reads what transformers reads: transformers' default when absent."""
    ck = checkpoints[case]
    ours = np.asarray(pj.load_pretrained(ck.dir(changes))(IDS))
    np.testing.assert_allclose(ours, ck.hf_logits(changes), atol=ATOL, rtol=0)


# Absent keys whose transformers default does not show in these logits (a window of 4096 > 64 positions, a cap of 50
# far above these attention scores): ours' parsed value against transformers' parsed config.
ABSENT_DEFAULTS = [
    ("mistral", "sliding_window", lambda c: c.sliding_window, lambda h: h.sliding_window),
    ("qwen2", "sliding_window", lambda c: c.sliding_window, lambda h: h.sliding_window),
    ("gemma2", "sliding_window", lambda c: c.sliding_window, lambda h: h.sliding_window),
    ("gemma2", "attn_logit_softcapping", lambda c: c.attn_logit_softcap, lambda h: h.attn_logit_softcapping),
]


@pytest.mark.parametrize("case, key, ours_value, hf_value", ABSENT_DEFAULTS,
                         ids=[f"{c}-no_{k}" for c, k, _, _ in ABSENT_DEFAULTS])
def test_absent_key_default_matches_transformers_config(checkpoints, case, key, ours_value, hf_value):
    from transformers import AutoConfig

    from percausal_jax.hf.checkpoint import read_config

    d = checkpoints[case].dir({key: DROP})
    assert ours_value(read_config(d)) == hf_value(AutoConfig.from_pretrained(str(d)))


def test_torch_dtype_read_by_transformers_not_by_ours(checkpoints):
    """transformers 5 still reads the legacy ``torch_dtype`` (its default ``dtype='auto'`` loads the bfloat16 weights
    as float16 when ``torch_dtype`` says so); ours loads the dtype it is asked for (float32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    ck = checkpoints["llama3"]
    assert AutoModelForCausalLM.from_pretrained(str(ck.dir())).dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(str(ck.dir({"torch_dtype": "float16"}))).dtype == torch.float16
    assert pj.load_pretrained(ck.dir()).model.embed_tokens.embedding[...].dtype == np.float32
    bf16 = pj.load_pretrained(ck.dir(), dtype="bfloat16")
    assert bf16.model.embed_tokens.embedding[...].dtype == np.dtype("bfloat16")


@pytest.mark.parametrize("scaling", [{"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}],
                         ids=["dynamic", "yarn"])
def test_unsupported_rope_scaling_refused(checkpoints, scaling):
    """transformers runs these; ours refuses them by name instead of silently using unscaled RoPE."""
    ck = checkpoints["llama3"]
    # max_position_embeddings 16 (< the 64 positions): dynamic NTK scaling only acts beyond it
    changes = {"rope_scaling": scaling, "max_position_embeddings": 16}
    d = ck.dir(changes)
    assert _max_diff(ck.hf_logits(changes), ck.hf_logits({"rope_scaling": DROP})) >= MARGIN
    rope_type = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(UserError, match=f"rope type '{rope_type}' is not supported"):
        pj.load_pretrained(d)


def test_llama3_scaling_without_original_max_position_embeddings(checkpoints):
    ck = checkpoints["llama3"]
    scaling = {k: v for k, v in LLAMA3_SCALING.items() if k != "original_max_position_embeddings"}
    changes = {"rope_scaling": scaling, "max_position_embeddings": 16}
    ours = np.asarray(pj.load_pretrained(ck.dir(changes))(IDS))
    np.testing.assert_allclose(ours, ck.hf_logits(changes), atol=ATOL, rtol=0)
