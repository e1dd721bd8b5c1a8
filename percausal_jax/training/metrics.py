"""What a training run writes about itself: per-step records (means per response token, host memory) into
``WORKDIR/metrics.jsonl`` and TensorBoard events, by process 0."""

from __future__ import annotations

import json
import math
import os
import sys

import jax

from percausal_jax import atomic


def host_rss_mib() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def per_token_metrics(m: dict) -> dict:
    """Sums → means over response tokens (``*_sum`` → ``*_mean``, ``*_count`` → ``frac_*``)."""
    n = max(float(m.get("tokens", 0.0)), 1.0)
    out = {}
    for k, v in m.items():
        v = float(v)
        if k.endswith("_sum"):
            out[k[:-4] + "_mean"] = v / n
        elif k.endswith("_count"):
            out["frac_" + k[:-6]] = v / n
        else:
            out[k] = v
    return out


class MetricsWriter:
    """``WORKDIR/metrics.jsonl`` (one line per logged step) and TensorBoard events under ``WORKDIR/tensorboard``,
    written by process 0 only. Both are appended to local files (:class:`atomic.Mirror`: the workdir itself, or
    for a ``gs://`` workdir a staging copy uploaded whole at :meth:`flush`: at every checkpoint, at the end, and
    at most every 30 s while logging). ``resume_step``: lines of later steps (logged after the checkpoint a resumed
    run restarts from) are dropped, so every step appears once."""

    def __init__(self, workdir, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        self.mirror = atomic.Mirror(workdir, pull=("metrics.jsonl",))
        self.path = self.mirror.local / "metrics.jsonl"
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            keep = [line for line in lines
                    if line.strip() and (resume_step is not None and json.loads(line).get("step", 0) <= resume_step)]
            if keep != lines:  # rewritten whole (a temporary file renamed over it): never seen half-rewritten
                atomic.write_text(self.path, "".join(keep))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.mirror.local / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        if not self.enabled:
            return
        if self.tb is not None and (force or self.mirror.remote):
            self.tb.flush()
        self.mirror.sync(force=force)

    def close(self, upload: bool = True) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        self.mirror.close(upload)
