"""Start-up by JAX's own cluster detection (``distributed.initialize``), and the SLURM launch script.

- A 2-task SLURM step (only the SLURM_* variables an ``srun`` step sets, no coordinator flags) trains as one
  2-process run with the same per-step losses as the flag-driven 2-process run.
- A plain machine, a 1-task SLURM step and an explicit ``JAX_NUM_PROCESSES=1`` start nothing (no coordinator
  service, no connection).
- ``launch/slurm_gpu.sbatch`` asks for SIGTERM to the tasks (``--signal=TERM@120``, no ``B:``) and gives each
  one-process-per-node task all its node's GPUs (JAX_LOCAL_DEVICE_IDS). The signal itself was checked once on a
  local Slurm 22.05 (not in CI: it needs slurmctld/slurmd): both tasks of a 1-node, 2-task job got SIGTERM 128 s
  before a 4-minute limit and the job ended COMPLETED; with ``B:TERM@120`` only the batch shell was signalled.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from percausal_jax.training import distributed
from tests.training.common import train_args
from tests.training.test_multiprocess import REPO, _env, _finish, _free_port, _losses, _run

SBATCH = REPO / "launch" / "slurm_gpu.sbatch"
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                     "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST")


def _clean(env: dict) -> dict:
    """``env`` without any variable a cluster detection or our explicit start-up reads."""
    return {k: v for k, v in env.items() if not k.startswith(_CLUSTER_PREFIXES)}


def _slurm(job_id: int, ntasks: int, procid: int) -> dict:
    """The variables an ``srun`` step on one node sets that JAX's SlurmCluster reads (and a few neighbours)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
            "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0",
            "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid)}


