"""Decoding on the real small stack: batched stopping, the label trie, constrained decoding against a
brute-force reference, the classify API and the text matcher.

To get meaningful (not random) model behaviour without training, some tests use a "text image": the
projection maps one-hot visual tokens to the LLM's own token embeddings, so an "image" is literally a
piece of text the LLM reads in place of the picture.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from gmm_model import GMM, ModelStack, Projection, PromptFormat, TextMatcher, create_gmm, create_matcher
from gmm_model.label_trie import LabelTrie
from gmm_model.model import cut_at_eos, first_tokens, greedy_step
from gmm_model.classify import ClassifierStats, classify

CACHE_DIR = os.environ.get("GMM_CIL_CACHE", os.path.expanduser("~/.cache/gmm-cil"))
VISUAL_WIDTH = 1280
CLASSES = ["bus", "bus stop", "school bus", "cat", "hot dog"]  # "bus" is a prefix of "bus stop"


@pytest.fixture(scope="module")
def gmm() -> GMM:
    torch.set_num_threads(1)
    return create_gmm(ModelStack(), VISUAL_WIDTH, CACHE_DIR)


@pytest.fixture(scope="module")
def matcher() -> TextMatcher:
    torch.set_num_threads(1)
    return create_matcher(ModelStack())


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _visual(batch: int, tokens: int = 4, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(batch, tokens, VISUAL_WIDTH, generator=torch.Generator().manual_seed(seed))


def text_image_gmm(gmm: GMM, texts: list[str], fmt: PromptFormat | None = None) -> tuple[GMM, torch.Tensor]:
    """A GMM sharing the frozen LLM whose projection turns one-hot visual tokens into token embeddings,
    and the visual tokens that spell `texts` (short texts are padded by repeating their last token)."""
    tok = gmm.tokenizer
    table = gmm.llm.get_input_embeddings().weight
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    vocab = sorted({i for seq in ids for i in seq})
    assert len(vocab) <= VISUAL_WIDTH
    projection = Projection(VISUAL_WIDTH, gmm.llm.config.hidden_size)
    with torch.no_grad():
        projection.weight.zero_()
        projection.bias.zero_()
        for column, token in enumerate(vocab):
            projection.weight[:, column] = table[token]
    width = max(map(len, ids))
    visual = torch.zeros(len(texts), width, VISUAL_WIDTH)
    for b, seq in enumerate(ids):
        for position, token in enumerate(seq + [seq[-1]] * (width - len(seq))):
            visual[b, position, vocab.index(token)] = 1.0
    return GMM(gmm.llm, tok, projection, fmt or gmm.tokens.format), visual


# ---- 3. batched stopping -------------------------------------------------------------------------
def test_greedy_step_semantics():
    eos, pad = 2, 0
    logits = torch.full((4, 10), -1.0)
    logits[0, 5] = logits[1, eos] = logits[2, 7] = logits[3, eos] = 1.0
    finished = torch.tensor([False, False, True, True])
    token, now = greedy_step(logits, finished, eos, pad)
    assert token.tolist() == [5, eos, pad, pad]  # finished samples emit padding, whatever they'd say
    assert now.tolist() == [False, True, True, True]  # sample 1 finishes on its own eos only
    assert finished.tolist() == [False, False, True, True]  # input not modified in place
    # next step: sample 0 continues although the others are done
    token, now = greedy_step(logits, now, eos, pad)
    assert token.tolist() == [5, pad, pad, pad]
    assert now.tolist() == [False, True, True, True]


def test_cut_at_eos():
    assert cut_at_eos([4, 5, 2, 2, 2], 2) == [4, 5]
    assert cut_at_eos([4, 5, 6], 2) == [4, 5, 6]
    assert cut_at_eos([2, 7], 2) == []


def test_generate_batch_equals_each_sample_alone_random(gmm):
    visual = _visual(4, seed=10, scale=3.0)
    batched = gmm.generate(visual, max_new_tokens=12)
    alone = [gmm.generate(visual[b: b + 1], max_new_tokens=12)[0] for b in range(4)]
    assert batched == alone
    assert all(text.strip() for text in batched)


CHAT = PromptFormat(prefix="<|im_start|>user\n", suffix="<|im_end|>\n<|im_start|>assistant\n")


def test_generate_does_not_stop_when_first_sample_ends(gmm):
    """Sample 0 answers in two tokens then eos; the others keep going and must not be cut short."""
    model, visual = text_image_gmm(gmm, ["Yes or no?", "Count to 5", "Capital of France?", "Name a color."], CHAT)
    noise = _visual(1, tokens=visual.shape[1], seed=11, scale=3.0)
    visual = torch.cat([visual, noise])  # a fifth, random sample
    alone = [model.generate(visual[b: b + 1], max_new_tokens=12)[0] for b in range(visual.shape[0])]
    assert alone[0] == "Yes."  # precondition: sample 0 really does end early ...
    assert alone[2] == "The capital of France is Paris."  # ... another ends later ...
    assert all(len(text) > 12 for text in alone[1:])  # ... and the rest run well past sample 0's end
    assert model.generate(visual, max_new_tokens=12) == alone
    # order does not matter either: the long-running sample first
    order = [1, 0, 4, 2, 3]
    assert model.generate(visual[order], max_new_tokens=12) == [alone[i] for i in order]


# ---- 4. label trie and constrained decoding ------------------------------------------------------
def test_label_trie_structure():
    trie = LabelTrie([[1, 2, 9], [1, 3, 9], [4, 9]])
    assert trie.root.classes == [0, 1, 2]
    assert sorted(trie.root.children) == [1, 4]
    assert LabelTrie.resolved(trie.root) is None
    shared = trie.root.children[1]
    assert shared.classes == [0, 1] and LabelTrie.resolved(shared) is None
    assert LabelTrie.resolved(shared.children[3]) == 1
    assert LabelTrie.resolved(trie.root.children[4]) == 2
    assert first_tokens(trie) == [1, 1, 4]


def test_label_trie_rejects_duplicates_and_empty():
    with pytest.raises(ValueError, match="same sequence"):
        LabelTrie([[1, 2], [3], [1, 2]])
    with pytest.raises(ValueError, match="empty token sequence"):
        LabelTrie([[1], []])


def test_gmm_label_trie_uses_label_sequences(gmm):
    trie = gmm.label_trie(CLASSES)
    for c, name in enumerate(CLASSES):
        node = trie.root
        for token in gmm.tokens.label_sequence(name):
            node = node.children[token]
        assert LabelTrie.resolved(node) == c
    with pytest.raises(ValueError):
        gmm.label_trie(["cat", "dog", "cat"])


def _teacher_forced_log_probs(gmm: GMM, visual: torch.Tensor, name: str) -> torch.Tensor:
    """log p(. | prompt, template, first d tokens of the label) for every depth d, by a plain full
    forward without any cache: (len(label_sequence), vocab)."""
    t = gmm.tokens
    table = gmm.llm.get_input_embeddings()
    label = t.label_sequence(name)
    ids = lambda seq: table(torch.tensor(seq, dtype=torch.long))  # noqa: E731
    embeds = torch.cat([ids(t.prefix), gmm.projection(visual), ids(t.suffix), ids(t.template + label[:-1])])[None]
    logits = gmm.llm(inputs_embeds=embeds).logits[0, -len(label):]
    return logits.float().log_softmax(-1)


def _reference_greedy_walk(gmm: GMM, visual: torch.Tensor, names: list[str]) -> tuple[int, float, list[float]]:
    """Brute force: teacher-force every class, then walk the trie choosing the argmax allowed child."""
    with torch.no_grad():
        dists = [_teacher_forced_log_probs(gmm, visual, n) for n in names]
    trie = gmm.label_trie(names)
    node, depth, score = trie.root, 0, 0.0
    while True:
        dist = dists[node.classes[0]][depth]  # same context for every class through this node
        allowed = list(node.children)
        values = dist[allowed]
        best = allowed[int(values.argmax())]
        assert float(dist[best]) == float(values.max())  # the greedy invariant, restated
        score += float(dist[best])
        node, depth = node.children[best], depth + 1
        if LabelTrie.resolved(node) is not None:
            first = [float(dists[c][0][gmm.tokens.label_sequence(n)[0]]) for c, n in enumerate(names)]
            return LabelTrie.resolved(node), score, first


@pytest.mark.parametrize("names", [CLASSES, ["bus", "bus stop", "bus driver"], ["cat"]])
def test_decode_constrained_equals_brute_force(gmm, names):
    visual = _visual(4, seed=20, scale=3.0)
    out = gmm.decode_constrained(visual, gmm.label_trie(names))
    assert out.classes.shape == out.log_prob.shape == (4,)
    assert out.first_token_log_prob.shape == (4, len(names))
    for b in range(4):
        cls, score, first = _reference_greedy_walk(gmm, visual[b], names)
        assert int(out.classes[b]) == cls
        assert float(out.log_prob[b]) == pytest.approx(score, abs=1e-3)
        assert out.first_token_log_prob[b].tolist() == pytest.approx(first, abs=1e-3)
        assert float(out.log_prob[b]) <= 0


def test_decode_constrained_always_valid(gmm):
    visual = _visual(8, seed=21, scale=5.0)
    out = gmm.decode_constrained(visual, gmm.label_trie(CLASSES))
    assert out.classes.dtype == torch.long
    assert ((out.classes >= 0) & (out.classes < len(CLASSES))).all()
    assert torch.isfinite(out.log_prob).all()


def test_decode_constrained_reads_the_text_image(gmm):
    """With prefix-related names, the class the "image" spells out is decoded, whatever its length."""
    model, visual = text_image_gmm(gmm, [" a school bus", " a cat", " a bus stop", " a hot dog"])
    out = model.decode_constrained(visual, model.label_trie(CLASSES))
    assert [CLASSES[c] for c in out.classes.tolist()] == ["school bus", "cat", "bus stop", "hot dog"]
    # batch composition does not matter: each alone decodes the same, with the same score (three of the four
    # settle at their first name token, so "bus stop" walks on alone: the batch shrinks mid-walk)
    for b in range(4):
        alone = model.decode_constrained(visual[b: b + 1], model.label_trie(CLASSES))
        assert int(alone.classes[0]) == int(out.classes[b])
        assert float(alone.log_prob[0]) == pytest.approx(float(out.log_prob[b]), abs=1e-4)


def test_first_token_prior_moves_the_first_step_only_where_it_should(gmm):
    model, visual = text_image_gmm(gmm, [" a school bus", " a cat", " a bus stop", " a hot dog"])
    trie = model.label_trie(CLASSES)
    plain = model.decode_constrained(visual, trie)
    assert torch.equal(model.first_token_log_prob(visual, trie), plain.first_token_log_prob)
    # a flat prior changes nothing: only differences between classes count
    flat = model.decode_constrained(visual, trie, torch.full((len(CLASSES),), -3.0))
    assert torch.equal(flat.classes, plain.classes)
    # a prior that makes "cat" look like the model's standing favourite moves the cat image elsewhere,
    # and leaves images whose own evidence is stronger than the penalty as they were
    cat = CLASSES.index("cat")
    prior = torch.zeros(len(CLASSES))
    prior[cat] = 100.0
    moved = model.decode_constrained(visual, trie, prior)
    assert int(plain.classes[1]) == cat and int(moved.classes[1]) != cat
    assert cat not in moved.classes.tolist()
    assert moved.classes[[0, 2, 3]].tolist() == plain.classes[[0, 2, 3]].tolist()
    # the same correction through the classify API
    assert [p.label for p in classify(model, visual, CLASSES, "trie+prior", ClassifierStats(prior))] == \
        [CLASSES[c] for c in moved.classes.tolist()]


# ---- classify ------------------------------------------------------------------------------------
def test_classify_trie_top_k(gmm):
    model, visual = text_image_gmm(gmm, [" a school bus", " a cat", " a bus stop", " a hot dog"])
    results = classify(model, visual, CLASSES, "trie", top_k=3)
    assert [r.label for r in results] == ["school bus", "cat", "bus stop", "hot dog"]
    decoded = model.decode_constrained(visual, model.label_trie(CLASSES))
    for b, r in enumerate(results):
        labels = [label for label, _ in r.top_k]
        assert len(labels) == 3 and len(set(labels)) == 3
        assert labels[0] == r.label and set(labels) <= set(CLASSES)
        assert r.score == pytest.approx(float(decoded.log_prob[b]), abs=1e-5)
        assert r.text == f"This is a photo of a {r.label}."
    # top_k is clamped to the number of classes
    clamped = classify(model, visual[:1], ["cat", "bus"], "trie", top_k=10)[0]
    assert len(clamped.top_k) == 2 and {label for label, _ in clamped.top_k} == {"cat", "bus"}


def test_classify_free_returns_class_names(gmm, matcher):
    model, visual = text_image_gmm(gmm, [" a school bus", " a cat"])
    results = classify(model, visual, CLASSES, "free", matcher=matcher, top_k=2)
    for r in results:
        assert r.label in CLASSES
        assert r.label in r.text  # the generated text names the thing the "image" spells out
        assert len(r.top_k) == 2 and r.top_k[0][0] == r.label
        assert r.top_k[0][1] >= r.top_k[1][1]
        assert -1.0 - 1e-5 <= r.score <= 1.0 + 1e-5
    assert [r.label for r in results] == ["school bus", "cat"]


def test_classify_errors(gmm, matcher):
    visual = _visual(1)
    with pytest.raises(ValueError, match="'beam' is not a valid Rule"):
        classify(gmm, visual, CLASSES, "beam")
    with pytest.raises(ValueError, match="no classes"):
        classify(gmm, visual, [], "trie")
    with pytest.raises(ValueError, match="no classes"):
        classify(gmm, visual, [], "free", matcher=matcher)
    with pytest.raises(ValueError, match="needs a matcher"):
        classify(gmm, visual, CLASSES, "free")


# ---- 5. matcher ----------------------------------------------------------------------------------
def test_strip_answer(gmm):
    t = gmm.tokens
    assert t.strip_answer("This is a photo of a school bus.") == "school bus"
    assert t.strip_answer("  this is a photo of a cat.  ") == "cat"
    assert t.strip_answer("a red car") == "a red car"


def test_matcher_similarity_picks_the_name(matcher):
    sims = matcher.similarities(["school bus"], ["cat", "school bus", "tree"])
    assert sims.shape == (1, 3)
    assert int(sims.argmax()) == 1
    assert float(sims[0, 1]) == pytest.approx(1.0, abs=1e-4)  # unit vectors: cosine of itself
    assert float(sims[0, 0]) < 0.9 and float(sims[0, 2]) < 0.9
    several = matcher.similarities(["a tabby cat", "an oak tree"], ["cat", "school bus", "tree"])
    assert several.argmax(1).tolist() == [0, 2]


def test_matcher_empty_class_list(matcher):
    with pytest.raises(ValueError, match="empty list of class names"):
        matcher.similarities(["cat"], [])


class CountingMatcher(TextMatcher):
    identity = "counting"

    def __init__(self, inner: TextMatcher):
        super().__init__()
        self.inner, self.calls = inner, []

    def embed(self, texts):
        self.calls.append(list(texts))
        return self.inner.embed(texts)


def test_label_bank_caches(matcher):
    counting = CountingMatcher(matcher)
    first = counting.label_bank(["cat", "school bus", "cat"])
    assert counting.calls == [["cat", "school bus"]]  # each distinct name embedded once
    assert first.shape == (3, matcher.embed(["x"]).shape[1])
    torch.testing.assert_close(first[0], first[2])
    again = counting.label_bank(["school bus", "cat"])
    assert counting.calls == [["cat", "school bus"]]  # nothing re-embedded
    torch.testing.assert_close(again, first[[1, 0]])
    counting.label_bank(["cat", "tree"])
    assert counting.calls[-1] == ["tree"]  # only the new name
    # similarities embed the query texts but reuse the bank
    counting.similarities(["a bus"], ["cat", "tree", "school bus"])
    assert counting.calls[-1] == ["a bus"] and len(counting.calls) == 3


@pytest.mark.parametrize("names", [["bus", "bus."], ["st", "st. bernard"]])
def test_every_class_is_decodable_when_a_name_ends_with_the_terminator(gmm, names):
    """Either the trie refuses such class sets, or every class is reachable (some node determines it)."""
    try:
        trie = gmm.label_trie(names)
    except ValueError:
        return
    determined, stack = set(), [trie.root]
    while stack:
        node = stack.pop()
        if LabelTrie.resolved(node) is not None:
            determined.add(LabelTrie.resolved(node))
        stack.extend(node.children.values())
    assert determined == set(range(len(names)))
