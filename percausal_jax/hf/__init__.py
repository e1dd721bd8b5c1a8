"""Hugging Face interop: safetensors checkpoints and the embedded GGUF model."""
