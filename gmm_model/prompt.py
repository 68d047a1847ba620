"""How an image becomes a question and a label becomes an answer, as token ids.

Template, label and terminator are tokenised as separate pieces and concatenated, so the sequence a
class is trained on is exactly the sequence the constrained decoder walks. The text itself is a
gmm_model.spec.PromptFormat.
"""
from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from .spec import PromptFormat


IMAGE_MARK = "<|gmm-image|>"  # stands in for the visual tokens while the chat template is applied


def chat_format(fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """`fmt` with the question wrapped in the tokenizer's chat template: prefix + image + suffix become
    one user turn, and the answer follows the assistant's generation prompt, as the chat model was tuned.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this LLM's tokenizer has no chat template; use chat_template: false")
    text = tokenizer.apply_chat_template([{"role": "user", "content": fmt.prefix + IMAGE_MARK + fmt.suffix}],
                                         tokenize=False, add_generation_prompt=True)
    before, found, after = text.partition(IMAGE_MARK)
    if not found or IMAGE_MARK in after:
        raise ValueError(f"the chat template does not keep the user message intact: {text!r}")
    return replace(fmt, prefix=before, suffix=after)


def leading_bos(tokenizer: PreTrainedTokenizerBase, prefix: list[int]) -> list[int]:
    """[bos] when the tokenizer starts every text with it (LLaMA, Vicuna, Mistral: as MiniGPT-4 does) and the
    prefix (e.g. from a chat template) does not already; [] for tokenizers that add none (SmolLM2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a").input_ids[:1] != [bos] or prefix[:1] == [bos]:
        return []
    return [bos]


class PromptTokens:
    """Token ids of one PromptFormat under one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat):
        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False).input_ids

        self.format = fmt
        prefix = ids(fmt.prefix)
        self.prefix = leading_bos(tokenizer, prefix) + prefix
        self.suffix = ids(fmt.suffix)
        self.template = ids(fmt.answer_template)
        self.terminator = ids(fmt.terminator)
        self.eos = tokenizer.eos_token_id
        self._ids = ids

    def label_sequence(self, name: str) -> list[int]:
        """" {name}" + terminator: what follows the template for this class."""
        return self._ids(" " + name) + self.terminator

    def answer(self, name: str) -> list[int]:
        return self.template + self.label_sequence(name) + [self.eos]

    def strip_answer(self, text: str) -> str:
        """The label part of a generated answer: template prefix and terminator removed."""
        text = text.strip()
        template = self.format.answer_template.strip()
        if text.lower().startswith(template.lower()):
            text = text[len(template):]
        text = text.strip()
        if self.format.terminator and text.endswith(self.format.terminator):
            text = text[: -len(self.format.terminator)]
        return text.strip()
