"""The one classifier (gmm_model/classify.py) on the real small stack: every rule is what its parts compute, several
rules share one pass, and a rule refuses to run without the statistics it needs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as save_tensors

from gmm_model.classify import ClassifierStats, Rule, classify, classify_rules, fused_scores, ridge_fused_scores
from gmm_model.model import first_tokens
from tests.test_model_decoding import CLASSES, gmm, text_image_gmm  # noqa: F401  (gmm: the module fixture)

TEXTS = [" a school bus", " a cat", " a bus stop", " a hot dog"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reading(gmm):  # noqa: F811
    """A model that reads its "image" as text, the images, and statistics that move the decisions: a prior that
    makes "cat" the model's standing favourite, and prototypes that point each image at the next class."""
    model, visual = text_image_gmm(gmm, TEXTS)
    prior = torch.zeros(len(CLASSES))
    prior[CLASSES.index("cat")] = 100.0
    pooled = torch.nn.functional.normalize(visual.mean(1), dim=1)
    prototypes = torch.zeros(len(CLASSES), visual.shape[-1])
    for b, text in enumerate(TEXTS):  # image b is most similar to the prototype of class b + 1
        prototypes[(CLASSES.index(text[3:]) + 1) % len(CLASSES)] = pooled[b]
    ridge_head = prototypes.roll(1, dims=0)  # image b's ridge score is highest for class b + 2
    return model, visual, ClassifierStats(prior, prototypes, ridge_head, torch.tensor([5.0, 0.5]))


def labels(predictions) -> list[str]:
    return [p.label for p in predictions]


def test_each_rule_is_what_its_parts_compute(reading):
    model, visual, stats = reading
    trie = model.label_trie(CLASSES)
    plain = model.decode_constrained(visual, trie)
    corrected = model.decode_constrained(visual, trie, stats.first_token_prior)
    assert labels(classify(model, visual, CLASSES, "trie", stats)) == [CLASSES[c] for c in plain.classes.tolist()]
    assert labels(classify(model, visual, CLASSES, Rule.TRIE_PRIOR, stats)) == \
        [CLASSES[c] for c in corrected.classes.tolist()]
    assert "cat" in labels(classify(model, visual, CLASSES, "trie", stats))  # the prior really moved something
    assert "cat" not in labels(classify(model, visual, CLASSES, "trie+prior", stats))
    fused = fused_scores(plain.first_token_log_prob - stats.first_token_prior, visual, stats.prototypes).argmax(1)
    assert labels(classify(model, visual, CLASSES, "trie+prior+prototypes", stats)) == \
        [CLASSES[c] for c in fused.tolist()]
    unprioritised = fused_scores(plain.first_token_log_prob, visual, stats.prototypes).argmax(1)
    assert labels(classify(model, visual, CLASSES, "trie+prototypes", stats)) == \
        [CLASSES[c] for c in unprioritised.tolist()]


def test_rules_evaluated_together_give_what_each_gives_alone(reading):
    model, visual, stats = reading
    rules = [Rule.TRIE_PRIOR_PROTOTYPES, Rule.TRIE_PRIOR_RIDGE, Rule.TRIE_PRIOR, Rule.TRIE, Rule.TRIE_PROTOTYPES]
    together = classify_rules(model, visual, CLASSES, rules, stats, top_k=3)
    assert set(together) == set(rules)
    for rule in rules:
        alone = classify(model, visual, CLASSES, rule, stats, top_k=3)
        assert [(p.label, p.top_k) for p in together[rule]] == [(p.label, p.top_k) for p in alone], rule


def test_the_ridge_rule_is_its_fused_score_and_moves_decisions(reading):
    model, visual, stats = reading
    first = model.decode_constrained(visual, model.label_trie(CLASSES)).first_token_log_prob
    expected = ridge_fused_scores(first - stats.first_token_prior, visual, stats.ridge_head, stats.fusion).argmax(1)
    fused = labels(classify(model, visual, CLASSES, "trie+prior+ridge", stats))
    assert fused == [CLASSES[c] for c in expected.tolist()]
    ridge_alone = ClassifierStats(stats.first_token_prior, ridge_head=stats.ridge_head, fusion=torch.tensor([5.0, 0.0]))
    by_ridge = (torch.nn.functional.normalize(visual.mean(1), dim=1) @ stats.ridge_head.T).argmax(1)
    assert labels(classify(model, visual, CLASSES, "trie+prior+ridge", ridge_alone)) == [CLASSES[c] for c in by_ridge]
    assert fused != labels(classify(model, visual, CLASSES, "trie+prior", stats))  # the head really moved something
    generative = ClassifierStats(stats.first_token_prior, ridge_head=stats.ridge_head, fusion=torch.tensor([0.0, 1.0]))
    by_prior = (first - stats.first_token_prior).argmax(1)
    assert labels(classify(model, visual, CLASSES, "trie+prior+ridge", generative)) == [CLASSES[c] for c in by_prior]


