"""Naming rules for the stage-1 alignment corpus (scripts/build_alignment_corpus.py builds it).

Registry clip-art comes with file names such as `canguro_architetto_franc_01.png` (Italian title, author,
counter) or a description such as "A chimpanzee.". Alignment needs short English names, and it must never
see an evaluation class: the point of stage 1 is that the model can name classes it was never aligned on.
So a name is kept only when it is an English noun phrase (a lemma of the ImageNet-21k WordNet table that
timm ships, or a short English description), and a class is dropped when it collides with a reserved name:
the same words, or one name's words inside the other's ("red apple" vs "apple", "bus" vs "school bus"),
compared after folding case, a leading article and plural endings.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

ARTICLES = ("a", "an", "the", "some")
MAX_WORDS = 3
MIN_CHARS = 3
# lemmas that name a colour or nothing visible (WordNet has a noun for each): never a picture's name
NOT_OBJECTS = frozenset({"black", "blue", "brown", "empty", "gold", "gray", "green", "grey", "open", "pink",
                         "purple", "red", "silver", "white", "yellow"})
_SPLIT = re.compile(r"[\s_\-.,]+")
_ENGLISH = re.compile(r"^[a-z][a-z' ]*[a-z]$")


def english_vocabulary(lemmas: dict[str, str]) -> frozenset[str]:
    """Every lemma of a {wnid: "lemma, lemma, ..."} table, lower-cased: the words a name may be made of."""
    return frozenset(lemma.strip().lower() for line in lemmas.values() for lemma in line.split(",")
                     if lemma.strip())


def stem_words(stem: str) -> list[str]:
    """A file stem's words, lower-case, digits removed ("star_95pt06step" -> ["star", "ptstep"])."""
    return [w for w in (re.sub(r"\d+", "", part) for part in _SPLIT.split(stem.lower())) if w]


def name_from_stem(stem: str, vocabulary: frozenset[str]) -> str | None:
    """The longest leading run of words (at most MAX_WORDS) that is a vocabulary lemma, tried on each side
    of a " - " ("stara_ksiega_-_old_book_01" -> "old book"); None when no side starts with a lemma."""
    best = None
    for side in re.split(r"_-_| - ", stem):
        words = stem_words(side)
        for n in range(min(MAX_WORDS, len(words)), 0, -1):
            candidate = " ".join(words[:n])
            if candidate in vocabulary and usable(candidate):
                if best is None or len(candidate.split()) > len(best.split()):
                    best = candidate
                break
    return best


def name_from_description(text: str) -> str | None:
    """A short English description ("A chimpanzee." -> "chimpanzee"); None for a sentence, digits or symbols."""
    words = text.strip().rstrip(".!").lower().split()
    if words and words[0] in ARTICLES:
        words = words[1:]
    candidate = " ".join(words)
    return candidate if 0 < len(words) <= MAX_WORDS and usable(candidate) else None


def usable(name: str) -> bool:
    """Plain lower-case English letters (spaces, apostrophes), at least MIN_CHARS long, not in NOT_OBJECTS."""
    return len(name) >= MIN_CHARS and bool(_ENGLISH.match(name)) and name not in NOT_OBJECTS


def _fold(word: str) -> str:
    """A plural to its singular, roughly and the same way on both sides of a comparison."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def name_key(name: str) -> tuple[str, ...]:
    """The words a collision is decided on: lower-case, no leading article, plural endings folded."""
    words = [w for w in re.split(r"[^a-z0-9']+", name.lower()) if w]
    if words and words[0] in ARTICLES:
        words = words[1:]
    return tuple(_fold(w) for w in words)


def _contains(longer: tuple[str, ...], shorter: tuple[str, ...]) -> bool:
    n = len(shorter)
    return n > 0 and any(longer[i:i + n] == shorter for i in range(len(longer) - n + 1))


def collides(name: str, reserved_keys: Iterable[tuple[str, ...]]) -> bool:
    """Whether `name` names the same thing as a reserved name, or one's words contain the other's."""
    key = name_key(name)
    return any(_contains(key, other) or _contains(other, key) for other in reserved_keys)


def disjoint_classes(names: Iterable[str], reserved: Iterable[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped): the sorted distinct `names` that collide with no reserved name, and those that do."""
    reserved_keys = {name_key(r) for r in reserved}
    kept, dropped = [], []
    for name in sorted(set(names)):
        (dropped if collides(name, reserved_keys) else kept).append(name)
    return kept, dropped
