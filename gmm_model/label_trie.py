"""A prefix trie over the token sequences of class names, for decoding that can only emit a valid class."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrieNode:
    children: dict[int, "TrieNode"] = field(default_factory=dict)
    classes: list[int] = field(default_factory=list)  # every class whose sequence passes through here


class LabelTrie:
    """Token-level trie; `sequences[c]` is the full token sequence of class c (GMM.label_trie: name, terminator, eos)."""

    def __init__(self, sequences: list[list[int]]):
        if len({tuple(s) for s in sequences}) != len(sequences):
            raise ValueError("two classes tokenise to the same sequence; class names must be distinct")
        self.root = TrieNode()
        for index, sequence in enumerate(sequences):
            if not sequence:
                raise ValueError(f"class {index} has an empty token sequence")
            node = self.root
            node.classes.append(index)
            for token in sequence:
                node = node.children.setdefault(token, TrieNode())
                node.classes.append(index)

    @staticmethod
    def resolved(node: TrieNode) -> int | None:
        """The class a node determines, once only one class passes through it."""
        return node.classes[0] if len(node.classes) == 1 else None
