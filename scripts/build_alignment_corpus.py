"""Build the stage-1 alignment corpus: named clip-art from two Debian packages, disjoint from QuickDraw.

    python scripts/build_alignment_corpus.py                    # apt-get download + extract + curate
    python scripts/build_alignment_corpus.py --debs /tmp/debs   # from already downloaded .deb files
    python scripts/build_alignment_corpus.py --extracted /tmp/x # from an already extracted tree (usr/share/...)

Sources (recorded with their licences in <out>/corpus.json, which jobs/align.py copies beside the projection):
- `openclipart-png`: public-domain clip-art under usr/share/openclipart/png/<subject>/..., named by file name
  (`light_bulb_karl_bartel_01.png`: title, author, counter), often not in English;
- `tuxpaint-stamps-default` (GPL-2): stamps under usr/share/tuxpaint/stamps/<topic>/..., most with a .txt whose
  first line is an English description ("A chimpanzee.").
Names follow cil_platform/data/corpus.py: a short English description, else the longest leading English lemma of
the file name; an item without one is dropped, and so is every class that collides with a QuickDraw class (or a
name given with --reserve). Images are flattened onto white and fitted into a square, at most --max-per-class per
class, identical images once. The result is the `folder` layout (<out>/<class>/<file>.png), read with
`dataset.kind=folder, test_fraction=0`; it is regenerated, not kept in the repository.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil_platform.data.corpus import (disjoint_classes, english_vocabulary,  # noqa: E402
                                      name_from_description, name_from_stem)
from cil_platform.data.layouts import imagenet_lemmas  # noqa: E402
from cil_platform.data.quickdraw import QUICKDRAW_PATH  # noqa: E402

OPENCLIPART = {"package": "openclipart-png", "licence": "public domain (Open Clip Art Library)",
               "root": "usr/share/openclipart/png"}
TUXPAINT = {"package": "tuxpaint-stamps-default", "licence": "GPL-2.0", "root": "usr/share/tuxpaint/stamps"}
SOURCES = (OPENCLIPART, TUXPAINT)
# subject folders whose file names name no depicted thing: icon themes' action names ("filesaveas", "open"),
# colour gradients and fill patterns
SKIPPED_SUBJECTS = ("computer/icons", "special")
SIDE = 128  # pixels; the offline encoders run at 112-130 px
MAX_PIXELS = 4096 * 4096  # a few clip-art PNGs are 13,000 px wide: seconds and GBs each to decode, for 128 px
DEFAULT_OUT = Path(os.environ.get("GMM_CIL_CACHE", "~/.cache/gmm-cil")).expanduser() / "corpora" / "clipart"


def download(workdir: Path) -> list[Path]:
    """The packages' .deb files, fetched with apt-get into `workdir`."""
    subprocess.run(["apt-get", "download", *(s["package"] for s in SOURCES)], cwd=workdir, check=True,
                   capture_output=True)
    return sorted(workdir.glob("*.deb"))


def extract(debs: list[Path], into: Path) -> dict[str, str]:
    """Unpack the PNG and TXT files of each .deb into `into`; {package: version}."""
    versions = {}
    for deb in debs:
        fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], check=True,
                                capture_output=True, text=True).stdout.splitlines()
        package, version = (line.split(":", 1)[1].strip() for line in fields[:2])
        versions[package] = version
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        # --wildcards with a pattern a package lacks (openclipart has no .txt) exits 2: check what was written
        subprocess.run(["tar", "-x", "-C", str(into), "--wildcards", "*.png", "*.txt"], stdin=tar.stdout,
                       capture_output=True)
        tar.wait()
    return versions


def description(png: Path) -> str:
    """The first line of the stamp's .txt (its English description), or ''."""
    text = png.with_suffix(".txt")
    if not text.is_file():
        return ""
    lines = text.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0] if lines else ""


