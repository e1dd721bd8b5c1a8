"""Training and evaluation driven in-process by a command that goes on afterwards (``percausal sweep``'s cells,
``percausal demo``): the one way both train a cell (:func:`train_to_end`), evaluate it (:func:`evaluate`) and run
another subcommand (:func:`run_command`).

``percausal train`` on SIGTERM saves a checkpoint and returns early (exit 0: a scheduler re-runs it). A command that
drives training and then evaluates, compares or caches the result must not go on with that partly trained model:
:func:`train_to_end` raises :class:`Preempted` when the loop returned before ``train.steps`` applied updates, and the
CLI turns it into one line (how to resume) and exit code :attr:`Preempted.exit_code`. Re-running the same command
resumes the run from its checkpoint; a run that already finished trains no further step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

from percausal_jax.errors import UserError


class Preempted(UserError):
    """A training run driven in-process stopped before its budget (preempted: its checkpoint is saved). One line,
    exit code 75 (``EX_TEMPFAIL``: a temporary failure, re-run the same command to resume)."""

    exit_code = 75


def stopped_early(last: dict, steps: int) -> bool:
    """Whether :func:`percausal_jax.training.loop.train`'s return value (its last logged metrics; ``{}`` when the
    run had already finished, so no step ran) is that of a run that stopped before ``steps`` applied updates. The
    loop leaves ``while applied < steps`` only when preempted (else it raises), and ``step - nan_skips`` of its last
    record is the updates applied."""
    if not last:
        return False
    if "preempted" in last:
        return bool(last["preempted"])
    return int(last["step"]) - int(last.get("nan_skips", 0)) < steps


def train_to_end(config: str | os.PathLike, workdir, overrides: Sequence[str], what: str,
                 progress: bool = False) -> float:
    """Trains (or resumes) ``workdir`` as ``percausal train --config CONFIG --workdir WORKDIR OVERRIDES`` does, in
    this process (``progress``: with its progress bar); returns the wall time. Raises :class:`Preempted` (naming
    ``what``, the step reached and how to resume) when the run stopped before its budget."""
    from percausal_jax.config import RunConfig, load_config
    from percausal_jax.training.loop import train

    rc = RunConfig.from_config(load_config(str(config), [str(o) for o in overrides]), where=str(config))
    t = time.perf_counter()
    last = train(rc, workdir, progress=progress)
    if stopped_early(last, rc.train.steps):
        applied = int(last["step"]) - int(last.get("nan_skips", 0))
        raise Preempted(f"{what}: training was preempted after {applied} of {rc.train.steps} steps (checkpoint saved "
                        f"in {workdir}); nothing after it ran: re-run the same command to resume")
    return time.perf_counter() - t


def run_command(argv: Sequence, what: str | None = None) -> float:
    """Runs ``percausal ARGV`` in this process (its output and error lines as on the command line); returns the wall
    time. A failure (its own error line printed) raises a :class:`UserError` naming the subcommand, after ``what``
    (the cell or step it belonged to) when given."""
    from percausal_jax import cli

    argv = [str(a) for a in argv]
    t = time.perf_counter()
    rc = cli.main(argv)
    if rc:
        raise UserError(f"{what}: `percausal {argv[0]}` failed (exit {rc})" if what is not None else
                        f"`percausal {argv[0]}` failed with exit code {rc}")
    return time.perf_counter() - t


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a trained cell is evaluated: ``percausal eval``'s budget and reading flags."""

    limit: int  # records generated for (0: all)
    max_new_tokens: int
    batch_size: int | None = None  # None: eval's default
    strict: bool = False  # a record with an empty required field is an error
    progress: bool = True  # eval's progress bar
    extra: tuple = ()  # further eval flags (``--contrast 1``)

    def argv(self, workdir, data, out) -> list:
        from percausal_jax.evaluation.wordnet import available

        return ["eval", "--workdir", workdir, "--data", data, "--out", out,
                *([] if self.progress else ["--no-progress"]),
                "--limit", self.limit, "--max-new-tokens", self.max_new_tokens,
                *([] if self.batch_size is None else ["--batch-size", self.batch_size]), *self.extra,
                *([] if available() else ["--no-meteor"]), *(["--strict"] if self.strict else [])]


def evaluate(workdir, data, out: str | os.PathLike, decoding: Decoding, what: str | None = None) -> tuple[dict, float]:
    """Generates for ``data`` with the run in ``workdir`` and scores the generations, as ``percausal eval`` (METEOR
    when WordNet is installed); writes ``out`` (predictions) and ``out`` with ``.metrics.json``. Returns the metrics
    and the wall time."""
    from percausal_jax import storage

    seconds = run_command(decoding.argv(workdir, data, out), what)
    return json.loads(storage.path(out).with_suffix(".metrics.json").read_text()), seconds
