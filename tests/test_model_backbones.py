"""Every loader of the wider model stacks, on tiny randomly initialised models these tests build and save
themselves (no downloads): open_clip and timm image backbones through local weights files, EVA-style
ViT + BLIP-2 Q-Former from a tiny (sharded) Blip2 checkpoint, a Hugging Face causal LM directory (a tiny
Llama with SmolLM2's tokenizer) in float32 / bfloat16 and with its chat template, CLIP's text tower and a
sentence-transformers directory as matchers, MiniGPT-4's projection checkpoint, and the presets.

Each stack runs through the real factories end to end: create_encoder -> encode images ->
create_gmm -> one training step of the projection -> trie and free prediction with create_matcher.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from gmm_model import PRESETS, ModelStack, Projection, create_encoder, create_gmm, create_matcher
from gmm_model.llm import load_frozen_llm, prepare_llm
from gmm_model.classify import classify
from gmm_model.prompt import chat_format
from tests.test_model_core import CACHE_DIR

NAMES = ["cat", "school bus", "hot dog"]
RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8), RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)]
TINY_CLIP = "gmm-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- tiny models, built and saved by the tests ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer (and chat template), taken from the de-quantised offline LLM."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(prepare_llm(ModelStack().llm, CACHE_DIR).location)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny CLIP registered with open_clip under TINY_CLIP; returns its randomly initialised weights file."""
    import open_clip

    directory = tmp_path_factory.mktemp("open-clip")
    (directory / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(directory / f"{TINY_CLIP}.json")
    torch.manual_seed(1)
    weights = directory / "tiny-clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights)
    return str(weights)


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory) -> dict[str, str]:
    """timm's own test models (a ViT and a ResNet), random weights saved to files."""
    import timm

    directory = tmp_path_factory.mktemp("timm")
    files = {}
    for name in ("test_vit", "test_resnet"):
        torch.manual_seed(2)
        files[name] = str(directory / f"{name}.pth")
        torch.save(timm.create_model(name, pretrained=False).state_dict(), files[name])
    return files


def _tiny_blip2_config():
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
        num_query_tokens=4)


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    """A whole Blip2ForConditionalGeneration (vision model, Q-Former, language model) saved in small shards."""
    from transformers import Blip2ForConditionalGeneration

    directory = tmp_path_factory.mktemp("blip2")
    torch.manual_seed(3)
    model = Blip2ForConditionalGeneration(_tiny_blip2_config()).eval()
    model.save_pretrained(directory, max_shard_size="100KB")
    return str(directory), model


