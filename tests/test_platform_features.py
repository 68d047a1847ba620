"""Frozen-encoder feature cache (any fsspec URL) and one-pass extraction with Ray Data + the real encoder."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from collections import Counter

import fsspec
import numpy as np
import pytest
from safetensors.numpy import save as save_tensors
from PIL import Image

from cil_platform.features import FeatureCache, FeatureTable


def key(i: int) -> str:
    return hashlib.sha1(str(i).encode()).hexdigest()


def shards(cache: FeatureCache) -> list[str]:
    return sorted(p for p in cache.fs.ls(cache.dir, detail=False) if p.endswith(".safetensors"))


@pytest.fixture(params=["local", "file", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "cache")
    elif request.param == "file":
        yield f"file://{tmp_path}/cache"
    else:
        root = f"memory://features-{uuid.uuid4().hex}"
        yield root
        fs = fsspec.filesystem("memory")
        if fs.exists(root.removeprefix("memory://")):
            fs.rm(root.removeprefix("memory://"), recursive=True)


# ---------------------------------------------------------------- the cache alone

def test_empty_cache_loads_nothing(url):
    cache = FeatureCache(url, "enc-a")
    assert cache.load_all() == {}
    cache.add([], np.zeros((0, 2, 3)))  # nothing to add writes nothing
    assert cache.load_all() == {}
    assert not cache.fs.exists(cache.dir)


def test_add_then_load_all_round_trips_keys_and_float16_features(url):
    cache = FeatureCache(url, "enc-a")
    rng = np.random.default_rng(0)
    first = rng.standard_normal((3, 2, 5)).astype(np.float32)
    second = rng.standard_normal((2, 2, 5)).astype(np.float16)
    cache.add([key(0), key(1), key(2)], first)
    cache.add([key(3), key(4)], second)
    assert len(shards(cache)) == 2  # one shard per add

    loaded = FeatureCache(url, "enc-a").load_all()  # a fresh instance reads what was written
    assert sorted(loaded) == sorted(key(i) for i in range(5))
    for i in range(3):
        assert loaded[key(i)].dtype == np.float16 and loaded[key(i)].shape == (2, 5)
        np.testing.assert_array_equal(loaded[key(i)], first[i].astype(np.float16))
    for i in range(2):
        np.testing.assert_array_equal(loaded[key(3 + i)], second[i])

    # the shard records the encoder identity in its metadata
    from safetensors import safe_open

    if not url.startswith("memory://"):
        with safe_open(shards(cache)[0], "np") as handle:
            meta = handle.metadata()
        assert meta["encoder"] == "enc-a" and len(meta["sha256"]) == 64 and int(meta["created_ns"]) > 0


def test_half_written_shards_are_ignored(url):
    cache = FeatureCache(url, "enc-a")
    cache.add([key(0)], np.ones((1, 2, 2)))
    # a crashed writer's leftovers: a temp file and a truncated blob with a non-shard name
    cache.fs.pipe_file(f"{cache.dir}/shard-x.safetensors.tmp", b"\x10\x00\x00garbage")
    cache.fs.pipe_file(f"{cache.dir}/.shard-y.safetensors.abc.tmp", b"")
    loaded = cache.load_all()
    assert list(loaded) == [key(0)]
    np.testing.assert_array_equal(loaded[key(0)], np.ones((2, 2), np.float16))


def test_local_add_leaves_only_the_shard(tmp_path):
    cache = FeatureCache(str(tmp_path / "c"), "enc-a")
    cache.add([key(0)], np.ones((1, 1, 1)))
    files = os.listdir(cache.dir)
    assert len(files) == 1 and files[0].endswith(".safetensors") and not files[0].startswith(".")


def test_the_oldest_value_of_a_key_wins_for_every_reader_whatever_the_file_names(url):
    """Two runs that encoded the same image at once may store values one float16 step apart: every reader must
    see the first one stored (by the creation stamp in the shards' metadata), whatever the names or listing order."""
    cache = FeatureCache(url, "enc-a")
    cache.add([key(0), key(2)], np.ones((2, 2, 2)))
    cache.add([key(0), key(1)], np.full((2, 2, 2), 2.0))
    first, second = sorted(shards(cache), key=lambda p: cache._load_checked(p)[0])
    # swap the names: the newer shard now sorts first by name
    cache.fs.mv(first, f"{cache.dir}/tmp.safetensors")
    cache.fs.mv(second, first)
    cache.fs.mv(f"{cache.dir}/tmp.safetensors", second)
    loaded = FeatureCache(url, "enc-a").load_all()
    np.testing.assert_array_equal(loaded[key(0)], np.ones((2, 2), np.float16))
    np.testing.assert_array_equal(loaded[key(1)], np.full((2, 2), 2, np.float16))
    np.testing.assert_array_equal(loaded[key(2)], np.ones((2, 2), np.float16))


def test_damaged_or_unchecked_shards_are_skipped_with_a_warning_never_trusted(url, caplog):
    cache = FeatureCache(url, "enc-a")
    cache.add([key(0)], np.ones((1, 2, 2)))
    good = shards(cache)[0]
    blob = cache.fs.cat_file(good)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])  # one bit of one feature
    unchecked = save_tensors({"keys": np.frombuffer(bytes.fromhex(key(1)), np.uint8)[None],
                              "features": np.full((1, 2, 2), 7, np.float16)}, metadata={"encoder": "enc-a"})
    for name, data in {"flipped": flipped, "unchecked": unchecked, "truncated": blob[:40],
                       "garbage": b"\xff" * 64, "empty": b""}.items():
        cache.fs.pipe_file(f"{cache.dir}/{name}.safetensors", data)
    with caplog.at_level(logging.WARNING):
        loaded = FeatureCache(url, "enc-a").load_all()
    assert list(loaded) == [key(0)]
    np.testing.assert_array_equal(loaded[key(0)], np.ones((2, 2), np.float16))
    skipped = [r.getMessage() for r in caplog.records if "skipping feature cache shard" in r.getMessage()]
    assert len(skipped) == 5 and any("sha256" in m for m in skipped)


