"""``percausal demo``: the main job. On the embedded SmolLM2-135M-Instruct and a synthetic personalization set,
train CE and PerCE with the same budget through ``percausal train``, evaluate both with ``percausal eval``, score
test tokens with ``percausal score``, export the PerCE model with ``percausal export`` (and load it back in
transformers), and write ``OUT/report.html``. Everything goes under ``OUT`` (default ``demo_out/``); the pipeline is
:mod:`percausal_jax.demo`.

A training preempted by SIGTERM (it saves a checkpoint) stops the demo with exit code 75 and one line; re-running
the same command resumes it (a method that finished trains no further step)."""

from __future__ import annotations

from percausal_jax.demo import DIFFICULTY, Demo


def register(subparsers) -> None:
    from percausal_jax.data.synthetic import LEVELS

    p = subparsers.add_parser("demo", help="CE vs PerCE on the embedded model: train, eval, score, export, report")
    p.add_argument("--out", default=Demo.out)
    p.add_argument("--users", type=int, default=Demo.users, help="synthetic users (test users are disjoint)")
    p.add_argument("--difficulty", default=DIFFICULTY, choices=tuple(LEVELS),
                   help=f"synthetic probe level (default {DIFFICULTY}: the level where CE does not saturate within "
                        "the demo's budget; see percausal synth --help)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: configs/demo.py)")
    p.add_argument("--eval-limit", type=int, default=Demo.eval_limit, help="test records generated for per method")
    p.add_argument("--max-new-tokens", type=int, default=Demo.max_new_tokens)
    p.add_argument("--score-limit", type=int, default=Demo.score_limit, help="test records in the token heatmap")
    p.add_argument("--contrast", type=float, default=Demo.contrast,
                   help="β of the extra report row: the PerCE model with profile-contrastive decoding (0: no row)")
    p.set_defaults(func=run)


def run(args) -> int:
    from percausal_jax.demo import run_demo

    run_demo(Demo(args.out, args.users, args.difficulty, args.steps, args.eval_limit, args.max_new_tokens,
                  args.score_limit, args.contrast))
    return 0
