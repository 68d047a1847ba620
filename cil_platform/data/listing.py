"""Listing a dataset folder on any fsspec filesystem, and the split rules that every file-based source
(image folders, the benchmark layouts, parquet) shares: `train/` + `test/` sub-folders, else a hash."""
from __future__ import annotations

import posixpath

from .rows import sha1


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def list_files(fs, root: str) -> dict[str, int]:
    """Every non-hidden file under root, by path relative to root, with its size (one listing)."""
    prefix = root if root.endswith("/") else root + "/"
    found = fs.find(root, detail=True)
    files = {}
    for path, info in found.items():
        relative = path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root)
        if info.get("type") != "directory" and not _hidden(relative):
            files[relative] = int(info.get("size") or 0)
    return files


def subfolders(fs, folder: str) -> list[str]:
    """Names of the non-hidden folders directly in `folder` (empty ones included, unlike fs.find)."""
    names = []
    for info in fs.ls(folder, detail=True):
        name = posixpath.basename(info["name"].rstrip("/"))
        if info.get("type") == "directory" and not name.startswith("."):
            names.append(name)
    return sorted(names)


def presplit(fs, root: str, path: str) -> bool:
    """Whether root has train/ and test/ sub-folders; only one of them is an error."""
    top = subfolders(fs, root)
    if "train" in top and "test" in top:
        return True
    if "train" in top or "test" in top:
        raise ValueError(f"{path} has only one of train/ and test/: give both, or neither "
                         "(then the split is computed)")
    return False


def in_test(name: str, test_fraction: float) -> bool:
    """A stable coin for one file (by relative path) or image (by content key): the same name always
    lands in the same split, so adding files never moves others."""
    return int(sha1(name.encode("utf-8"))[:15], 16) / 16**15 < test_fraction
