"""Paths, local copies and never-half-written outputs, on local disk and on the loopback GCS server."""

import pathlib

import pytest

from percausal_jax import atomic, storage
from percausal_jax.errors import UserError


def test_path_keeps_urls_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert str(storage.path("gs://b/x/y")) == "gs://b/x/y"
    assert str(storage.path("~/a")) == str(tmp_path / "a")
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///x")


def test_write_text_and_local_file_round_trip(gcs):
    url = gcs.bucket() + "/dir/sub/file.txt"
    atomic.write_text(url, "hello")
    assert storage.path(url).read_text() == "hello"
    local = storage.local_file(url)
    assert local.read_text() == "hello" and not storage.is_remote(local)
    with pytest.raises(UserError, match="no such file"):
        storage.local_file(url + ".missing")


def test_atomic_dir_uploads_markers_last_and_replaces_stale_files(gcs, tmp_path, monkeypatch):
    bucket = gcs.bucket()
    out = bucket + "/export"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w1")
        (tmp / "old_only.txt").write_text("stale")
        (tmp / "config.json").write_text("{}")
    assert gcs.objects(bucket) == ["export/config.json", "export/model.safetensors", "export/old_only.txt"]

    order = []
    real_upload = atomic.upload_file

    def recording_upload(src, dest):
        order.append((pathlib.Path(src).name, sorted(gcs.objects(bucket))))
        real_upload(src, dest)

    monkeypatch.setattr(atomic, "upload_file", recording_upload)
    with atomic.atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w2")
        (tmp / "config.json").write_text('{"v": 2}')
    # the old marker was gone before the payload changed; the new marker went up last, after the stale file left
    assert order[0] == ("model.safetensors", ["export/model.safetensors", "export/old_only.txt"])
    assert order[-1] == ("config.json", ["export/model.safetensors"])
    assert gcs.objects(bucket) == ["export/config.json", "export/model.safetensors"]
    assert storage.path(out + "/model.safetensors").read_bytes() == b"w2"


def test_atomic_dir_failure_leaves_no_loadable_remote_dir(gcs):
    bucket = gcs.bucket()
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(bucket + "/export") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed mid-export")
    assert gcs.objects(bucket) == []


def test_atomic_file_local_and_remote(gcs, tmp_path):
    for target in (tmp_path / "a" / "out.jsonl", gcs.bucket() + "/out.jsonl"):
        with pytest.raises(RuntimeError):
            with atomic.atomic_file(target) as f:
                f.write("partial\n")
                raise RuntimeError
        assert not storage.path(target).exists()
        with atomic.atomic_file(target) as f:
            f.write("one\ntwo\n")
        assert storage.path(target).read_text() == "one\ntwo\n"


def test_local_dir_copies_a_remote_directory_once(gcs, tmp_path, monkeypatch):
    from tests.gcs import upload_tree

    monkeypatch.setenv("PERCAUSAL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "nested" / "x.bin").write_bytes(b"123")
    url = upload_tree(src, gcs.bucket() + "/model")
    local = storage.local_dir(url)
    assert (local / "config.json").read_text() == "{}" and (local / "nested" / "x.bin").read_bytes() == b"123"
    assert local.is_relative_to(tmp_path / "cache")
    only = storage.local_dir(url, include=("*.json",))
    assert only == local
    # a rewrite of the same size (a new object generation) is fetched again, not served from the cache
    (src / "config.json").write_text("[]")
    upload_tree(src, url)
    assert (storage.local_dir(url) / "config.json").read_text() == "[]"


def test_mirror_uploads_changed_files_whole(gcs):
    bucket = gcs.bucket()
    m = atomic.Mirror(bucket + "/run", pull=("metrics.jsonl",))
    (m.local / "metrics.jsonl").write_text('{"step": 1}\n')
    m.sync()
    assert storage.path(bucket + "/run/metrics.jsonl").read_text() == '{"step": 1}\n'
    with open(m.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    m.close()
    again = atomic.Mirror(bucket + "/run", pull=("metrics.jsonl",))
    assert (again.local / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    again.close()


def test_hub_id_resolves_from_the_offline_cache(tmp_path, monkeypatch):
    """A hub id is looked up with huggingface_hub; offline, a snapshot in the local hub cache is used."""
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    r = storage.resolve_hf_dir("org/tiny", what="model")
    assert r.local == snap and r.revision == "a" * 40 and r.name == "org/tiny"
    with pytest.raises(UserError, match="org/absent: not a local model, and the hub download failed"):
        storage.resolve_hf_dir("org/absent", what="model")