def test_the_class_posterior_of_the_loss_is_the_first_token_distribution_renormalised(reading):
    model, visual, _ = reading
    trie = model.label_trie(CLASSES)
    candidates = sorted(set(first_tokens(trie)))
    with torch.no_grad():
        loss, posterior = model.loss_and_class_log_posterior(visual, ["cat"] * len(visual), candidates)
        assert torch.equal(loss, model.loss(visual, ["cat"] * len(visual)))
        full = model._answer_start(visual)[1][:, candidates]
    assert torch.allclose(posterior, full.log_softmax(-1), atol=1e-4)
    assert posterior.exp().sum(1).allclose(torch.ones(len(visual)))


def test_top_k_ranks_by_the_rules_own_score(reading):
    model, visual, stats = reading
    walk = model.decode_constrained(visual, model.label_trie(CLASSES), stats.first_token_prior)
    corrected = walk.first_token_log_prob - stats.first_token_prior
    for b, p in enumerate(classify(model, visual, CLASSES, "trie+prior", stats, top_k=3)):
        assert p.top_k[0] == (p.label, pytest.approx(float(walk.log_prob[b]), abs=1e-5))
        others = [score for _, score in p.top_k[1:]]
        assert others == sorted(others, reverse=True)
        assert all(score == pytest.approx(float(corrected[b, CLASSES.index(label)]), abs=1e-5)
                   for label, score in p.top_k[1:])
        assert p.text == f"This is a photo of a {p.label}."
    for p in classify(model, visual, CLASSES, "trie+prior+prototypes", stats, top_k=len(CLASSES)):
        scores = [score for _, score in p.top_k]
        assert scores == sorted(scores, reverse=True) and len(p.top_k) == len(CLASSES)


def test_a_rule_without_its_statistics_is_refused(reading):
    model, visual, stats = reading
    with pytest.raises(ValueError, match="'trie\\+prior' needs the classes' first_token_prior"):
        classify(model, visual, CLASSES, "trie+prior")
    with pytest.raises(ValueError, match="needs the classes' prototypes"):
        classify(model, visual, CLASSES, "trie+prior+prototypes", ClassifierStats(stats.first_token_prior))
    with pytest.raises(ValueError, match="3 rows for 5 classes"):
        classify(model, visual, CLASSES, "trie+prior", ClassifierStats(stats.first_token_prior[:3]))
    with pytest.raises(ValueError, match="needs the classes' ridge_head"):
        classify(model, visual, CLASSES, "trie+prior+ridge", ClassifierStats(stats.first_token_prior))
    with pytest.raises(ValueError, match="fusion holds \\(3,\\) values"):
        classify(model, visual, CLASSES, "trie+prior+ridge",
                 ClassifierStats(stats.first_token_prior, ridge_head=stats.ridge_head, fusion=torch.ones(3)))
    with pytest.raises(ValueError, match="'beam' is not a valid Rule"):
        classify(model, visual, CLASSES, "beam")
    with pytest.raises(ValueError, match="no classes"):
        classify(model, visual, [], "trie")
    with pytest.raises(ValueError, match="needs a matcher"):
        classify(model, visual, CLASSES, "free")


def test_rules_by_name_and_by_parts():
    assert Rule.of("trie") is Rule.TRIE and Rule.of("free", prior=True) is Rule.FREE
    assert Rule.of("trie", prior=True, prototypes=True) is Rule.TRIE_PRIOR_PROTOTYPES
    assert (Rule.TRIE_PROTOTYPES.prior, Rule.TRIE_PROTOTYPES.prototypes, Rule.FREE.trie) == (False, True, False)
    with pytest.raises(ValueError, match="unknown decoding mode"):
        Rule.of("beam")
    assert Rule.of("trie", prior=True, ridge=True) is Rule.TRIE_PRIOR_RIDGE
    ridge = Rule.TRIE_PRIOR_RIDGE
    assert (ridge.prior, ridge.ridge, ridge.prototypes, ridge.fused) == (True, True, False, True)
    with pytest.raises(ValueError, match="ridge fusion is defined with the prior"):
        Rule.of("trie", prior=False, ridge=True)


def test_class_statistics_round_trip_through_bytes():
    stats = ClassifierStats(torch.tensor([-1.0, -2.0]), torch.eye(2))
    back = ClassifierStats.from_bytes(stats.to_bytes())
    assert torch.equal(back.first_token_prior, stats.first_token_prior) and torch.equal(back.prototypes, torch.eye(2))
    ridge = ClassifierStats(torch.zeros(2), None, torch.eye(2), torch.tensor([3.0, 0.25]))
    back = ClassifierStats.from_bytes(ridge.for_rule(Rule.TRIE_PRIOR_RIDGE).to_bytes())
    assert torch.equal(back.ridge_head, torch.eye(2)) and back.fusion.tolist() == [3.0, 0.25]
    assert ridge.for_rule(Rule.TRIE_PRIOR).ridge_head is None
    only = ClassifierStats.from_bytes(ClassifierStats(prototypes=torch.eye(2)).to_bytes())
    assert only.first_token_prior is None
    with pytest.raises(ValueError, match="unknown tensors \\['exemplars'\\]"):
        ClassifierStats.from_bytes(save_tensors({"exemplars": torch.zeros(1)}))
