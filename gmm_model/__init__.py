"""The GMM model: frozen encoder, trained projection, frozen LLM, matcher. Nothing platform-specific.

Names are imported from their modules on first access (PEP 562), so `from gmm_model import ModelStack`
(a config, a store, a service's router) loads neither torch nor transformers; the model names do.
"""
import importlib

_HOMES = {  # public name -> the module that defines it
    "GMM": "model", "ConstrainedPrediction": "model",
    "ModelStack": "spec", "PRESETS": "spec", "PromptFormat": "spec", "normalise_class_name": "spec",
    "resolve_stack": "spec",
    "OpenCLIPTextMatcher": "matcher", "SentenceTransformerMatcher": "matcher", "TextMatcher": "matcher",
    "Projection": "projection",
    "VisionEncoder": "vision",
    "create_encoder": "stack", "create_gmm": "stack", "create_matcher": "stack",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
