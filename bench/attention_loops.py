"""The blocked attention kernel as loops vs as Python-unrolled tiles: compile time, program size and run time.

The unrolled kernel is the one of commit 387582c (``percausal_jax/models/layers.py`` there), read from git history;
the looped one is :mod:`percausal_jax.models.blocked_attention`. Both differentiate ``sum(blocked_attention(q, k, v))``
at SmolLM2's heads (H = 9, K = 3, Dh = 64, B = 1, fp32, one segment).

    taskset -c 1 .venv/bin/python bench/attention_loops.py compile new 8192   # one compile per process
    taskset -c 1 .venv/bin/python bench/attention_loops.py run 320,576,1088,2112   # both, alternated per rep

``compile IMPL L`` prints lower / compile seconds, the lowered program's size and the process's peak RSS;
``run`` prints the median forward + backward time of each kernel over ``REPS`` (default 9) alternated repetitions.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from common import REPO

UNROLLED_AT = "387582c"
B, H, K, DH = 1, 9, 3, 64


def _kernels() -> dict:
    from percausal_jax.models.blocked_attention import blocked_attention

    source = subprocess.run(["git", "show", f"{UNROLLED_AT}:percausal_jax/models/layers.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="unrolled_"), "unrolled_layers.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("unrolled_layers", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    return {"unrolled": old.blocked_attention, "looped": blocked_attention}


def _grad_fn(kernel, L: int):
    import jax
    import jax.numpy as jnp

    seg = jnp.ones((B, L), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    loss = lambda q, k, v: jnp.sum(kernel(q, k, v, seg, pos, scale=DH ** -0.5))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _inputs(L: int):
    import jax.numpy as jnp
    import numpy as np

    rs = np.random.RandomState(0)
    return [jnp.asarray(rs.randn(B, L, n, DH), jnp.float32) for n in (H, K, K)]


def main() -> int:
    import jax

    mode = sys.argv[1]
    kernels = _kernels()
    if mode == "compile":
        name, L = sys.argv[2], int(sys.argv[3])
        name = {"old": "unrolled", "new": "looped"}.get(name, name)
        args = _inputs(L)
        t0 = time.perf_counter()
        lowered = _grad_fn(kernels[name], L).lower(*args)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{name} L={L}: lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s, program {len(lowered.as_text())} "
              f"chars, peak RSS {rss:.0f} MiB", flush=True)
        return 0
    reps = int(os.environ.get("REPS", 9))
    for L in map(int, sys.argv[2].split(",")):
        args = _inputs(L)
        fns = {name: _grad_fn(k, L) for name, k in kernels.items()}
        for fn in fns.values():  # compile and warm up
            jax.block_until_ready(fn(*args))
            jax.block_until_ready(fn(*args))
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - t)
        old, new = statistics.median(times["unrolled"]), statistics.median(times["looped"])
        print(f"L={L}: unrolled {old * 1e3:.1f} ms, looped {new * 1e3:.1f} ms, looped / unrolled {new / old:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
