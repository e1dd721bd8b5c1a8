"""ModelConfig: one dataclass for every supported decoder family, read from and written to HF ``config.json``.

The families differ only in a handful of switches (listed on :class:`ModelConfig`); the decoder reads the switches,
never the family name. ``from_hf`` accepts both the transformers-5 layout (``rope_parameters``, ``layer_types``) and
the older one found in most hub checkpoints (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``,
``sliding_window_pattern``, ``use_sliding_window``/``max_window_layers``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from percausal_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
GEMMA_FAMILY = ("gemma", "gemma2", "gemma3_text")
# transformers' bias semantics per family: Qwen2 biases q/k/v only (``attention_bias``, default true), Mistral has
# no biases at all, every other family's ``attention_bias`` biases q/k/v *and* o_proj; only Llama reads ``mlp_bias``
# (gate/up/down). See ModelConfig.attention_out_bias.
_QKV_ONLY_BIAS = ("qwen2",)
_NO_ATTENTION_BIAS = ("mistral",)
_MLP_BIAS_TYPES = ("llama",)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: base ``theta`` plus an optional scaling rule."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: dict[str, Any], where: str) -> "RopeConfig":
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"{where}: rope type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        kw: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
        if rope_type in ("linear", "llama3"):
            kw["factor"] = float(params["factor"])
        if rope_type == "llama3":
            kw["low_freq_factor"] = float(params["low_freq_factor"])
            kw["high_freq_factor"] = float(params["high_freq_factor"])
            # transformers: absent -> the model's max_position_embeddings (passed in by _rope_from_hf)
            kw["original_max_position_embeddings"] = int(params.get("original_max_position_embeddings")
                                                         or params["max_position_embeddings"])
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.rope_type}
        if self.rope_type in ("linear", "llama3"):
            d["factor"] = self.factor
        if self.rope_type == "llama3":
            d.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return d


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM. Per-family switches:

    - ``attention_bias`` (q/k/v bias: Qwen2, or any family's ``attention_bias``), ``attention_out_bias`` (o_proj
      bias: HF ``attention_bias`` of Llama/Qwen3/Gemma*, never Qwen2; ``None`` = that family's rule),
      ``mlp_bias`` (gate/up/down bias: Llama's ``mlp_bias``), ``qk_norm`` (Qwen3, Gemma3), ``norm_plus_one``
      (Gemma: weight·(1+w)), ``embed_scale`` (Gemma: √hidden), ``sandwich_norm`` (Gemma2/3: post-attention and
      pre/post-FFN norms), ``attn_logit_softcap`` / ``final_logit_softcap`` (Gemma2), ``query_pre_attn_scalar``
      (Gemma2/3 scaling), ``layer_types`` + ``sliding_window`` (Mistral, Qwen2 windows, Gemma2/3 alternation),
      ``rope_local`` (Gemma3's local RoPE base for sliding layers).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool | None = None  # None: as transformers builds this family (see __post_init__)
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False
    embed_scale: bool = False
    sandwich_norm: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Everything in config.json we do not model ourselves, kept so export writes back what was read.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # generation_config.json as read (exported back unchanged).
    generation_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self._check_biases()
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(
                f"config: layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def _check_biases(self) -> None:
        """Resolves ``attention_out_bias`` and refuses bias combinations transformers cannot build for this
        ``model_type`` (they could not be exported as a checkpoint that loads back with the same behaviour)."""
        mt = self.model_type
        out_rule = False if mt in _QKV_ONLY_BIAS + _NO_ATTENTION_BIAS else self.attention_bias
        if self.attention_out_bias is None:
            object.__setattr__(self, "attention_out_bias", out_rule)
        if mt in _NO_ATTENTION_BIAS and self.attention_bias:
            raise UserError(f"config: model_type '{mt}' has no attention biases in transformers")
        if bool(self.attention_out_bias) != out_rule:
            rule = ("never has an o_proj bias" if mt in _QKV_ONLY_BIAS + _NO_ATTENTION_BIAS
                    else "has an o_proj bias exactly when attention_bias is set")
            raise UserError(f"config: model_type '{mt}' {rule} (attention_bias={self.attention_bias}, "
                            f"attention_out_bias={self.attention_out_bias})")
        if self.mlp_bias and mt not in _MLP_BIAS_TYPES:
            raise UserError(f"config: mlp_bias is only supported for model_type {', '.join(_MLP_BIAS_TYPES)} "
                            f"(transformers builds '{mt}' without MLP biases)")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(t == "sliding_attention" and self.sliding_window is not None for t in self.layer_types)

    def num_params(self) -> int:
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                           self.num_key_value_heads, self.head_dim)
        attn = (d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.attention_bias else 0)
                + (d if self.attention_out_bias else 0))
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        per_layer = attn + mlp + d * (4 if self.sandwich_norm else 2) + (2 * hd if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * per_layer + self.vocab_size * d + head + d

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"{where}: model_type '{model_type}' is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            n_layers = int(hf["num_hidden_layers"])
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            kw: dict[str, Any] = dict(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
            )
        except KeyError as e:
            raise UserError(f"{where}: required field {e} is missing") from None
        is_gemma = model_type in GEMMA_FAMILY
        kw.update(
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if is_gemma
                                                                                 else "silu"),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_plus_one=is_gemma,
            embed_scale=is_gemma,
            sandwich_norm=model_type in ("gemma2", "gemma3_text"),
            # transformers' defaults for an absent key (an explicit null stays None: no cap)
            attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0) if model_type == "gemma2" else None,
            final_logit_softcap=(hf.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None)
                                 if model_type in ("gemma2", "gemma3_text") else None),
            query_pre_attn_scalar=(hf.get("query_pre_attn_scalar", 256) if model_type in ("gemma2", "gemma3_text")
                                   else None),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        # Biases as transformers builds each family; keys a family ignores stay in ``extra`` (written back as read).
        if model_type in _QKV_ONLY_BIAS:
            kw["attention_bias"] = bool(hf.get("attention_bias", True))
            kw["attention_out_bias"] = False
        elif model_type not in _NO_ATTENTION_BIAS:
            kw["attention_bias"] = kw["attention_out_bias"] = bool(hf.get("attention_bias", False))
        if model_type in _MLP_BIAS_TYPES:
            kw["mlp_bias"] = bool(hf.get("mlp_bias", False))
        if kw["hidden_act"] not in ("silu", "gelu_pytorch_tanh", "gelu"):
            raise UserError(f"{where}: hidden activation '{kw['hidden_act']}' is not supported")
        kw["rope"], kw["rope_local"] = _rope_from_hf(hf, model_type, where)
        kw["sliding_window"], kw["layer_types"] = _windows_from_hf(hf, model_type, n_layers)
        known = set(kw) | {"rope_parameters", "rope_theta", "rope_scaling", "rope_local_base_freq", "layer_types",
                           "sliding_window", "hidden_activation", "hidden_act", "attn_logit_softcapping",
                           "final_logit_softcapping", "query_pre_attn_scalar", "use_sliding_window",
                           "max_window_layers", "sliding_window_pattern", "_sliding_window_pattern"}
        kw["extra"] = {k: v for k, v in hf.items() if k not in known}
        return cls(**kw)

    def to_hf(self, legacy: bool = True) -> dict[str, Any]:
        """The transformers-5 ``config.json`` dict (``rope_parameters``, ``layer_types``); with ``legacy`` also the
        keys older readers (transformers 4.x, vLLM, llama.cpp converters) look for instead: ``rope_theta``,
        ``rope_scaling`` (null without scaling) and Gemma3's ``rope_local_base_freq``. transformers 5 reads both
        layouts to the same values (its ``rope_scaling`` takes precedence and carries the same numbers)."""
        d = {k: v for k, v in self.extra.items() if k not in _LEGACY_KEYS}
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        d["hidden_activation" if self.model_type in ("gemma2", "gemma3_text") else "hidden_act"] = self.hidden_act
        if self.model_type not in _NO_ATTENTION_BIAS:
            d["attention_bias"] = self.attention_bias  # Llama-style families: also the o_proj bias
        if self.model_type in _MLP_BIAS_TYPES:
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "gemma3_text":
            d["rope_parameters"] = {"full_attention": self.rope.to_hf(),
                                    "sliding_attention": (self.rope_local or self.rope).to_hf()}
        else:
            d["rope_parameters"] = self.rope.to_hf()
        if self.model_type != "llama" and self.model_type != "gemma":
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
            d["layer_types"] = list(self.layer_types)
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = any(self.sliding_layers)
            d["max_window_layers"] = next((i for i, s in enumerate(self.sliding_layers) if s), self.num_hidden_layers)
        if self.model_type in ("gemma2", "gemma3_text"):
            d["attn_logit_softcapping"] = self.attn_logit_softcap
            d["final_logit_softcapping"] = self.final_logit_softcap
            d["query_pre_attn_scalar"] = self.query_pre_attn_scalar
        d.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
        if legacy:
            d.update(_legacy_rope(self))
        return d


# config.json keys of the pre-transformers-5 layout that to_hf derives (never copied from ``extra``).
_LEGACY_KEYS = ("rope_theta", "rope_scaling", "rope_local_base_freq")


def _legacy_rope(cfg: ModelConfig) -> dict[str, Any]:
    """``rope_theta`` + ``rope_scaling`` as transformers 4.x wrote them (Llama 3.1's hub config: ``{"rope_type":
    "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings":
    8192}``; ``null`` without scaling); Gemma3 puts its sliding-layer base in ``rope_local_base_freq``."""
    scaling = {k: v for k, v in cfg.rope.to_hf().items() if k != "rope_theta"}
    d: dict[str, Any] = {"rope_theta": cfg.rope.theta,
                         "rope_scaling": scaling if cfg.rope.rope_type != "default" else None}
    if cfg.model_type == "gemma3_text":
        d["rope_local_base_freq"] = (cfg.rope_local or cfg.rope).theta
    return d


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _rope_from_hf(hf: dict, model_type: str, where: str) -> tuple[RopeConfig, RopeConfig | None]:
    params = hf.get("rope_parameters")
    max_pos = {"max_position_embeddings": hf.get("max_position_embeddings", 4096)}  # llama3's fallback
    if model_type == "gemma3_text":
        if params and "full_attention" in params:
            return (RopeConfig.from_hf(params["full_attention"], where),
                    RopeConfig.from_hf(params.get("sliding_attention", {"rope_theta": 10000.0}), where))
        scaling = dict(hf.get("rope_scaling") or {})
        global_rope = RopeConfig.from_hf({**max_pos, **scaling, "rope_theta": hf.get("rope_theta", 1_000_000.0)},
                                         where)
        return global_rope, RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
    if params:
        return RopeConfig.from_hf({**max_pos, **params}, where), None
    scaling = dict(hf.get("rope_scaling") or {})
    return RopeConfig.from_hf({**max_pos, **scaling, "rope_theta": hf.get("rope_theta", 10000.0)}, where), None


def _windows_from_hf(hf: dict, model_type: str, n_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """Sliding window size and per-layer attention type, with each family's legacy defaults."""
    full, sliding = "full_attention", "sliding_attention"
    if model_type in ("llama", "gemma"):
        return None, (full,) * n_layers
    window = hf.get("sliding_window", 4096)  # transformers' default for an absent key; an explicit null = none
    if window is None:
        return None, (full,) * n_layers
    if hf.get("layer_types"):
        return int(window), tuple(hf["layer_types"])
    if model_type == "mistral":
        return int(window), (sliding,) * n_layers
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            return None, (full,) * n_layers
        first = int(hf.get("max_window_layers", n_layers))
        return int(window), tuple(sliding if i >= first else full for i in range(n_layers))
    if model_type == "gemma2":
        return int(window), tuple(sliding if i % 2 == 0 else full for i in range(n_layers))
    pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
    return int(window), tuple(sliding if (i + 1) % pattern else full for i in range(n_layers))


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Inverse frequencies ``[head_dim // 2]`` (numpy float64 → caller casts), HF's formulas per rope type."""
    import numpy as np

    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    return inv
