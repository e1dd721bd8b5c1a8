"""``config.json`` of the paper models, so AOT planning works offline (architecture only: no weights)."""

from __future__ import annotations

_QWEN = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "vocab_size": 151936, "rope_theta": 1_000_000.0,
         "bos_token_id": 151643, "eos_token_id": 151645}

PRESETS: dict[str, dict] = {
    "Qwen/Qwen3-4B": {**_QWEN, "model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728,
                      "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                      "max_position_embeddings": 40960, "tie_word_embeddings": True},
    "Qwen/Qwen3-14B": {**_QWEN, "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 17408,
                       "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                       "max_position_embeddings": 40960, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-3B": {**_QWEN, "model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008,
                        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                        "max_position_embeddings": 32768, "tie_word_embeddings": True, "eos_token_id": 151643},
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 128000, "eos_token_id": 128009},
}
