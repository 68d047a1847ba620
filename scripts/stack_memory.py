"""Parameter counts and weight memory of the model-stack presets (the table in docs/model_stacks.md).

How: every component is built on PyTorch's meta device from its architecture config (nothing is
downloaded or allocated) and its parameters are counted; memory = parameters x bytes per parameter of
the dtype it is loaded in (float32 4, bfloat16 2, 8-bit 1, 4-bit 0.5). Weights only: activations, the
KV cache and the projection's optimizer state come on top. Configs of hub models that are not on this
machine are written out below from their config.json on the Hugging Face hub.

    python scripts/stack_memory.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 1024 ** 3
BYTES = {"float32": 4, "bfloat16": 2, "8bit": 1, "4bit": 0.5}


def count(build) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def eva_vit_g_qformer() -> int:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

    qformer = Blip2QFormerConfig()  # BLIP-2's defaults are the EVA ViT-g / Q-Former of every Salesforce/blip2-* checkpoint
    return (count(lambda: Blip2VisionModel(Blip2VisionConfig())) + count(lambda: Blip2QFormerModel(qformer))
            + 32 * qformer.hidden_size)


def causal_lm(**config) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.pop("model_type")
    return count(lambda: AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)))


def open_clip_towers(name: str) -> tuple[int, int]:
    """(image tower, text tower) parameters of an open_clip model."""
    import open_clip

    total = count(lambda: open_clip.create_model(name, device="meta"))
    visual = count(lambda: open_clip.create_model(name, device="meta").visual)
    return visual, total - visual


def offline_components() -> dict[str, int]:
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from gmm_model import ModelStack
    from gmm_model.llm import prepare_llm
    from gmm_model.weights import matcher_location

    net = count(lambda: EfficientNet.from_name("efficientnet-lite0"))
    llm_dir = prepare_llm(ModelStack().llm, os.path.expanduser(os.environ.get("GMM_CIL_CACHE", "~/.cache/gmm-cil"))).location
    llm = count(lambda: AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm_dir)))
    minilm = count(lambda: AutoModel.from_config(AutoConfig.from_pretrained(matcher_location(ModelStack().matcher))))
    return {"EfficientNet-Lite0": net, "SmolLM2-135M": llm, "all-MiniLM-L6-v2": minilm}


def main() -> None:
    offline = offline_components()
    clip_image, clip_text = open_clip_towers("ViT-B-16")
    import timm

    convnext = count(lambda: timm.create_model("convnext_tiny", pretrained=False))
    vicuna = causal_lm(model_type="llama")  # LlamaConfig's defaults are LLaMA-7B, the base of Vicuna-7B v1.3
    qwen = causal_lm(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    smol360 = causal_lm(model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
                        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True)
    stacks = {
        "offline-small": [("EfficientNet-Lite0", offline["EfficientNet-Lite0"], "float32"),
                          ("SmolLM2-135M-Instruct", offline["SmolLM2-135M"], "float32"),
                          ("all-MiniLM-L6-v2", offline["all-MiniLM-L6-v2"], "float32")],
        "paper-minigpt4-vicuna7b": [("EVA ViT-g + Q-Former", eva_vit_g_qformer(), "float32"),
                                    ("Vicuna-7B", vicuna, "bfloat16"),
                                    ("CLIP ViT-B/16 text tower", clip_text, "float32")],
        "clip-vitb16-qwen2.5-1.5b": [("CLIP ViT-B/16 image tower", clip_image, "float32"),
                                     ("Qwen2.5-1.5B-Instruct", qwen, "bfloat16"),
                                     ("CLIP ViT-B/16 text tower", clip_text, "float32")],
        "timm-convnext-tiny-smollm2-360m": [("ConvNeXt-Tiny", convnext, "float32"),
                                            ("SmolLM2-360M-Instruct", smol360, "float32"),
                                            ("all-MiniLM-L6-v2", offline["all-MiniLM-L6-v2"], "float32")],
    }
    print("| preset | component | parameters | dtype | weights |")
    print("|---|---|---|---|---|")
    for preset, parts in stacks.items():
        total = 0.0
        for name, params, dtype in parts:
            size = params * BYTES[dtype]
            total += size
            print(f"| {preset} | {name} | {params / 1e6:,.1f} M | {dtype} | {size / GIB:.2f} GiB |")
        print(f"| {preset} | **total** | | | **{total / GIB:.2f} GiB** |")
    print(f"\nVicuna-7B at 8-bit: {vicuna * BYTES['8bit'] / GIB:.2f} GiB, at 4-bit: {vicuna * BYTES['4bit'] / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
