"""The torch-free stack spec: what it loads, how a config names a stack, fingerprints, and the dtype table."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from gmm_model.spec import PRESETS, ModelStack, resolve_stack

REPO = Path(__file__).resolve().parents[1]

# These ids name shipped and cached artifacts (assets/aligned/<fingerprint>.safetensors, store versions,
# feature and alignment caches), so they must never change. Computed on the code before the spec moved
# to gmm_model/spec.py.
FINGERPRINTS = {
    "offline-small": "1b73d88d6e5b",
    "offline-lite2": "121d18192578",
    "paper-minigpt4-vicuna7b": "1f22a5662498",
    "clip-vitb16-qwen2.5-1.5b": "df550fd78b01",
    "timm-convnext-tiny-smollm2-360m": "1f31c0f98d0f",
}


def test_the_spec_and_the_package_load_neither_torch_nor_transformers():
    probe = ("import sys\nimport gmm_model\nfrom gmm_model import ModelStack, PRESETS, resolve_stack\n"
             "import gmm_model.spec\nModelStack().fingerprint\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ast.literal_eval(out.stdout.strip().splitlines()[-1]) == []


def test_the_package_exposes_its_public_names_lazily():
    import gmm_model

    assert "resolve_stack" in gmm_model.__all__ and set(gmm_model.__all__) <= set(dir(gmm_model))
    assert gmm_model.ModelStack is ModelStack and gmm_model.resolve_stack is resolve_stack
    with pytest.raises(AttributeError, match="no_such_name"):
        gmm_model.no_such_name  # noqa: B018


def test_resolve_stack_from_a_preset_name():
    assert resolve_stack("offline-small") == PRESETS["offline-small"] == ModelStack()
    assert resolve_stack("clip-vitb16-qwen2.5-1.5b") == PRESETS["clip-vitb16-qwen2.5-1.5b"]


def test_resolve_stack_from_a_preset_with_overrides():
    stack = resolve_stack({"preset": "paper-minigpt4-vicuna7b", "llm": "lmsys/vicuna-13b-v1.3"})
    assert stack == PRESETS["paper-minigpt4-vicuna7b"].model_copy(update={"llm": "lmsys/vicuna-13b-v1.3"})
    assert PRESETS["paper-minigpt4-vicuna7b"].llm == "lmsys/vicuna-7b-v1.3"  # the preset itself is untouched
    with pytest.raises(pydantic.ValidationError, match="grid"):
        resolve_stack({"preset": "offline-small", "grid": 100})  # overrides are validated


def test_resolve_stack_from_plain_fields_and_from_a_stack():
    assert resolve_stack({"image_size": 64}) == ModelStack(image_size=64)
    assert resolve_stack({}) == ModelStack()
    stack = ModelStack(grid=3)
    assert resolve_stack(stack) is stack
    with pytest.raises(pydantic.ValidationError, match="bogus"):
        resolve_stack({"bogus": 1})


def test_resolve_stack_names_the_known_presets_for_an_unknown_one():
    with pytest.raises(ValueError, match="unknown model preset 'giant-xl'") as error:
        resolve_stack("giant-xl")
    assert all(name in str(error.value) for name in PRESETS)
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve_stack({"preset": "giant-xl", "grid": 3})
    with pytest.raises(ValueError, match="preset name or a mapping"):
        resolve_stack(3)


def test_fingerprints_of_the_default_stack_and_every_preset_are_unchanged():
    assert ModelStack().fingerprint == "1b73d88d6e5b"
    assert (REPO / "assets" / "aligned" / "1b73d88d6e5b.safetensors").is_file()
    assert {name: stack.fingerprint for name, stack in PRESETS.items()} == FINGERPRINTS


def test_torch_dtype_names_the_three_precisions_and_refuses_others():
    import torch

    from gmm_model.stack import torch_dtype

    assert torch_dtype("float32") is torch.float32
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16
    assert torch_dtype(ModelStack().llm_dtype) is torch.float32
    for name in ("bf16", "fp32", "int8", ""):
        with pytest.raises(ValueError, match=f"unknown dtype {name!r}.*float32, bfloat16, float16"):
            torch_dtype(name)


@pytest.mark.parametrize("raw, expected", [
    ("hot\u200bdog", "hotdog"),  # zero-width space
    ("\ufeffcat", "cat"),  # a byte-order mark left by a CSV export
    ("ca\u00adt", "cat"),  # soft hyphen
    ("\u202egod", "god"),  # right-to-left override: would display reversed
    ("hot\u00a0dog", "hot dog"),  # a no-break space is whitespace
])
def test_class_names_lose_invisible_characters(raw, expected):
    from gmm_model.spec import normalise_class_name

    assert normalise_class_name(raw) == expected


@pytest.mark.parametrize("raw", ["cat\x00", "\x1b[31mred", "dog\x7f", "caf\udce9"])  # NUL, ANSI escape, DEL, bad UTF-8
def test_class_names_with_control_characters_or_undecodable_bytes_are_refused(raw):
    from gmm_model.spec import normalise_class_name

    with pytest.raises(ValueError, match="control characters or undecodable bytes .*rename the class"):
        normalise_class_name(raw)


def test_a_name_of_invisible_characters_only_is_empty():
    from gmm_model.spec import normalise_class_name

    with pytest.raises(ValueError, match="empty"):
        normalise_class_name("\u200b\u200d ")
