"""Listing a dataset folder on any fsspec filesystem, and the split rules that every file-based source
(image folders, the benchmark layouts, parquet) shares: `train/` + `test/` sub-folders, else a hash."""
from __future__ import annotations

import logging
import posixpath
from collections import Counter

from .rows import sha1

log = logging.getLogger(__name__)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def list_files(fs, root: str) -> dict[str, int]:
    """Every non-hidden regular file under root, by path relative to root, with its size (one listing).

    A symbolic link to a folder (a class folder linked in from elsewhere) is followed, one level: links inside it
    are not, so a link back up cannot loop. Everything else that is not a regular file (links to files, devices,
    pipes: reading a pipe would block the run) and names that are not valid UTF-8 are skipped with a warning."""
    prefix = root if root.endswith("/") else root + "/"
    found = fs.find(root, detail=True)
    for path, info in list(found.items()):
        if info.get("islink") and fs.isdir(path):
            found.update(fs.find(path, detail=True))
    files, skipped = {}, Counter()
    for path, info in found.items():
        relative = path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root)
        if _hidden(relative) or info.get("type") == "directory" or (info.get("islink") and fs.isdir(path)):
            continue
        if info.get("type") != "file":
            skipped["not a regular file"] += 1
        elif not _utf8(relative):
            skipped["name is not UTF-8"] += 1
        else:
            files[relative] = int(info.get("size") or 0)
    if skipped:
        log.warning("skipped %d entries under %s: %s", sum(skipped.values()), root, dict(skipped))
    return files


def _utf8(name: str) -> bool:
    """Whether a name is text (a local name that is not valid UTF-8 arrives with surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def subfolders(fs, folder: str) -> list[str]:
    """Names of the non-hidden folders directly in `folder` (empty ones included, unlike fs.find), links to
    folders included."""
    names = []
    for info in fs.ls(folder, detail=True):
        name = posixpath.basename(info["name"].rstrip("/"))
        is_dir = info.get("type") == "directory" or (info.get("islink") and fs.isdir(info["name"]))
        if is_dir and not name.startswith("."):
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
