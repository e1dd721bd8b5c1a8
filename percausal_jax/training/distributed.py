"""Multi-host set-up: ``jax.distributed.initialize`` from flags or standard environment variables, a common batch
shape across processes, and preemption (SIGTERM / the preemption sync point) detection.

All processes run the same program; each reads only its data shard; process 0 writes logs and metrics.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np

from percausal_jax.data.pairing import PairedBatch, pad_batch, shape_of

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Initializes multi-process JAX when asked to (flags, ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``, or a TPU pod / SLURM job that JAX detects itself); a plain single-process run otherwise.
    Must run before anything touches a device. CPU processes use gloo collectives."""
    coordinator = coordinator or os.environ.get(_ENV[0])
    if num_processes is None and os.environ.get(_ENV[1]):
        num_processes = int(os.environ[_ENV[1]])
    if process_id is None and os.environ.get(_ENV[2]):
        process_id = int(os.environ[_ENV[2]])
    auto = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")) or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if coordinator is None and not auto:
        return
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def common_shape(batch: PairedBatch) -> PairedBatch:
    """Pads this process's batch to the largest (Lp, Lc, R) over all processes (identical global shapes)."""
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    shapes = multihost_utils.process_allgather(np.asarray(shape_of(batch), np.int32))
    return pad_batch(batch, *(int(x) for x in np.max(shapes.reshape(-1, 3), axis=0)))


class Preemption:
    """Set by SIGTERM (and, on multi-host, by JAX's preemption sync point): the loop saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:  # no preemption sync manager (not initialized by this JAX runtime)
                pass
            # a SIGTERM on any process stops all of them at the same step
            return bool(np.max(multihost_utils.process_allgather(np.asarray([self.requested], np.int32))))
        return self.requested

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
