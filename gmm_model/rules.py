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
    TRIE_PRIOR_RIDGE = "trie+prior+ridge"

    @property
    def trie(self) -> bool:
        return self is not Rule.FREE

    @property
    def prior(self) -> bool:
        return self in (Rule.TRIE_PRIOR, Rule.TRIE_PRIOR_PROTOTYPES, Rule.TRIE_PRIOR_RIDGE)

    @property
    def prototypes(self) -> bool:
        return self in (Rule.TRIE_PROTOTYPES, Rule.TRIE_PRIOR_PROTOTYPES)

    @property
    def ridge(self) -> bool:
        return self is Rule.TRIE_PRIOR_RIDGE

    @property
    def fused(self) -> bool:
        """Ranks by a fused score computed from the first-token scores (no trie walk of its own)."""
        return self.prototypes or self.ridge

    @classmethod
    def of(cls, decode: str, prior: bool = False, prototypes: bool = False, ridge: bool = False) -> "Rule":
        """The rule of a decoding mode and its corrections (trie only; the ridge fusion only with the prior and
        instead of the prototypes)."""
        if decode == "free":
            return cls.FREE
        if decode != "trie":
            raise ValueError(f"unknown decoding mode {decode!r}; use trie or free")
        if ridge and (prototypes or not prior):
            raise ValueError("ridge fusion is defined with the prior and without the prototypes: trie+prior+ridge")
        return cls("trie" + ("+prior" if prior else "") + ("+prototypes" if prototypes else "")
                   + ("+ridge" if ridge else ""))
