"""The decoding rules, as a typed value: torch-free, so configs, manifests and the serving API name them cheaply.
What each rule does is in classify.py."""
from __future__ import annotations

from enum import Enum


class Rule(str, Enum):
    FREE = "free"
    TRIE = "trie"
    TRIE_PRIOR = "trie+prior"
    TRIE_PROTOTYPES = "trie+prototypes"
    TRIE_PRIOR_PROTOTYPES = "trie+prior+prototypes"

    @property
    def trie(self) -> bool:
        return self is not Rule.FREE

    @property
    def prior(self) -> bool:
        return self in (Rule.TRIE_PRIOR, Rule.TRIE_PRIOR_PROTOTYPES)

    @property
    def prototypes(self) -> bool:
        return self in (Rule.TRIE_PROTOTYPES, Rule.TRIE_PRIOR_PROTOTYPES)

    @classmethod
    def of(cls, decode: str, prior: bool = False, prototypes: bool = False) -> "Rule":
        """The rule of a decoding mode and its two corrections (prior and prototypes apply to trie only)."""
        if decode == "free":
            return cls.FREE
        if decode != "trie":
            raise ValueError(f"unknown decoding mode {decode!r}; use trie or free")
        return cls("trie" + ("+prior" if prior else "") + ("+prototypes" if prototypes else ""))