@pytest.fixture(scope="module")
def tiny_sentence_transformer(tmp_path_factory) -> str:
    """A 1-layer BERT with the offline MiniLM tokenizer, saved as a sentence-transformers model (mean pooling)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gmm_model.weights import matcher_location

    root = tmp_path_factory.mktemp("sentence-transformer")
    tokenizer = AutoTokenizer.from_pretrained(matcher_location(ModelStack().matcher))
    torch.manual_seed(4)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    model = SentenceTransformer(modules=[models.Transformer(str(root / "bert")), models.Pooling(32)], device="cpu")
    model.save(str(root / "model"))
    return str(root / "model")


# ---- end to end: encode -> one training step -> trie and free prediction ------------------------------
def train_and_predict(stack: ModelStack, cache_dir) -> tuple:
    encoder = create_encoder(stack)
    visual = encoder.encode(IMAGES)
    assert visual.shape == (len(IMAGES), encoder.num_tokens, encoder.width)
    assert visual.dtype == torch.float32 and torch.isfinite(visual).all()
    assert not torch.allclose(visual[0], visual[1])

    gmm = create_gmm(stack, encoder.width, cache_dir)
    before = gmm.projection.weight.detach().clone()
    optimizer = torch.optim.AdamW(gmm.projection.parameters(), lr=1e-2)
    loss = gmm.loss(visual, NAMES[: len(IMAGES)])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
    assert not torch.equal(gmm.projection.weight, before)  # the projection learned
    assert all(p.grad is None for p in gmm.llm.parameters())  # the LLM stayed frozen

    with torch.no_grad():
        trie = classify(gmm, visual, NAMES, "trie", top_k=2)
        free = classify(gmm, visual, NAMES, "free", matcher=create_matcher(stack), top_k=2)
    assert [len(p.top_k) for p in trie + free] == [2] * 4
    assert all(p.label in NAMES for p in trie + free)
    assert all(-1.0 - 1e-5 <= p.score <= 1.0 + 1e-5 for p in free)
    return encoder, gmm


def test_open_clip_encoder_and_clip_text_matcher(tiny_llm, tiny_clip, tmp_path):
    stack = ModelStack(encoder=f"open_clip:{TINY_CLIP}", encoder_weights=tiny_clip, image_size=48, grid=2,
                       llm=tiny_llm, matcher=f"open_clip:{TINY_CLIP}", matcher_weights=tiny_clip)
    encoder, gmm = train_and_predict(stack, tmp_path)
    assert (encoder.num_tokens, encoder.width) == (4, 48)  # 2 x 2 cells of the ViT's 48-wide patch grid
    assert gmm.projection.weight.shape == (32, 48)
    assert encoder.identity.startswith(f"open_clip:{TINY_CLIP}/tiny-clip.pt:")


def test_open_clip_poolings_and_loaded_weights(tiny_clip):
    import open_clip

    reference = open_clip.create_model(TINY_CLIP, pretrained=tiny_clip).eval()
    cls = create_encoder(ModelStack(encoder=f"open_clip:{TINY_CLIP}", encoder_weights=tiny_clip, image_size=32,
                                    pooling="cls"))
    pixels = cls.preprocess(IMAGES)
    torch.testing.assert_close(cls.encode(IMAGES)[:, 0], reference.encode_image(pixels).detach())  # CLIP's embedding
    every = create_encoder(ModelStack(encoder=f"open_clip:{TINY_CLIP}", encoder_weights=tiny_clip, image_size=32,
                                      pooling="all"))
    assert (cls.num_tokens, cls.width) == (1, 24) and (every.num_tokens, every.width) == (16, 48)  # 32 px / 8 px patches
    assert len({cls.identity, every.identity}) == 2
    with pytest.raises(ValueError, match="needs weights"):
        create_encoder(ModelStack(encoder=f"open_clip:{TINY_CLIP}"))
    with pytest.raises(ValueError, match="cannot load open_clip model"):
        create_encoder(ModelStack(encoder=f"open_clip:{TINY_CLIP}", encoder_weights="no-such-tag"))


def test_clip_text_matcher_cuts_to_the_context(tiny_clip):
    matcher = create_matcher(ModelStack(matcher=f"open_clip:{TINY_CLIP}", matcher_weights=tiny_clip))
    long_text = " ".join(["a very long description of a school bus"] * 40)  # far beyond 77 tokens
    embedded = matcher.embed(["cat", long_text])
    assert embedded.shape == (2, 24)
    torch.testing.assert_close(embedded.norm(dim=1), torch.ones(2))
    assert not hasattr(matcher.model, "visual")  # the image tower is dropped
    assert matcher.identity.startswith(f"open_clip-text:{TINY_CLIP}/tiny-clip.pt:")


def test_timm_vit_all_tokens_bf16_llm_and_sentence_transformer(tiny_llm, tiny_timm, tiny_sentence_transformer, tmp_path):
    stack = ModelStack(encoder="timm:test_vit", encoder_weights=tiny_timm["test_vit"], image_size=64, pooling="all",
                       llm=tiny_llm, llm_dtype="bfloat16", matcher=tiny_sentence_transformer)
    encoder, gmm = train_and_predict(stack, tmp_path)
    assert (encoder.num_tokens, encoder.width) == (16, 64)  # every patch of a 4 x 4 grid (64 px / 16 px)
    assert gmm.llm.dtype == torch.bfloat16 and gmm.projection.weight.dtype == torch.float32
    # the weights are the saved ones, and "all" is exactly the normalised patch tokens of timm's forward
    import timm

    reference = timm.create_model("test_vit", pretrained=False)
    reference.load_state_dict(torch.load(tiny_timm["test_vit"]))
    reference.set_input_size(img_size=64)
    with torch.no_grad():
        patches = reference.eval().forward_features(encoder.preprocess(IMAGES))[:, reference.num_prefix_tokens:]
    torch.testing.assert_close(encoder.encode(IMAGES), patches)


def test_timm_resnet_cls_with_chat_template(tiny_llm, tiny_timm, tiny_clip, tmp_path):
    stack = ModelStack(encoder="timm:test_resnet", encoder_weights=tiny_timm["test_resnet"], image_size=64,
                       pooling="cls", llm=tiny_llm, chat_template=True,
                       matcher=f"open_clip:{TINY_CLIP}", matcher_weights=tiny_clip)
    encoder, gmm = train_and_predict(stack, tmp_path)
    assert (encoder.num_tokens, encoder.width) == (1, 96)  # the ResNet's global pool
    fmt = gmm.tokens.format
    assert fmt.prefix.startswith("<|im_start|>") and "<|im_start|>user\nWhat is this photo of? Image:" in fmt.prefix
    assert fmt.suffix.endswith("<|im_end|>\n<|im_start|>assistant\n")
    grid = create_encoder(stack.model_copy(update={"pooling": "grid", "grid": 1}))
    assert grid.num_tokens == 1 and grid.identity != encoder.identity  # same shape, different features
    with pytest.raises(ValueError, match="does not exist"):
        create_encoder(stack.model_copy(update={"encoder_weights": "/no/such/file.pth"}))


def test_blip2_qformer_from_sharded_checkpoint_with_minigpt4_projection(tiny_llm, tiny_blip2, tiny_sentence_transformer,
                                                                        tmp_path):
    directory, reference = tiny_blip2
    index = json.loads(open(os.path.join(directory, "model.safetensors.index.json")).read())["weight_map"]
    shards = {}
    for key, shard in index.items():
        shards.setdefault(shard, set()).add(key.split(".")[0])
    language_only = [s for s, owners in shards.items() if owners <= {"language_model", "language_projection"}]
    assert language_only  # precondition: some shards hold nothing the encoder needs ...
    for shard in language_only:  # ... so they may be absent: they are never read
        os.remove(os.path.join(directory, shard))

    llm_width = 32
    minigpt4 = tmp_path / "prerained_minigpt4_7b.pth"
    torch.manual_seed(5)
    proj = {"llama_proj.weight": torch.randn(llm_width, 32), "llama_proj.bias": torch.randn(llm_width)}
    torch.save({"model": {**proj, "llama_model.lm_head.weight": torch.zeros(2, 2)}}, minigpt4)

    stack = ModelStack(encoder=f"blip2:{directory}", image_size=32, pooling="all", llm=tiny_llm,
                       matcher=tiny_sentence_transformer, projection_init=str(minigpt4))
    encoder = create_encoder(stack)
    assert (encoder.num_tokens, encoder.width) == (4, 32)  # num_query_tokens x Q-Former width
    # the tokens are the Q-Former output of transformers' own BLIP-2 forward of the saved model
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=encoder.preprocess(IMAGES)).qformer_outputs
    torch.testing.assert_close(encoder.encode(IMAGES), expected.last_hidden_state)

    gmm = create_gmm(stack, encoder.width, tmp_path)
    torch.testing.assert_close(gmm.projection.weight, proj["llama_proj.weight"])  # MiniGPT-4's llama_proj
    torch.testing.assert_close(gmm.projection.bias, proj["llama_proj.bias"])
    train_and_predict(stack, tmp_path)

    with pytest.raises(ValueError, match="use pooling=all"):
        create_encoder(stack.model_copy(update={"pooling": "grid"}))
    with pytest.raises(ValueError, match="not a Blip2 checkpoint: its config.json has model_type 'llama'"):
        create_encoder(stack.model_copy(update={"encoder": f"blip2:{tiny_llm}"}))
    with pytest.raises(ValueError, match="has no config.json"):
        create_encoder(stack.model_copy(update={"encoder": f"blip2:{tmp_path}"}))
    os.remove(os.path.join(directory, sorted(s for s in shards if s not in language_only)[0]))
    with pytest.raises(ValueError, match="has no model-0000"):  # a shard it needs is missing
        create_encoder(stack)


# ---- MiniGPT-4 projection checkpoints -----------------------------------------------------------------
def test_minigpt4_projection_key_mapping(tmp_path):
    weight, bias = torch.randn(8, 6), torch.randn(8)
    bare = tmp_path / "bare.pth"
    torch.save({"llama_proj.weight": weight, "llama_proj.bias": bias}, bare)
    loaded = Projection(6, 8).load_pretrained(bare)
    assert torch.equal(loaded.weight, weight) and torch.equal(loaded.bias, bias)
    with pytest.raises(ValueError, match="shapes"):
        Projection(6, 16).load_pretrained(bare)
    other = tmp_path / "other.pth"
    torch.save({"model": {"proj.weight": weight}}, other)
    with pytest.raises(ValueError, match="not a MiniGPT-4 checkpoint"):
        Projection(6, 8).load_pretrained(other)
    ours = tmp_path / "ours.safetensors"
    loaded.save_file(ours)
    assert torch.equal(Projection(6, 8).load_pretrained(ours).weight, weight)
    with pytest.raises(ValueError, match="does not exist"):
        Projection(6, 8).load_pretrained(tmp_path / "absent.pth")


# ---- LLM options ----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantised_llm_needs_cuda(tiny_llm, tmp_path, bits):
    with pytest.raises(ValueError, match=f"{bits} LLM loading needs a CUDA GPU"):
        load_frozen_llm(tiny_llm, tmp_path, quantization=bits)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        create_gmm(ModelStack(llm=tiny_llm, llm_quantization=bits), 8, tmp_path)


def test_chat_format_needs_a_template(tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_format(ModelStack().prompt, tokenizer)


def test_bos_leads_the_prompt_once_when_the_tokenizer_uses_one(tiny_llm):
    """LLaMA-style tokenizers start every text with BOS (MiniGPT-4 prepends it too); SmolLM2's adds none."""
    from transformers import AutoTokenizer

    from gmm_model.prompt import PromptTokens

    fmt = ModelStack().prompt
    plain = AutoTokenizer.from_pretrained(tiny_llm)
    question = plain(fmt.prefix, add_special_tokens=False).input_ids
    assert PromptTokens(plain, fmt).prefix == question  # the offline stack's prompt is unchanged
    with_bos = AutoTokenizer.from_pretrained(tiny_llm, add_bos_token=True)
    bos = with_bos.bos_token_id
    assert PromptTokens(with_bos, fmt).prefix == [bos] + question
    chat = PromptTokens(with_bos, chat_format(fmt, with_bos)).prefix  # the template already starts with it
    assert chat[0] == bos and chat[1] != bos


