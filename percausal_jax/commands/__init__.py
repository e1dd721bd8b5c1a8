"""One module per ``percausal`` subcommand, each exposing ``register(subparsers)``."""
