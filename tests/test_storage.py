"""Object storage: one resolver for fsspec and pyarrow, the config's storage location, and the feature cache,
projection store and Ray Train checkpoints on S3 (moto's server on 127.0.0.1, tests/s3.py)."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest

from cil_platform.config import ExperimentConfig
from cil_platform.features import FeatureCache
from cil_platform.storage import StorageConfig, open_storage
from cil_platform.storage.store import ProjectionStore, VersionExistsError


# ---------------------------------------------------------------- the resolver

def test_local_paths_resolve_absolute_and_ray_train_keeps_its_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = open_storage("runs/demo/ray_train")
    assert storage.is_local and storage.path == str(tmp_path / "runs/demo/ray_train")
    assert isinstance(storage.arrow, pyarrow.fs.LocalFileSystem)
    assert storage.ray_train_storage() == {"storage_path": str(tmp_path / "runs/demo/ray_train"),
                                           "storage_filesystem": None}
    assert open_storage(f"file://{tmp_path}/x/").path == str(tmp_path / "x")
    with pytest.raises(ValueError, match="required"):
        open_storage("")


def test_s3_fsspec_and_pyarrow_views_share_one_client(s3_bucket):
    storage = s3_bucket.storage("area")
    assert not storage.is_local and storage.path == f"{s3_bucket.name}/area"
    with storage.arrow.open_output_stream(f"{storage.path}/by-arrow.bin") as out:
        out.write(b"written through pyarrow")
    storage.fs.pipe_file(f"{storage.path}/by-fsspec.bin", b"written through fsspec")
    assert storage.fs.cat_file(f"{storage.path}/by-arrow.bin") == b"written through pyarrow"
    with storage.arrow.open_input_stream(f"{storage.path}/by-fsspec.bin") as handle:
        assert handle.read() == b"written through fsspec"
    # Ray ships the pyarrow filesystem to its workers: it must survive pickling with endpoint and credentials
    shipped = pickle.loads(pickle.dumps(storage.arrow))
    with shipped.open_input_stream(f"{storage.path}/by-arrow.bin") as handle:
        assert handle.read() == b"written through pyarrow"
    train = storage.ray_train_storage()
    assert train["storage_path"] == storage.path and isinstance(train["storage_filesystem"], pyarrow.fs.PyFileSystem)


# ---------------------------------------------------------------- where a run's storage lives

def test_config_local_defaults_are_unchanged_and_storage_url_moves_the_run(monkeypatch):
    monkeypatch.delenv("GMM_CIL_CACHE", raising=False)
    monkeypatch.delenv("GMM_CIL_STORAGE_URL", raising=False)
    local = ExperimentConfig(name="x")
    assert (local.output_dir, local.store_url, local.run_url) == ("runs/x", "runs/x/store", "runs/x")
    assert local.features_url == os.path.expanduser("~/.cache/gmm-cil/features")
    assert local.storage == StorageConfig()

    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    remote = ExperimentConfig(name="x", storage={"url": "s3://bucket/prefix/", "options": options})
    assert remote.run_url == "s3://bucket/prefix/x"
    assert remote.store_url == "s3://bucket/prefix/x/store"
    assert remote.features_url == "s3://bucket/prefix/features"
    assert remote.output_dir == "runs/x"  # the report stays on the driver's disk
    assert "endpoint_url" not in repr(remote.storage)  # options may hold secrets
    explicit = ExperimentConfig(name="x", storage={"url": "s3://bucket"}, store_url="s3://other/store")
    assert explicit.store_url == "s3://other/store"
    with pytest.raises(ValueError, match="extra"):
        ExperimentConfig(storage={"url": "s3://b", "endpoint": "x"})

    monkeypatch.setenv("GMM_CIL_STORAGE_URL", "s3://cluster-bucket/runs")
    assert ExperimentConfig(name="y").store_url == "s3://cluster-bucket/runs/y/store"


# ---------------------------------------------------------------- feature cache and projection store on S3

def test_feature_cache_round_trip_on_s3(s3_bucket):
    url = s3_bucket.url("features")
    keys = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(5)]
    features = np.random.default_rng(0).standard_normal((5, 4, 8)).astype(np.float32)
    cache = FeatureCache(url, "encoder-a", s3_bucket.options)
    assert cache.load_all() == {}
    cache.add(keys[:3], features[:3])
    cache.add(keys[3:], features[3:])

    loaded = FeatureCache(url, "encoder-a", s3_bucket.options).load_all()  # a fresh reader
    assert sorted(loaded) == sorted(keys)
    for key, row in zip(keys, features):
        assert loaded[key].dtype == np.float16
        np.testing.assert_array_equal(loaded[key], row.astype(np.float16))
    assert FeatureCache(url, "encoder-b", s3_bucket.options).load_all() == {}  # another encoder: a miss
    objects = s3_bucket.keys("features")
    assert len(objects) == 2 and all(o.startswith(cache.dir.rsplit("/", 1)[-1] + "/") for o in objects)
    assert [o.rsplit("/", 1)[-1] for o in objects] == [p.rsplit("/", 1)[-1] for p in cache._shards()]
    assert all(o.endswith(".safetensors") for o in objects)  # a single PUT each: no temp objects left


def test_projection_store_on_s3_publish_load_latest(s3_bucket):
    url = s3_bucket.url("run", "store")
    writer, reader = ProjectionStore(url, s3_bucket.options), ProjectionStore(url, s3_bucket.options)
    assert reader.versions() == [] and reader.latest() is None
    writer.publish(0, b"w0" * 100, ["cat", "dog"], "stack")
    assert reader.latest().version == 0  # a reader sees a new version at once (no stale listing)
    writer.publish(1, b"w1" * 200, ["cat", "dog", "hot dog"], "stack", metrics={"accuracy": 0.5},
                   extra={"replay": "pseudo"})
    assert reader.versions() == [0, 1]
    manifest, weights = reader.load(1)
    assert weights == b"w1" * 200 and manifest.sha256 == hashlib.sha256(weights).hexdigest()
    assert manifest.seen_classes == ["cat", "dog", "hot dog"] and manifest.metrics == {"accuracy": 0.5}
    assert s3_bucket.keys("run", "store") == ["v0000/manifest.json", "v0000/projection.safetensors",
                                              "v0001/manifest.json", "v0001/projection.safetensors"]


def test_projection_store_on_s3_writes_the_manifest_last(s3_bucket, monkeypatch):
    """The manifest is the commit marker: a writer that dies before it leaves nothing a reader can see."""
    store = ProjectionStore(s3_bucket.url("store"), s3_bucket.options)
    writes, fail_on = [], {"path": None}
    real_pipe = store.fs.pipe_file

    def pipe_file(path, data, **kwargs):
        if path == fail_on["path"]:
            raise ConnectionError("the writer died")
        writes.append(path.rsplit("/", 2)[-2:])
        return real_pipe(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)
    store.publish(0, b"zero", ["a"], "stack")
    assert writes == [["v0000", "projection.safetensors"], ["v0000", "manifest.json"]]

    fail_on["path"] = f"{store.root}/v0001/manifest.json"
    with pytest.raises(ConnectionError):
        store.publish(1, b"one", ["a", "b"], "stack")
    reader = ProjectionStore(s3_bucket.url("store"), s3_bucket.options)
    assert "v0001/projection.safetensors" in s3_bucket.keys("store")  # the weights got there ...
    assert reader.versions() == [0] and reader.latest().version == 0  # ... but version 1 does not exist
    with pytest.raises(FileNotFoundError):
        reader.load(1)

    # version 1's weights are there but uncommitted: another publisher of other bytes is refused, nothing changes;
    # the one that died, retried with the same bytes, completes it
    fail_on["path"] = None
    with pytest.raises(VersionExistsError, match="being written by another publisher"):
        store.publish(1, b"one, other bytes", ["a", "b"], "stack")
    assert reader.versions() == [0]
    store.publish(1, b"one", ["a", "b"], "stack")
    assert reader.load(1)[1] == b"one"
    with pytest.raises(VersionExistsError, match="already published"):
        store.publish(0, b"zero, again", ["a"], "stack")
    assert reader.load(0)[1] == b"zero"


def test_s3_create_only_uses_a_conditional_put(s3_bucket, monkeypatch):
    """If-None-Match: * makes the server refuse an existing key even when the existence check missed it (the
    race the check alone cannot close)."""
    from cil_platform.storage.atomic import create_only_bytes

    fs, path = s3_bucket.storage().fs, f"{s3_bucket.name}/key"
    create_only_bytes(fs, path, b"first")
    monkeypatch.setattr(fs, "exists", lambda *args, **kwargs: False)  # another writer's PUT landed after the check
    with pytest.raises(FileExistsError):
        create_only_bytes(fs, path, b"second")
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"first"


def test_concurrent_publishers_on_s3_one_wins(s3_bucket):
    """Threads publishing version 0 with different bytes at once: one version, one publisher's bytes, intact."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    url, barrier = s3_bucket.url("store"), Barrier(4)

    def publish(i: int) -> str:
        store = ProjectionStore(url, s3_bucket.options)
        barrier.wait()
        try:
            store.publish(0, f"weights {i}".encode() * 100, ["a"], "stack")
            return "published"
        except VersionExistsError:
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(publish, range(4)))
    assert sorted(results) == ["published", "refused", "refused", "refused"], results
    manifest, weights = ProjectionStore(url, s3_bucket.options).load(0)
    assert weights == f"weights {results.index('published')}".encode() * 100