# ---- stacks, presets, fingerprints ----------------------------------------------------------------------
def test_offline_small_fingerprint_and_identity_are_unchanged():
    """The shipped assets/aligned/1b73d88d6e5b.safetensors and every feature cache are keyed by these."""
    assert PRESETS["offline-small"] == ModelStack()
    assert PRESETS["offline-small"].fingerprint == "1b73d88d6e5b"
    assert create_encoder(ModelStack()).identity == "efficientnet-lite0-imagenet@112px/grid2/norm0.5"


def test_new_fields_change_the_fingerprint_only_when_set():
    base = ModelStack()
    assert ModelStack(pooling="grid", llm_dtype="float32", chat_template=False).fingerprint == base.fingerprint
    changed = [ModelStack(pooling="all"), ModelStack(llm_dtype="bfloat16"), ModelStack(chat_template=True),
               ModelStack(llm_quantization="4bit"), ModelStack(projection_init="x.pth"), ModelStack(grid=3)]
    assert len({s.fingerprint for s in changed} | {base.fingerprint}) == len(changed) + 1
    assert len({p.fingerprint for p in PRESETS.values()}) == len(PRESETS)


def test_weights_fields_belong_to_their_models():
    with pytest.raises(ValidationError, match="encoder_weights applies to open_clip: and timm:"):
        ModelStack(encoder_weights="file.pt")
    with pytest.raises(ValidationError, match="matcher_weights applies to open_clip:"):
        ModelStack(matcher_weights="openai")
    with pytest.raises(ValueError, match="unknown encoder 'clip:ViT-B-16'"):
        create_encoder(ModelStack(encoder="clip:ViT-B-16"))


