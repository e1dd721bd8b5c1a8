"""The local copy of a remote directory is the remote listing: files deleted remotely leave the cache, a file is
reused only at the object version it was fetched at, and concurrent processes share one copy safely. Against the
loopback GCS server; remote changes are made both through this process's gcsfs (an export) and straight through the
server's JSON API (as another machine would, past any listing this process cached)."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from percausal_jax import storage

ROOT = Path(__file__).resolve().parents[2]


def _put(gcs, url: str, data: bytes) -> None:
    """Writes one object through the server's JSON API (not through this process's gcsfs)."""
    bucket, name = url.removeprefix("gs://").split("/", 1)
    req = urllib.request.Request(f"{gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name)}",
                                 data=data, method="POST", headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req, timeout=10).read()


def _delete(gcs, url: str) -> None:
    bucket, name = url.removeprefix("gs://").split("/", 1)
    req = urllib.request.Request(f"{gcs.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}", method="DELETE")
    urllib.request.urlopen(req, timeout=10).read()


def _files(d: Path) -> list[str]:
    """Every file under ``d``, bookkeeping (version stamps) included."""
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCAUSAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sharded_export_replaced_by_a_single_file_loads_the_new_weights(gcs, cache):
    from flax import nnx

    from percausal_jax.hf.checkpoint import load_pretrained, save_pretrained
    from percausal_jax.models import CausalLM, ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    url = gcs.bucket() + "/m"
    old, new = CausalLM(cfg, rngs=nnx.Rngs(0)), CausalLM(cfg, rngs=nnx.Rngs(1))
    embed = lambda m: np.asarray(m.model.embed_tokens.embedding[...])  # noqa: E731

    save_pretrained(old, url, max_shard_bytes=20_000)  # sharded: model-0000x-of-0000y + index
    names = {p.name for p in storage.path(url).iterdir()}
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    np.testing.assert_array_equal(embed(load_pretrained(url)), embed(old))
    local = storage.local_dir(url)
    assert "model.safetensors.index.json" in _files(local)

    save_pretrained(new, url)  # the re-export: one model.safetensors, the shards and index deleted remotely
    assert not any(n.startswith("model-") or n.endswith(".index.json") for n in
                   (p.name for p in storage.path(url).iterdir()))
    loaded = load_pretrained(url)
    np.testing.assert_array_equal(embed(loaded), embed(new))
    assert not np.array_equal(embed(new), embed(old))
    kept = _files(local)
    assert "model.safetensors" in kept and not any("model-0" in f or "index.json" in f for f in kept), kept
    remote = sorted(p.name for p in storage.path(url).iterdir())
    assert [f for f in kept if not f.startswith(".")] == remote
    assert sorted(f for f in kept if f.startswith(".")) == sorted(f".{n}.version" for n in remote)


def test_changes_made_by_another_client_are_seen(gcs, cache):
    url = gcs.bucket() + "/d"
    for name, data in {"config.json": b"{}", "w.bin": b"old!", "sub/x.bin": b"x", "tok.txt": b"t1"}.items():
        _put(gcs, f"{url}/{name}", data)
    local = storage.local_dir(url)
    assert _files(local) == [".config.json.version", ".tok.txt.version", ".w.bin.version", "config.json",
                             "sub/.x.bin.version", "sub/x.bin", "tok.txt", "w.bin"]
    held = open(local / "sub" / "x.bin", "rb")  # a reader that opened a file before the refresh

    _delete(gcs, f"{url}/sub/x.bin")
    _put(gcs, f"{url}/w.bin", b"new!")  # same size, new generation
    _put(gcs, f"{url}/tok.txt", b"t2")
    storage.local_dir(url, include=("*.json", "*.bin"))
    # deleted remotely: gone (its directory too); rewritten: fetched again; rewritten but not included: dropped,
    # never served at the old version
    assert _files(local) == [".config.json.version", ".w.bin.version", "config.json", "w.bin"]
    assert (local / "w.bin").read_bytes() == b"new!"
    assert held.read() == b"x"  # what it had open stays readable
    held.close()
    storage.local_dir(url)
    assert (local / "tok.txt").read_bytes() == b"t2"

    mtime = (local / "w.bin").stat().st_mtime_ns
    time.sleep(0.01)
    storage.local_dir(url)
    assert (local / "w.bin").stat().st_mtime_ns == mtime  # same generation: reused, not fetched again
    _put(gcs, f"{url}/w.bin", b"new!")  # same bytes, new generation: fetched again
    storage.local_dir(url)
    assert (local / "w.bin").stat().st_mtime_ns != mtime

    _put(gcs, f"{url}/f.txt", b"one")
    assert storage.local_file(f"{url}/f.txt").read_bytes() == b"one"
    _put(gcs, f"{url}/f.txt", b"two")
    assert storage.local_file(f"{url}/f.txt").read_bytes() == b"two"


_WORKER = """
import os, sys, time, types
from pathlib import Path
pkg = types.ModuleType("percausal_jax")  # the storage module alone: not the package's JAX imports
pkg.__path__ = [sys.argv[3]]
sys.modules["percausal_jax"] = pkg
from percausal_jax import storage
import gcsfs

fetched = []
real = storage._fetch
def counting(fs, rpath, dest, version):
    if not storage._is_current(dest, version):
        fetched.append(dest.name)
    real(fs, rpath, dest, version)
storage._fetch = counting
barrier = Path(sys.argv[2])
(barrier / f"ready-{os.getpid()}").touch()
while not (barrier / "go").exists():
    time.sleep(0.005)
local = storage.local_dir(sys.argv[1])
print(len(fetched), local)
"""


def test_processes_refreshing_one_copy_at_once_fetch_each_file_once(gcs, cache, tmp_path):
    url = gcs.bucket() + "/shared"
    rng = np.random.default_rng(0)
    payload = {f"w{i}.bin": rng.bytes(1 << 20) for i in range(4)}
    for name, data in {**payload, "config.json": b"{}"}.items():
        _put(gcs, f"{url}/{name}", data)
    stale = storage._cache_path(url)
    stale.mkdir(parents=True)
    (stale / "model.safetensors.index.json").write_text("{}")  # left by an older export: must go
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, url, str(barrier), str(ROOT / "percausal_jax")],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < len(procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    (barrier / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    counts = [int(out.split()[0]) for out, _ in results]
    assert sorted(counts) == [0, 0, 5]  # one process fetched; the others waited, then found every file current
    local = Path(results[0][0].split()[1])
    assert [f for f in _files(local) if not f.startswith(".")] == sorted([*payload, "config.json"])
    assert all((local / n).read_bytes() == d for n, d in payload.items())
    assert not list(local.glob(".*.part-*"))
    assert json.loads((local / "config.json").read_text()) == {}
