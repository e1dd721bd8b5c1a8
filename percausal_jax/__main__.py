import sys

from percausal_jax.cli import main

sys.exit(main())