def named_items(tree: Path, vocabulary: frozenset[str]) -> tuple[list[tuple[str, str, Path]], Counter]:
    """[(source package, name, png)] of every nameable image under the extracted `tree`, and drops by reason."""
    items, dropped = [], Counter()
    for source in SOURCES:
        root = tree / source["root"]
        for png in sorted(root.rglob("*.png")):
            relative = png.relative_to(root).as_posix()
            if source is OPENCLIPART and relative.startswith(SKIPPED_SUBJECTS):
                dropped["subject without object names"] += 1
                continue
            name = name_from_description(description(png)) or name_from_stem(png.stem, vocabulary)
            if name is None:
                dropped["no usable English name"] += 1
                continue
            items.append((source["package"], name, png))
    return items, dropped


def flattened(png: Path, side: int = SIDE) -> bytes | None:
    """The image on white, fitted into a side x side square, as PNG bytes; None when it does not decode or has
    more than MAX_PIXELS."""
    try:
        with Image.open(png) as image:
            if image.width * image.height > MAX_PIXELS:
                return None
            rgba = image.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    canvas = canvas.convert("RGB")
    canvas.thumbnail((side, side), Image.Resampling.LANCZOS)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(canvas, ((side - canvas.width) // 2, (side - canvas.height) // 2))
    out = io.BytesIO()
    square.save(out, format="PNG", optimize=True)
    return out.getvalue()


def reserved_names(extra: list[Path]) -> list[str]:
    """QuickDraw's 345 classes plus every line of each --reserve file."""
    with np.load(QUICKDRAW_PATH) as archive:
        names = [str(n) for n in archive["class_names"]]
    for path in extra:
        names += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return names


def write_corpus(items: list[tuple[str, str, Path]], reserved: list[str], out: Path, max_per_class: int) -> dict:
    """Write <out>/<class>/<package>-<n>.png for the classes that collide with no reserved name; a summary."""
    kept, collided = disjoint_classes((name for _, name, _ in items), reserved)
    keep = set(kept)
    per_class, seen, counts = defaultdict(int), set(), Counter()
    for package, name, png in items:
        if name not in keep or per_class[name] >= max_per_class:
            counts["over the per-class cap" if name in keep else "class collides with a reserved name"] += 1
            continue
        blob = flattened(png)
        digest = hashlib.sha1(blob).hexdigest() if blob else None
        if blob is None or digest in seen:
            counts["undecodable or too large" if blob is None else "duplicate image"] += 1
            continue
        seen.add(digest)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{package}-{per_class[name]:03d}.png").write_bytes(blob)
        per_class[name] += 1
        counts[f"images from {package}"] += 1
    written = {name: n for name, n in per_class.items() if n}  # a class whose every image was a duplicate: none
    return {"classes": len(written), "images": sum(written.values()), "counts": dict(counts),
            "collided_classes": collided}


def build(tree: Path, out: Path, reserved: list[str], max_per_class: int, versions: dict[str, str]) -> dict:
    """Curate the extracted `tree` into the folder dataset `out`; returns (and writes) its corpus.json."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    items, dropped = named_items(tree, english_vocabulary(imagenet_lemmas()))
    summary = write_corpus(items, reserved, out, max_per_class)
    summary["counts"].update(dropped)
    manifest = {"name": out.name, "built_by": "scripts/build_alignment_corpus.py", "max_per_class": max_per_class,
                "side": SIDE, "reserved_names": len(set(reserved)),
                "sources": [{"package": s["package"], "version": versions.get(s["package"]), "licence": s["licence"]}
                            for s in SOURCES], **summary}
    (out / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--debs", type=Path, help="a folder with the downloaded .deb files (skips apt-get)")
    parser.add_argument("--extracted", type=Path, help="an already extracted tree (skips download and unpacking)")
    parser.add_argument("--max-per-class", type=int, default=30)
    parser.add_argument("--reserve", type=Path, action="append", default=[],
                        help="a file of further evaluation class names (one a line) to keep out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tree, versions = args.extracted, {}
        if tree is None:
            debs = sorted(args.debs.glob("*.deb")) if args.debs else download(Path(work))
            tree = Path(work) / "tree"
            tree.mkdir()
            versions = extract(debs, tree)
        manifest = build(tree, args.out, reserved_names(args.reserve), args.max_per_class, versions)
    print(f"{manifest['images']} images of {manifest['classes']} classes -> {args.out} "
          f"({len(manifest['collided_classes'])} classes dropped as reserved); {manifest['counts']}")


if __name__ == "__main__":
    main()