def test_each_encoder_identity_has_its_own_directory(url):
    a, b = FeatureCache(url, "efficientnet-lite0@112px/grid2"), FeatureCache(url, "efficientnet-lite0@112px/grid3")
    assert a.dir != b.dir
    assert a.dir == FeatureCache(url, "efficientnet-lite0@112px/grid2").dir  # stable
    a.add([key(0)], np.zeros((1, 4, 3)))
    b.add([key(1)], np.ones((1, 9, 3)))
    assert list(a.load_all()) == [key(0)] and a.load_all()[key(0)].shape == (4, 3)
    assert list(b.load_all()) == [key(1)] and b.load_all()[key(1)].shape == (9, 3)


def test_feature_table_select_keeps_rows_of_the_given_classes():
    feats = np.arange(4 * 2 * 3, dtype=np.float16).reshape(4, 2, 3)
    table = FeatureTable(feats, np.array(["a", "b", "a", "c"], dtype=object),
                         np.array(["k0", "k1", "k2", "k3"], dtype=object))
    picked = table.select(["a", "c"])
    assert len(table) == 4 and len(picked) == 3
    assert picked.labels.tolist() == ["a", "a", "c"]
    assert picked.keys.tolist() == ["k0", "k2", "k3"]
    np.testing.assert_array_equal(picked.features, feats[[0, 2, 3]])
    assert len(table.select([])) == 0


# ---------------------------------------------------------------- extraction on real Ray + the real encoder

def in_test(relative: str, fraction: float) -> bool:
    """The folder loader's documented split rule: a stable sha1 coin of the relative path."""
    return int(hashlib.sha1(relative.encode()).hexdigest()[:15], 16) / 16**15 < fraction


# chosen so that each split holds images of both classes and some bad files (checked below)
GOOD = {"red": ["img0.png", "img1.png", "img2.png"], "blue": ["img0.png", "img1.png", "img2.png"]}
BAD = {"red/broken.jpg": "not an image", "blue/notes.txt": "not an image", "blue/truncated.jpg": "corrupt image"}