def _port_free(port: int) -> bool:
    """Free on IPv4 loopback and on [::] (where JAX's coordinator service binds by default)."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family) as s:
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET6 and not socket.has_ipv6:
                continue
            if e.errno in (97, 99):  # no IPv6 on this machine: address family / address not available
                continue
            return False
    return True


def _slurm_job_id() -> int:
    """A job id whose JAX coordinator port (61440 + id % 4096, jax/_src/clusters/slurm_cluster.py) is free now."""
    base = 700_000 + os.getpid() % 4096
    for job_id in range(base, base + 4096, 37):
        if _port_free(61440 + job_id % 4096):
            return job_id
    pytest.skip("no free port in 61440-65535 for a SLURM coordinator")


# --- JAX's detection list, as documented in distributed.initialize -----------------------------------------------

def test_jax_cluster_detection_list_is_the_documented_one():
    from jax._src import clusters

    auto = [env.__name__ for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]
    opt_in = [env.__name__ for env in clusters.ClusterEnv._cluster_types if env.opt_in_only_method]
    # a different JAX: update the list in distributed.initialize's docstring, then this
    assert (auto, opt_in) == (["OmpiCluster", "SlurmCluster", "BaseTpuCluster", "GceTpuCluster", "GkeTpuCluster",
                               "K8sCluster"], ["Mpi4pyCluster"]), jax.__version__
    for name in auto + opt_in:
        assert f"``{name}``" in distributed.initialize.__doc__


# --- the decision, in this process, with jax.distributed.initialize recorded instead of run ------------------------

@pytest.fixture
def calls(monkeypatch):
    for k in list(os.environ):
        if k.startswith(_CLUSTER_PREFIXES):
            monkeypatch.delenv(k)
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    before = jax.config.jax_cpu_collectives_implementation
    yield seen
    jax.config.update("jax_cpu_collectives_implementation", before)


NONE = {"coordinator_address": None, "num_processes": None, "process_id": None}


@pytest.mark.parametrize("env, args, expected", [
    ({}, (), []),                                                               # plain machine
    (_slurm(12345, 1, 0), (), []),                                              # srun -n1
    (_slurm(12345, 2, 1), (), [NONE]),                                          # srun -n2: JAX derives everything
    ({**_slurm(12345, 2, 1), "JAX_NUM_PROCESSES": "1"}, (), []),                # explicit single-process opt-out
    ({k: v for k, v in _slurm(12345, 2, 1).items() if k != "SLURM_STEP_NODELIST"}, (), []),  # batch shell, no step
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "1",
      "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (), []),  # mpirun -np 1
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (), [NONE]),
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "2"}, (), []),       # not a TPU VM: GkeTpuCluster absent
    ({}, ("10.0.0.1:1234", 2, 1), [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, (),
     [{"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}]),
    (_slurm(12345, 4, 2), (None, 4, None), [{**NONE, "num_processes": 4}]),     # partial flags: JAX fills the rest
], ids=["plain", "slurm-1-task", "slurm-2-tasks", "slurm-opt-out", "slurm-batch-shell", "ompi-1", "ompi-4",
        "tpu-vars-off-tpu", "flags", "jax-env", "partial-flags"])
def test_initialize_decision(calls, monkeypatch, env, args, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    distributed.initialize(*args)
    assert calls == expected
    if expected:
        assert jax.config.jax_cpu_collectives_implementation == "gloo"


# --- real processes ----------------------------------------------------------------------------------------------

_PROBE = ("from percausal_jax.training.distributed import initialize; initialize(); import jax; "
          "print(jax.distributed.is_initialized(), jax.process_count(), jax.device_count())")


@pytest.mark.parametrize("on_slurm", [False, True], ids=["plain", "slurm-1-task"])
def test_single_process_starts_no_service(on_slurm):
    """A real process: jax.distributed not initialized (no coordinator service, no client), one process."""
    env = {**_clean(_env(1)), **(_slurm(_slurm_job_id(), 1, 0) if on_slurm else {})}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "1", "1"], out.stdout + out.stderr[-2000:]


@pytest.mark.slow
def test_slurm_step_equals_flag_driven_two_processes(setup, tmp_path):
    """Two real processes with only a 2-task SLURM step's variables (no --coordinator) = the flag-driven run."""
    model_dir, data = setup
    extra = ["--config.data.eval=", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]
    argv = lambda work: train_args(model_dir, data, work, "perce", steps=3, extra=extra)  # noqa: E731
    port, job_id = _free_port(), _slurm_job_id()
    flags = [_run([*argv(tmp_path / "flags"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", i], _clean(_env(1))) for i in range(2)]
    slurm = [_run(argv(tmp_path / "slurm"), {**_clean(_env(1)), **_slurm(job_id, 2, i)}) for i in range(2)]
    for proc in (*flags, *slurm):
        _finish(proc)

    losses = _losses(tmp_path / "flags")
    assert len(losses) == 3
    assert _losses(tmp_path / "slurm") == losses  # exact
    iter_files = {p.name for p in (tmp_path / "slurm" / "checkpoints" / "3" / "iter").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= iter_files  # really one 2-process run


# --- launch/slurm_gpu.sbatch ---------------------------------------------------------------------------------------

def _directives(script: Path) -> list[str]:
    """The #SBATCH options as sbatch reads them: leading comment lines only, up to the first command."""
    out = []
    for line in script.read_text().splitlines()[1:]:
        if line.strip() and not line.lstrip().startswith("#"):
            break
        if m := re.match(r"#SBATCH\s+(\S+)", line):
            out.append(m.group(1))
    return out


def test_sbatch_signals_the_tasks_not_the_batch_shell():
    signal = [d for d in _directives(SBATCH) if d.startswith("--signal")]
    assert signal == ["--signal=TERM@120"]  # no "B:": Slurm signals the srun step's tasks, not this shell
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0


@pytest.mark.parametrize("slurm_env, expected", [({"SLURM_GPUS_ON_NODE": "4"}, "0,1,2,3"),
                                                 ({"SLURM_GPUS_PER_NODE": "h100:2"}, "0,1"),
                                                 ({}, "0,1,2,3,4,5,6,7"),
                                                 ({"JAX_LOCAL_DEVICE_IDS": "3"}, "3")])
def test_sbatch_gives_each_task_all_its_gpus(tmp_path, slurm_env, expected):
    """Runs the script with bash and a stand-in ``srun`` that reports what the task would get."""
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text('#!/usr/bin/env bash\necho "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"; echo "ARGS=$*"\n')
    srun.chmod(0o755)
    env = {**_clean(os.environ), **slurm_env, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(SBATCH), "cfg.py", "wd", "--config.x=1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"JAX_LOCAL_DEVICE_IDS={expected}\n" in out.stdout
    assert "ARGS=--kill-on-bad-exit=1 .venv/bin/percausal train --config cfg.py --workdir wd" in out.stdout
    assert out.stdout.rstrip().endswith("--config.x=1")
