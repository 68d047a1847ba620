"""Stage-1 alignment helpers: disjoint seeded class choice, aligned-projection files, atomic writes."""
from __future__ import annotations

import json
import os

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from cil_platform.alignment import alignment_classes, default_aligned_path, read_aligned, write_aligned
from cil_platform.storage.atomic import atomic_write_bytes
from gmm_model import ModelStack, Projection

NAMES = [f"class{i:02d}" for i in range(30)]


def test_alignment_classes_are_seeded_sorted_and_deterministic():
    a = alignment_classes(NAMES, 10, seed=5)
    assert a == alignment_classes(list(reversed(NAMES)), 10, seed=5)  # input order does not matter
    assert a == sorted(a) and len(set(a)) == 10 and set(a) <= set(NAMES)
    assert a != alignment_classes(NAMES, 10, seed=6)
    assert alignment_classes(NAMES, 30, seed=5) == sorted(NAMES)


def test_alignment_classes_avoid_reserved_classes():
    reserved = set(NAMES[::2])
    chosen = alignment_classes(NAMES, 15, seed=1, reserved=reserved)
    assert not set(chosen) & reserved
    assert chosen == sorted(NAMES[1::2])  # exactly the 15 classes left
    picked = alignment_classes(NAMES, 5, seed=1, reserved=reserved)
    assert not set(picked) & reserved and len(picked) == 5


def test_alignment_classes_error_when_too_few_are_available():
    with pytest.raises(ValueError, match="needs 31 classes but only 30"):
        alignment_classes(NAMES, 31, seed=0)
    with pytest.raises(ValueError, match="needs 16 classes but only 15"):
        alignment_classes(NAMES, 16, seed=0, reserved=set(NAMES[:15]))


@pytest.mark.parametrize("scheme", ["local", "file"])
def test_write_then_read_aligned_round_trips(tmp_path, scheme):
    torch.manual_seed(0)
    source = Projection(12, 5)
    path = tmp_path / "nested" / "dir" / "aligned.safetensors"
    url = str(path) if scheme == "local" else f"file://{path}"
    classes = ["zebra", "apple", "school bus"]
    stack = ModelStack(grid=3)
    write_aligned(url, source.to_bytes(), classes, stack, "unit test")

    aligned = read_aligned(url)
    assert aligned.classes == classes  # order kept
    assert aligned.origin == url
    loaded = Projection(12, 5).load_bytes(aligned.weights)
    assert torch.equal(loaded.weight, source.weight) and torch.equal(loaded.bias, source.bias)
    with pytest.raises(ValueError, match="shapes"):
        Projection(12, 6).load_bytes(aligned.weights)
    # the metadata is readable by safetensors itself
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["classes"]) == classes
    assert ModelStack.model_validate_json(meta["stack"]) == stack
    assert meta["source"] == "unit test"
    assert sorted(os.listdir(path.parent)) == ["aligned.safetensors"]  # no temp file left behind


def test_read_aligned_without_metadata_has_no_classes(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(Projection(4, 2).to_bytes())
    aligned = read_aligned(str(path))
    assert aligned.classes == []
    assert Projection(4, 2).load_bytes(aligned.weights).weight.shape == (2, 4)


def test_read_aligned_refuses_a_truncated_file(tmp_path):
    good = tmp_path / "good.safetensors"
    good.write_bytes(Projection(4, 2).to_bytes())
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes(good.read_bytes()[:20])
    assert read_aligned(str(good)).weights == good.read_bytes()
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_aligned(str(truncated))


def test_default_aligned_path_is_keyed_by_stack_fingerprint(tmp_path):
    stack = ModelStack()
    shipped, cached = default_aligned_path(stack, str(tmp_path))
    assert shipped.name == cached.name == f"{stack.fingerprint}.safetensors"
    assert cached.parent == tmp_path / "aligned"
    assert shipped.parent.parts[-2:] == ("assets", "aligned")
    assert default_aligned_path(ModelStack(grid=3), str(tmp_path))[1] != cached


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path):
    fs = LocalFileSystem()
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(fs, str(target), b"first version")  # creates the directory
    assert target.read_bytes() == b"first version"
    atomic_write_bytes(fs, str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]


def test_atomic_write_failure_keeps_old_content_and_cleans_up(tmp_path):
    fs = LocalFileSystem()
    target = tmp_path / "file.bin"
    atomic_write_bytes(fs, str(target), b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(fs, str(target), "not bytes")  # write() fails after the temp file exists
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_on_a_non_local_filesystem_uses_a_single_put():
    fs = fsspec.filesystem("memory")
    path = "/atomic-test/dir/file.bin"
    try:
        atomic_write_bytes(fs, path, b"abc")
        atomic_write_bytes(fs, path, b"defg")
        assert fs.cat_file(path) == b"defg"
        assert fs.ls("/atomic-test/dir", detail=False) == [path]
    finally:
        fs.rm("/atomic-test", recursive=True)
