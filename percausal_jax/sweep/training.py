"""Training driven in-process by a command that goes on afterwards (``percausal sweep``'s cells, ``percausal demo``).

``percausal train`` on SIGTERM saves a checkpoint and returns early (exit 0: a scheduler re-runs it). A command that
drives training and then evaluates, compares or caches the result must not go on with that partly trained model:
:func:`train_to_end` raises :class:`Preempted` when the loop returned before ``train.steps`` applied updates, and the
CLI turns it into one line (how to resume) and exit code :attr:`Preempted.exit_code`. Re-running the same command
resumes the run from its checkpoint; a run that already finished trains no further step.
"""

from __future__ import annotations

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