def image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (24 + seed, 30, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    expected = {"train": [], "test": []}  # (relative path, label, image, sha1 of the file)
    seed = 0
    for label, names in GOOD.items():
        (root / label).mkdir()
        for name in names:
            buffer = io.BytesIO()
            pixels = image(seed)
            Image.fromarray(pixels).save(buffer, format="PNG")
            (root / label / name).write_bytes(buffer.getvalue())
            rel = f"{label}/{name}"
            split = "test" if in_test(rel, 0.5) else "train"
            expected[split].append((rel, label, pixels, hashlib.sha1(buffer.getvalue()).hexdigest()))
            seed += 1
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg" * 3)
    (root / "blue" / "notes.txt").write_text("a note beside the images\n")
    buffer = io.BytesIO()
    Image.fromarray(image(50)).save(buffer, format="JPEG")
    (root / "blue" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    skipped = {"train": Counter(), "test": Counter()}
    for rel, reason in BAD.items():
        skipped["test" if in_test(rel, 0.5) else "train"][reason] += 1
    # the test relies on both splits holding both classes and a bad file
    for split in ("train", "test"):
        assert {label for _, label, _, _ in expected[split]} == {"red", "blue"}, split
        assert skipped[split], split
    return root, expected, skipped


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    previous = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if ray.is_initialized():  # another module's session-scoped instance: start a clean one
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
    else:
        os.environ["RAY_USAGE_STATS_ENABLED"] = previous


def test_extract_features_end_to_end_and_second_pass_uses_the_cache(ray_cluster, folder, tmp_path, caplog):
    from cil_platform.data import DatasetConfig, load_dataset
    from cil_platform.data.rows import LabelledImages
    from cil_platform.features import extract_features
    from gmm_model import ModelStack, create_encoder

    root, expected, skipped = folder
    stack = ModelStack()
    encoder = create_encoder(stack).eval()
    cache = FeatureCache(f"file://{tmp_path}/features", encoder.identity)
    splits = load_dataset(DatasetConfig(kind="folder", path=str(root), test_fraction=0.5))
    assert splits.class_names == ["blue", "red"]
    assert splits.train.num_rows + splits.test.num_rows == 6 + len(BAD)

    caplog.set_level(logging.INFO, logger="cil_platform.features")
    sets = extract_features([splits.train, splits.test], stack, cache, actors=1)
    assert not any(hasattr(s, "features") for s in sets)  # the driver got keys, labels and cache places only
    train, test = (s.to_table() for s in sets)  # read back from the cache by Ray Data

    for split, table in (("train", train), ("test", test)):
        want = expected[split]
        assert len(table) == len(want)
        assert table.features.shape == (len(want), 4, 1280) and table.features.dtype == np.float16
        assert sorted(zip(table.keys.tolist(), table.labels.tolist())) == sorted((k, l) for _, l, _, k in want)
        assert table.skipped == skipped[split]
        # the features are the encoder's tokens of exactly those images
        by_key = dict(zip(table.keys.tolist(), table.features))
        direct = encoder.encode([pixels for _, _, pixels, _ in want]).numpy().astype(np.float16)
        for (_, _, _, k), tokens in zip(want, direct):
            np.testing.assert_allclose(by_key[k].astype(np.float32), tokens.astype(np.float32), rtol=2e-2, atol=2e-2)
        assert np.abs(table.features.astype(np.float32)).sum() > 0
    assert sum(train.skipped.values()) + sum(test.skipped.values()) == len(BAD)
    assert train.skipped + test.skipped == Counter(BAD.values())
    assert "6 computed, 0 from cache" in caplog.text

    written = shards(cache)
    assert 1 <= len(written) <= 2  # one per encoder batch, written by the actor that encoded it
    assert set(cache.load_all()) == set(train.keys) | set(test.keys)

    # rows come in one canonical order (class, then key), whatever order Ray Data delivers them in: here the
    # second pass reads the images in reverse
    for table in (train, test):
        assert list(zip(table.labels, table.keys)) == sorted(zip(table.labels, table.keys))
    caplog.clear()
    backwards = [LabelledImages(split.dataset.sort("key", descending=True), split.num_rows)
                 for split in (splits.train, splits.test)]
    train2, test2 = (s.to_table() for s in extract_features(backwards, stack, cache, actors=1))
    assert shards(cache) == written  # nothing new was computed, so nothing was written
    assert "0 computed, 6 from cache" in caplog.text
    for first, again in ((train, train2), (test, test2)):
        assert again.keys.tolist() == first.keys.tolist() and again.labels.tolist() == first.labels.tolist()
        np.testing.assert_array_equal(again.features, first.features)
        assert again.skipped == first.skipped


def test_a_class_without_a_decodable_training_image_is_an_error_naming_it():
    from cil_platform.features import require_training_images

    train = FeatureTable(np.zeros((2, 1, 1), np.float16), np.asarray(["cat", "cat"], dtype=object),
                         np.asarray(["k1", "k2"], dtype=object), Counter({"corrupt image": 3}))
    require_training_images(train, ["cat"])
    with pytest.raises(ValueError, match=r"no training images that decode: \['dog', 'hot dog'\].*corrupt image 3"):
        require_training_images(train, ["cat", "dog", "hot dog"])


# ---------------------------------------------------------------- streamed sets: the driver holds no features

def test_a_streamed_set_reads_what_was_cached_in_canonical_order_and_agrees_with_memory(ray_cluster, tmp_path):
    from cil_platform.class_stats import ClassStatistics
    from cil_platform.features import FeatureSet, key_bytes, read_positions

    cache = FeatureCache(str(tmp_path / "cache"), "enc-a")
    rng = np.random.default_rng(0)
    keys = [key(i) for i in range(50)]
    labels = np.array([["b", "a", "c"][i % 3] for i in range(50)], dtype=object)
    feats = rng.standard_normal((50, 2, 6)).astype(np.float16)
    cache.add(keys[:20], feats[:20])
    cache.add(keys[20:], feats[20:])
    cache.add(keys[5:8], feats[5:8] + 1)  # a newer value of three keys: the oldest wins
    index = cache.index()  # a Ray Data pass over the shards
    assert len(index) == 50 and len(index.shards) == 3 and index.token_shape == (2, 6)
    classes = ["b", "a", "c"]
    streamed = FeatureSet.of(cache, index, key_bytes(keys), np.array([classes.index(y) for y in labels]), classes)
    table = streamed.to_table()
    assert list(zip(table.labels, table.keys)) == sorted(zip(labels, keys))  # by class, then key
    rows = [keys.index(k) for k in table.keys]
    np.testing.assert_array_equal(table.features, feats[rows])
    assert streamed.nbytes == feats.nbytes

    # a rank's rows: whatever the order Ray delivers them in, sorted by position
    positions, got_labels, got = read_positions(streamed.dataset(np.array([40, 3, 7, 1])))
    assert positions.tolist() == [1, 3, 7, 40] and got_labels == list(table.labels[[1, 3, 7, 40]])
    np.testing.assert_array_equal(got, table.features[[1, 3, 7, 40]])
    # batches carry their positions; statistics and pooled vectors equal those of the rows held in memory
    assert sorted(p for b in streamed.batches(7) for p in b.positions.tolist()) == list(range(50))
    np.testing.assert_allclose(streamed.pooled.numpy(), table.pooled.numpy(), atol=1e-6)
    assert streamed.pooled is streamed.pooled  # read once, then kept with the set
    from_stream, from_memory = ClassStatistics(), ClassStatistics()
    from_stream.learn(streamed)
    from_memory.learn(table)
    assert from_stream.classes == from_memory.classes == ["a", "b", "c"]
    for name in classes:
        members = table.features[table.labels == name].astype(np.float32)
        np.testing.assert_allclose(from_stream.mean[name], members.mean(0), atol=1e-6)
        np.testing.assert_allclose(from_stream.std[name], members.std(0), atol=1e-5)
        np.testing.assert_allclose(from_stream.prototype[name], from_memory.prototype[name], atol=1e-6)

    # a shard damaged after it was indexed: a read names it instead of returning other numbers
    victim = index.shards[int(streamed.shard[0])]
    blob = cache.fs.cat_file(victim)
    cache.fs.pipe_file(victim, blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(Exception, match="damaged since it was indexed"):
        streamed.to_table()
