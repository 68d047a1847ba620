"""How an image becomes a question and a label becomes an answer, as token ids.

Template, label and terminator are tokenised as separate pieces and concatenated, so the sequence a
class is trained on is exactly the sequence the constrained decoder walks.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


def normalise_class_name(name: str) -> str:
    """NFC, single spaces, no surrounding whitespace; refuse names that are empty after that."""
    cleaned = " ".join(unicodedata.normalize("NFC", str(name)).split())
    if not cleaned:
        raise ValueError(f"class name {name!r} is empty after normalising whitespace")
    return cleaned


@dataclass(frozen=True)
class PromptFormat:
    """The text around the visual tokens and the answer template (the paper's question and answer).

    The question sits before the image: text that precedes the image is the same for every sample,
    so its keys and values are computed once and reused, and only the image, `suffix` and answer
    tokens cost compute per sample.
    """

    prefix: str = "What is this photo of? Image:"
    suffix: str = "\n"
    answer_template: str = "This is a photo of a"
    terminator: str = "."


class PromptTokens:
    """Token ids of one PromptFormat under one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat):
        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False).input_ids

        self.tokenizer, self.format = tokenizer, fmt
        self.prefix = ids(fmt.prefix)
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