def test_presets_selectable_from_the_experiment_config():
    from cil_platform.config import ExperimentConfig, apply_override, load_config

    tree: dict = {}
    apply_override(tree, "model.preset=paper-minigpt4-vicuna7b")
    apply_override(tree, "model.llm_quantization=4bit")
    stack = ExperimentConfig.model_validate(tree).stack
    assert stack.encoder == "blip2:Salesforce/blip2-flan-t5-xxl" and stack.pooling == "all"
    assert stack.llm == "lmsys/vicuna-7b-v1.3" and stack.llm_quantization == "4bit"
    assert stack.matcher == "open_clip:ViT-B-16" and stack.matcher_weights == "openai"
    for name, preset in PRESETS.items():
        assert ExperimentConfig.model_validate({"model": name}).stack == preset
    for shipped in ("configs/demo.yaml", "configs/imagenet-r.yaml"):  # the shipped configs take the override too
        stack = load_config(shipped, ["dataset.path=/data", "model.preset=paper-minigpt4-vicuna7b",
                                      "model.projection_init=/ckpt/prerained_minigpt4_7b.pth"]).stack
        assert stack == PRESETS["paper-minigpt4-vicuna7b"].model_copy(
            update={"projection_init": "/ckpt/prerained_minigpt4_7b.pth"})
