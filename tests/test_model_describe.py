"""Descriptions on the real small stack (`GMM.continue_answers`, `classify(..., describe_tokens=N)`): the answer is
kept, the continuation is what greedy decoding over full forward passes writes after it, batches equal single
samples whatever their answer lengths, the bound holds, and bad arguments are refused."""
from __future__ import annotations

import pytest
import torch

from gmm_model.classify import classify
from tests.test_model_decoding import CHAT, CLASSES, gmm, text_image_gmm  # noqa: F401  (gmm: the module fixture)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@torch.no_grad()
def reference_continuation(model, visual: torch.Tensor, answer: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens after `answer`, each from a full forward over the whole sequence (no cache), the end token
    not allowed first: what `continue_answers` must equal."""
    table = model.llm.get_input_embeddings()
    ids = torch.tensor(answer)
    written: list[int] = []
    for step in range(max_new_tokens):
        prefix = table(torch.tensor(model.tokens.prefix))[None]
        embeds = torch.cat([prefix, model.image_embeds(visual[None]), table(torch.cat([ids, torch.tensor(written,
                                                                                      dtype=torch.long)]))[None]], 1)
        logits = model.llm(inputs_embeds=embeds).logits[0, -1]
        if step == 0:
            logits[model.tokens.eos] = float("-inf")
        token = int(logits.argmax())
        if token == model.tokens.eos:
            break
        written.append(token)
    return written


def test_continuation_is_greedy_decoding_after_the_answer(gmm):  # noqa: F811
    model, visual = text_image_gmm(gmm, ["Count to 5", "Name a color."], CHAT)
    answers = [model.tokenizer("1, 2,", add_special_tokens=False).input_ids, model.tokens.answer("cat")[:-1]]
    got = model.continue_answers(visual, answers, max_new_tokens=10)
    for b, answer in enumerate(answers):
        expected = reference_continuation(model, visual[b], answer, 10)
        assert got[b].tokens == len(expected) and got[b].text == model.tokenizer.decode(expected).strip()
        assert got[b].ended == (len(expected) < 10)
    assert got[0].text.startswith("3")  # it reads "Count to 5" and goes on counting after "1, 2,"


def test_batches_of_mixed_answer_lengths_equal_each_sample_alone(gmm):  # noqa: F811
    model, visual = text_image_gmm(gmm, ["Yes or no?", "Count to 5", "Capital of France?"], CHAT)
    answers = [model.tokens.answer(name)[:-1] for name in ("bus", "school bus", "hot dog")]
    assert len({len(a) for a in answers}) > 1  # precondition: the batch has to be split by length
    together = model.continue_answers(visual, answers, max_new_tokens=8)
    alone = [model.continue_answers(visual[b: b + 1], [answers[b]], max_new_tokens=8)[0] for b in range(3)]
    assert together == alone
    assert all(1 <= c.tokens <= 8 and (c.ended or c.tokens == 8) for c in together)


def test_the_end_token_is_not_taken_straight_after_the_answer(gmm):  # noqa: F811
    model, visual = text_image_gmm(gmm, ["Yes or no?"], CHAT)
    answer = model.tokenizer("Yes.", add_special_tokens=False).input_ids
    assert model.continue_answers(visual, [answer], max_new_tokens=1)[0].tokens == 1
    assert model.generate(visual, max_new_tokens=4) == ["Yes."]  # where the model itself stops


def test_classify_keeps_the_trie_label_and_describes_after_it(gmm):  # noqa: F811
    model, visual = text_image_gmm(gmm, [" a school bus", " a cat"])
    plain = classify(model, visual, CLASSES, "trie", top_k=3)
    described = classify(model, visual, CLASSES, "trie", top_k=3, describe_tokens=6)
    assert [p.label for p in plain] == ["school bus", "cat"]
    for before, after in zip(plain, described):
        assert (after.label, after.score, after.text, after.top_k) == (before.label, before.score, before.text,
                                                                       before.top_k)
        assert before.description is None and after.description is not None
    expected = model.continue_answers(visual, [model.tokens.answer(p.label)[:-1] for p in plain], 6)
    assert [p.description for p in described] == expected


def test_bad_arguments_are_refused(gmm):  # noqa: F811
    visual = torch.zeros(2, 4, 1280)
    answer = gmm.tokens.answer("cat")[:-1]
    with pytest.raises(ValueError, match="2 images"):
        gmm.continue_answers(visual, [answer], 4)
    with pytest.raises(ValueError, match="at least 1"):
        gmm.continue_answers(visual, [answer, answer], 0)
    with pytest.raises(ValueError, match="at least one token"):
        gmm.continue_answers(visual, [answer, []], 4)
