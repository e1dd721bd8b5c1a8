"""Multi-host set-up: ``jax.distributed.initialize`` from flags, ``JAX_*`` variables or JAX's own cluster detection,
a common batch shape across processes, and preemption (SIGTERM / the preemption sync point) detection.

All processes run the same program; each reads only its data shard; process 0 writes logs and metrics.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np

from percausal_jax.data.pairing import PairedBatch, pad_batch, shape_of

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _detected_cluster():
    """The cluster environment ``jax.distributed.initialize()`` with no arguments would use here, or None.

    The same walk as JAX's ``ClusterEnv.auto_detect_unset_distributed_params``: the registered ``ClusterEnv``
    subclasses in registration order, skipping the opt-in-only ones, first ``is_env_present()`` wins. JAX exposes
    no public API for this, hence ``jax._src.clusters``."""
    from jax._src import clusters

    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def _cluster_process_count(env) -> int:
    try:
        return int(env.get_process_count())
    except Exception as e:  # e.g. a Kubernetes pod that is not an indexed Job, or no pod-read permission
        raise RuntimeError(
            f"JAX detected a {env.__name__} environment but could not read its process count ({e!r}). Give "
            "--coordinator/--num-processes/--process-id (or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
            "JAX_PROCESS_ID), or --num-processes 1 (JAX_NUM_PROCESSES=1) for a single-process run.") from e


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts multi-process JAX (``jax.distributed``) when this is a multi-process run; otherwise does nothing.
    Must run before anything touches a device. CPU processes use gloo collectives.

    In order:

    1. Explicit: the arguments (``--coordinator`` / ``--num-processes`` / ``--process-id``), else the variables
       ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``. A number of processes of 1 without
       a coordinator means "single process": nothing is detected or started (the way to opt out on a cluster).
       Otherwise any explicit value starts ``jax.distributed.initialize`` with those values; JAX fills in the ones
       not given from its cluster detection (and raises if it detects nothing and the coordinator is missing).
    2. JAX's own cluster detection, the list ``jax.distributed.initialize()`` walks when called with no arguments
       (``jax._src.clusters.ClusterEnv``), checked in this order in JAX 0.10.2 (constraints.txt), first match wins:

       - ``OmpiCluster`` (Open MPI ``mpirun``): ``OMPI_MCA_orte_hnp_uri`` is set; processes from
         ``OMPI_COMM_WORLD_SIZE`` / ``_RANK``; coordinator = the launcher's IP, port from the ORTE job id.
       - ``SlurmCluster``: ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID`` and
         ``SLURM_LOCALID`` are all set (i.e. inside an ``srun`` step); processes = ``SLURM_NTASKS``, id =
         ``SLURM_PROCID``; coordinator = the first host of ``SLURM_STEP_NODELIST``, port
         ``61440 + SLURM_JOB_ID % 4096``. JAX also restricts each process to the GPU ``SLURM_LOCALID`` unless
         ``JAX_LOCAL_DEVICE_IDS`` is set (launch/slurm_gpu.sbatch sets it: one process per node, all its GPUs).
         A batch script's own shell has no ``SLURM_STEP_NODELIST`` (checked on Slurm 22.05): a process started
         there without ``srun`` is single-process even when the job has several tasks.
       - ``BaseTpuCluster``: never present (abstract base of the two TPU ones).
       - ``GceTpuCluster`` (TPU VM): JAX found TPU chips and libtpu at import, ``TPU_SKIP_MDS_QUERY`` is unset and
         the GCE metadata server answers ``agent-worker-number``; hosts from the metadata
         ``worker-network-endpoints`` (times ``MEGASCALE_NUM_SLICES``), port 8482.
       - ``GkeTpuCluster``: on a TPU VM with ``TPU_PROCESS_ADDRESSES`` or ``TPU_WORKER_HOSTNAMES`` set; processes =
         the hosts listed (times ``MEGASCALE_NUM_SLICES``), id from ``TPU_WORKER_ID``, port 8482.
       - ``K8sCluster``: ``KUBERNETES_SERVICE_HOST`` is set and the ``kubernetes`` package imports (without it JAX
         warns and skips it); processes = the Job's ``parallelism`` read from the Kubernetes API, id =
         ``JOB_COMPLETION_INDEX``, port 55527.
       - ``Mpi4pyCluster`` is registered too but opt-in only (``cluster_detection_method="mpi4py"``): never
         auto-detected, and not used here.

       ``JAX_COORDINATOR_PORT`` overrides the detected port. When one of these is present, its process count is
       read, and only if it is above 1 is ``jax.distributed.initialize()`` called with no arguments, so JAX
       itself derives everything. Several of them are present for single-process runs too: a SLURM step with
       one task (``srun -n1``), a single-host TPU VM, an ``mpirun -np 1``, any pod of a 1-wide
       Kubernetes Job. Such runs start no coordinator service and connect to nothing, like a plain machine.
       A detected environment whose process count cannot be read (e.g. a Kubernetes pod outside an indexed Job)
       is an error that names the explicit flags and the single-process opt-out.
    3. Nothing detected: a plain single-process run."""
    coordinator = coordinator or os.environ.get(_ENV[0]) or None
    if num_processes is None and os.environ.get(_ENV[1]):
        num_processes = int(os.environ[_ENV[1]])
    if process_id is None and os.environ.get(_ENV[2]):
        process_id = int(os.environ[_ENV[2]])
    if coordinator is None and num_processes == 1:
        return  # explicitly single-process
    if coordinator is None and num_processes is None and process_id is None:
        env = _detected_cluster()
        if env is None or _cluster_process_count(env) <= 1:
            return
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


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

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
