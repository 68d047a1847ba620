import hashlib
import json
import os
import uuid

import fsspec
import pytest

from cil_platform.storage.store import CorruptEntryError, Manifest, ProjectionStore, VersionExistsError

WEIGHTS = [b"weights-of-task-0" * 10, b"weights-of-task-1" * 20, b"task-2"]


@pytest.fixture(params=["local", "file", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    if request.param == "file":
        yield f"file://{tmp_path}/store"
        return
    root = f"memory://store-{uuid.uuid4().hex}"  # the memory filesystem is process-wide
    yield root
    fs = fsspec.filesystem("memory")
    path = root.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _raw(url):
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def test_empty_store_has_no_versions(url):
    store = ProjectionStore(url)
    assert store.versions() == []
    assert store.latest() is None
    with pytest.raises(FileNotFoundError):
        store.manifest(0)


def test_publish_then_load_round_trips(url):
    store = ProjectionStore(url)
    for task, blob in enumerate(WEIGHTS):
        manifest = store.publish(task, blob, [f"class{i}" for i in range(task + 2)], "stack-abc",
                                 extra={"method": "replay"})
        assert manifest.version == manifest.task == task
    assert store.versions() == [0, 1, 2]
    latest = store.latest()
    assert latest.version == 2
    assert latest.seen_classes == ["class0", "class1", "class2", "class3"]
    manifest, blob = store.load(1)
    assert blob == WEIGHTS[1]
    assert manifest.sha256 == hashlib.sha256(WEIGHTS[1]).hexdigest()
    assert manifest.size == len(WEIGHTS[1])
    assert manifest.stack_fingerprint == "stack-abc"
    assert manifest.extra == {"method": "replay"}
    assert manifest.metrics == {}


def test_files_follow_the_documented_layout(url):
    ProjectionStore(url).publish(3, b"abc", ["a"], "fp")
    fs, root = _raw(url)
    assert fs.cat_file(f"{root}/v0003/projection.safetensors") == b"abc"
    data = json.loads(fs.cat_file(f"{root}/v0003/manifest.json"))
    assert data["version"] == 3 and data["task"] == 3 and data["size"] == 3
    assert data["created_at"].endswith("+00:00")


def test_weights_without_manifest_are_invisible(url):
    store = ProjectionStore(url)
    store.publish(0, WEIGHTS[0], ["a"], "fp")
    fs, root = _raw(url)
    # A writer that crashed after the weights but before the manifest (the commit marker).
    fs.makedirs(f"{root}/v0001", exist_ok=True)
    fs.pipe(f"{root}/v0001/projection.safetensors", WEIGHTS[1])
    assert store.versions() == [0]
    assert store.latest().version == 0
    with pytest.raises(FileNotFoundError):
        store.load(1)


@pytest.mark.parametrize("garbage", [b'{"version": 1, "task"', b"\x00\xff not json", b'{"version": 1}', b""])
def test_garbled_manifest_is_not_listed_and_is_reported_as_corrupt(url, garbage):
    store = ProjectionStore(url)
    store.publish(0, WEIGHTS[0], ["a"], "fp")
    store.publish(1, WEIGHTS[1], ["a", "b"], "fp")
    fs, root = _raw(url)
    fs.pipe(f"{root}/v0001/manifest.json", garbage)
    assert store.versions() == [0]
    assert store.latest().version == 0
    with pytest.raises(CorruptEntryError):
        store.manifest(1)


def test_manifest_in_the_wrong_directory_is_corrupt(url):
    store = ProjectionStore(url)
    store.publish(0, WEIGHTS[0], ["a"], "fp")
    fs, root = _raw(url)
    fs.makedirs(f"{root}/v0005", exist_ok=True)
    fs.pipe(f"{root}/v0005/manifest.json", fs.cat_file(f"{root}/v0000/manifest.json"))
    assert store.versions() == [0]
    with pytest.raises(CorruptEntryError, match="claims version 0"):
        store.manifest(5)


def test_corrupted_weights_raise(url):
    store = ProjectionStore(url)
    store.publish(0, WEIGHTS[0], ["a"], "fp")
    fs, root = _raw(url)
    path = f"{root}/v0000/projection.safetensors"
    fs.pipe(path, b"X" + WEIGHTS[0][1:])  # same size, different bytes
    with pytest.raises(CorruptEntryError, match="sha256"):
        store.load(0)
    fs.pipe(path, WEIGHTS[0][:-3])  # truncated
    with pytest.raises(CorruptEntryError, match="bytes"):
        store.load(0)
    fs.rm(path)
    with pytest.raises(CorruptEntryError, match="no projection.safetensors"):
        store.load(0)
    assert issubclass(CorruptEntryError, ValueError)


def test_a_version_arrives_complete_with_its_rule_metrics_and_class_statistics(url):
    """Published once, after evaluation: whoever sees the version sees its metrics and the statistics of its rule."""
    store = ProjectionStore(url)
    stats = b"class statistics bytes"
    published = store.publish(0, WEIGHTS[0], ["a", "b"], "fp", rule="trie+prior+prototypes", class_stats=stats,
                              metrics={"accuracy": 0.5})
    manifest, blob = store.load(0)
    assert manifest == published and blob == WEIGHTS[0]
    assert manifest.rule == "trie+prior+prototypes" and manifest.metrics == {"accuracy": 0.5}
    assert manifest.class_stats.sha256 == hashlib.sha256(stats).hexdigest()
    assert store.class_stats(manifest) == stats
    assert store.class_stats(store.publish(1, WEIGHTS[1], ["a"], "fp")) is None  # the trie rule needs none
    assert not hasattr(store, "annotate")  # nothing rewrites a published manifest in place


def test_damaged_class_statistics_are_refused(url):
    store = ProjectionStore(url)
    manifest = store.publish(0, WEIGHTS[0], ["a"], "fp", rule="trie+prior", class_stats=b"prior")
    path = f"{store.root}/v0000/class_stats.safetensors"
    store.fs.pipe(path, b"PRIOR")
    with pytest.raises(CorruptEntryError, match="class_stats.safetensors sha256"):
        store.class_stats(manifest)
    store.fs.rm(path)
    with pytest.raises(CorruptEntryError, match="no class_stats"):
        store.class_stats(manifest)


def test_a_published_version_is_immutable(url):
    store = ProjectionStore(url)
    first = store.publish(0, WEIGHTS[0], ["a"], "fp", metrics={"overall": 0.5})
    with pytest.raises(VersionExistsError, match="version 0 of .* was already published .* versions are immutable"):
        store.publish(0, WEIGHTS[2], ["a", "z"], "fp2")
    with pytest.raises(VersionExistsError):
        store.publish(0, WEIGHTS[0], ["a", "z"], "fp")  # same weights, other classes: other content
    assert store.load(0) == (first, WEIGHTS[0])
    # the same content again (a resumed driver that retrained deterministically) is the version that is there
    assert store.publish(0, WEIGHTS[0], ["a"], "fp", metrics={"overall": 0.6}) == first
    assert store.versions() == [0]


def test_a_torn_entry_of_other_bytes_is_never_completed_nor_overwritten(url):
    store = ProjectionStore(url)
    fs, root = _raw(url)
    fs.makedirs(f"{root}/v0000", exist_ok=True)
    fs.pipe(f"{root}/v0000/projection.safetensors", b"a publisher died after this")
    with pytest.raises(VersionExistsError, match="being written by another publisher.*remove"):
        store.publish(0, WEIGHTS[0], ["a"], "fp")
    assert fs.cat_file(f"{root}/v0000/projection.safetensors") == b"a publisher died after this"
    assert store.versions() == []
    store.publish(0, b"a publisher died after this", ["a"], "fp")  # its own retry completes it
    assert store.versions() == [0]


def test_stores_see_each_others_publishes(url):
    writer, reader = ProjectionStore(url), ProjectionStore(url)
    assert reader.versions() == []
    writer.publish(0, WEIGHTS[0], ["a"], "fp")
    assert reader.versions() == [0]
    writer.publish(1, WEIGHTS[1], ["a", "b"], "fp")
    assert reader.latest().version == 1


def test_local_writes_leave_no_temp_files(tmp_path):
    store = ProjectionStore(str(tmp_path))
    store.publish(0, WEIGHTS[0], ["a"], "fp", rule="trie+prior", class_stats=b"prior")
    with pytest.raises(VersionExistsError):
        store.publish(0, WEIGHTS[1], ["a"], "fp", rule="trie+prior", class_stats=b"prior")  # refused
    assert sorted(os.listdir(tmp_path / "v0000")) == ["class_stats.safetensors", "manifest.json",
                                                      "projection.safetensors"]


def test_local_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    store = ProjectionStore(str(tmp_path))
    store.publish(0, WEIGHTS[0], ["a"], "fp")
    before = (tmp_path / "v0000" / "manifest.json").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", boom)
    with pytest.raises(OSError, match="disk full"):
        store.publish(1, WEIGHTS[1], ["a", "b"], "fp")
    assert (tmp_path / "v0000" / "manifest.json").read_bytes() == before
    assert store.versions() == [0]
    assert sorted(os.listdir(tmp_path / "v0000")) == ["manifest.json", "projection.safetensors"]


def test_manifest_json_round_trip():
    manifest = Manifest(version=2, task=2, seen_classes=["a"], stack_fingerprint="fp", sha256="00",
                        size=1, created_at="2024-01-01T00:00:00+00:00", metrics={"x": 1}, extra={})
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(CorruptEntryError):
        Manifest.from_json("{nope")


# ---------------------------------------------------------------- concurrent publishers (real processes, real files)

PUBLISHER = """
from cil_platform.storage.store import ProjectionStore, VersionExistsError
store = ProjectionStore(sys.argv[2])
"""


def publish_body(weights: bytes) -> str:
    return f"""
try:
    store.publish(0, {weights!r}, ["a"], "fp")
    print("published", flush=True)
except VersionExistsError as error:
    print("refused:", error, flush=True)
"""


@pytest.mark.parametrize("url_kind", ["local", "file"])
def test_of_concurrent_publishers_of_one_version_exactly_one_wins_and_the_others_are_refused(tmp_path, url_kind):
    url = str(tmp_path / "store") if url_kind == "local" else f"file://{tmp_path}/store"
    contents = [f"weights of publisher {i}".encode() * 50 for i in range(4)]
    results = race_publishers(tmp_path, url, contents)
    winners = [i for i, line in enumerate(results) if line == "published"]
    assert len(winners) == 1, results
    assert all("already published" in line or "being written" in line for line in results if line != "published")
    manifest, blob = ProjectionStore(url).load(0)  # the winner's bytes, intact and checked
    assert blob == contents[winners[0]] and ProjectionStore(url).versions() == [0]


def race_publishers(tmp_path, url: str, contents: list[bytes]) -> list[str]:
    from tests.racing import race

    return race(tmp_path, PUBLISHER.replace("sys.argv[2]", repr(url)), [publish_body(c) for c in contents])


def test_concurrent_publishers_of_the_same_content_all_get_the_one_version(tmp_path):
    url = str(tmp_path / "store")
    assert race_publishers(tmp_path, url, [b"the same bytes"] * 3) == ["published"] * 3
    assert ProjectionStore(url).load(0)[1] == b"the same bytes"


def test_create_only_refuses_an_existing_file_on_every_backend(url):
    from cil_platform.storage.atomic import create_only_bytes

    fs, root = _raw(url)
    fs.makedirs(root, exist_ok=True)
    create_only_bytes(fs, f"{root}/file", b"first")
    with pytest.raises(FileExistsError):
        create_only_bytes(fs, f"{root}/file", b"second")
    assert fs.cat_file(f"{root}/file") == b"first"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["file"]  # no temp files left


def test_damaged_versions_are_skipped_and_a_reader_falls_back_to_the_newest_good_one(url, caplog):
    store = ProjectionStore(url)
    for task in range(3):
        store.publish(task, WEIGHTS[task], ["a"], "fp")
    fs, root = _raw(url)
    fs.pipe(f"{root}/v0002/projection.safetensors", b"short")  # another size than its manifest says
    with caplog.at_level("WARNING"):
        assert store.versions() == [0, 1] and store.latest().version == 1
    assert "skipping store version 2" in caplog.text and "5 bytes, manifest says" in caplog.text
    fs.pipe(f"{root}/v0001/projection.safetensors", b"X" + WEIGHTS[1][1:])  # same size, other bytes
    assert store.latest().version == 1  # listing checks sizes only; every byte is checked on load
    manifest, weights = store.newest_good()
    assert manifest.version == 0 and weights == WEIGHTS[0]
    fs.rm(f"{root}/v0000/projection.safetensors")
    assert store.newest_good() is None


def test_create_only_without_hard_links_falls_back_to_an_exclusive_open(tmp_path, monkeypatch):
    import errno

    from cil_platform.storage.atomic import create_only_bytes

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    fs, _ = _raw(str(tmp_path))
    create_only_bytes(fs, str(tmp_path / "file"), b"first")
    with pytest.raises(FileExistsError):
        create_only_bytes(fs, str(tmp_path / "file"), b"second")
    assert (tmp_path / "file").read_bytes() == b"first" and os.listdir(tmp_path) == ["file"]
