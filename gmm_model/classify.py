"""One classifier, from evaluation to serving: visual tokens, the seen classes, a decoding rule and the class
statistics the rule needs -> predictions.

The rules (`Rule`, written as in configs, manifests and the API):
- `free`: the paper's rule. Free generation, then the matcher's most similar seen class name.
- `trie`: constrained decoding over the seen names (beyond the paper): every answer is a valid class.
- `trie+prior`: the first step of the trie walk picks `log p(token | image) - log prior(token)`, the prior being
  the model's average first-token preference over the seen classes' mean features (`first_token_prior`). It
  removes the standing preference a projection trained task after task has for the newest names.
- `trie+prototypes`, `trie+prior+prototypes`: the z-scored (prior-corrected) first-token score of each class plus
  the z-scored cosine similarity of the image to its class prototype (nearest-class-mean), from one forward.
- `trie+prior+ridge`: `a * ridge(x) + b * (prior-corrected first-token score)`, the ridge head being the closed-form
  classifier of the class statistics (`cil_platform/closed_form.py`) and (a, b) its inverse temperature and the
  generative score's weight, both chosen on held-out training data (`cil_platform/fusion.py`), never on test data.

Evaluation and the service both call `classify` with the rule a store version records and the statistics
published with it (`ClassifierStats`), so the service answers with the classifier that was measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .matcher import TextMatcher
from .model import GMM, ConstrainedPrediction, Continuation
from .rules import Rule


@dataclass(frozen=True)
class ClassifierStats:
    """What a rule needs beyond the GMM, one row per seen class in class order: class statistics, no exemplar."""

    first_token_prior: torch.Tensor | None = None  # (C,) log prior of each class's first name token
    prototypes: torch.Tensor | None = None  # (C, D) unit-norm class means of the mean-pooled visual tokens
    ridge_head: torch.Tensor | None = None  # (C, D) ridge weights on the unit-norm mean-pooled visual tokens
    fusion: torch.Tensor | None = None  # (2,) the ridge rule's (ridge scale a, generative weight b)

    def check(self, rule: Rule, num_classes: int) -> None:
        """A clear error when `rule` needs a statistic this object lacks or has for another class count."""
        for name, needed in (("first_token_prior", rule.prior), ("prototypes", rule.prototypes),
                             ("ridge_head", rule.ridge), ("fusion", rule.ridge)):
            value = getattr(self, name)
            if needed and value is None:
                raise ValueError(f"rule {rule.value!r} needs the classes' {name}, which were not given")
            if needed and name == "fusion" and value.shape != (2,):
                raise ValueError(f"fusion holds {tuple(value.shape)} values, expected (a, b)")
            if needed and name != "fusion" and value.shape[0] != num_classes:
                raise ValueError(f"{name} has {value.shape[0]} rows for {num_classes} classes")

    def for_rule(self, rule: Rule) -> "ClassifierStats":
        """Only what `rule` needs (what a store version publishes with it)."""
        return ClassifierStats(self.first_token_prior if rule.prior else None,
                               self.prototypes if rule.prototypes else None,
                               self.ridge_head if rule.ridge else None, self.fusion if rule.ridge else None)

    def to_bytes(self) -> bytes:
        """safetensors of the statistics present (the store publishes them with a version)."""
        tensors = {name: value.float().contiguous() for name, value in self._present().items()}
        return save_tensors(tensors)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "ClassifierStats":
        tensors = load_tensors(blob)
        unknown = set(tensors) - set(STAT_NAMES)
        if unknown:
            raise ValueError(f"class statistics hold unknown tensors {sorted(unknown)}")
        return cls(**tensors)

    def _present(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STAT_NAMES if getattr(self, name) is not None}


STAT_NAMES = ("first_token_prior", "prototypes", "ridge_head", "fusion")


@dataclass
class Prediction:
    label: str
    score: float  # walk: log-probability of the name tokens; fused: the fused score; free: cosine similarity
    text: str  # the answer the LLM wrote (trie: the template with the decoded name)
    top_k: list[tuple[str, float]]
    description: Continuation | None = None  # what the LLM wrote on after the answer (classify(describe_tokens=N))


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Standardise each row, so scores of different kinds can be added."""
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6)


def first_token_prior(first_token_log_prob_of_means: torch.Tensor) -> torch.Tensor:
    """(M, C) log p(first token of class c | mean features of class m), over the M = C seen classes
    -> (C,) log of its average: how much the model favours class c on a class-balanced set of inputs
    (logit adjustment with the marginal estimated on class means, which are class statistics, not exemplars)."""
    return first_token_log_prob_of_means.float().logsumexp(0) - math.log(first_token_log_prob_of_means.shape[0])


def fused_scores(first_token_log_prob: torch.Tensor, visual: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, C): z-scored generative score of each class plus z-scored cosine similarity of the image's mean token
    to the class prototype. The generative score alone leans toward the newest classes; the prototypes do not drift."""
    similarity = torch.nn.functional.normalize(visual.float().mean(1), dim=1) @ prototypes.float().T
    return zscore(first_token_log_prob.float()) + zscore(similarity)


def ridge_fused_scores(generative: torch.Tensor, visual: torch.Tensor, ridge_head: torch.Tensor,
                       fusion: torch.Tensor) -> torch.Tensor:
    """(B, C): a * ridge score + b * generative score (logits: their softmax is the fused posterior)."""
    ridge = torch.nn.functional.normalize(visual.float().mean(1), dim=1) @ ridge_head.float().T
    return fusion[0].float() * ridge + fusion[1].float() * generative.float()


def classify(gmm: GMM, visual: torch.Tensor, class_names: list[str], rule: Rule | str,
             stats: ClassifierStats = ClassifierStats(), matcher: TextMatcher | None = None,
             top_k: int = 1, describe_tokens: int = 0) -> list[Prediction]:
    """Classify (B, T, D) visual tokens among `class_names` with one rule; with `describe_tokens` > 0 the model
    then writes on after each answer, up to that many tokens (`describe`)."""
    rule = Rule(rule)
    predictions = classify_rules(gmm, visual, class_names, [rule], stats, matcher, top_k)[rule]
    return describe(gmm, visual, predictions, rule, describe_tokens) if describe_tokens > 0 else predictions


def describe(gmm: GMM, visual: torch.Tensor, predictions: list[Prediction], rule: Rule | str,
             max_new_tokens: int) -> list[Prediction]:
    """The predictions with a description: the model continues after its answer until its own end token or
    `max_new_tokens`. The trie and prototype rules continue from the answer with the chosen class, as trained
    (template, name, terminator), so the label is kept; `free` continues from the text the model wrote itself."""
    if Rule(rule) is Rule.FREE:
        answers = [gmm.tokenizer(p.text, add_special_tokens=False).input_ids or gmm.tokens.template
                   for p in predictions]
    else:
        answers = [gmm.tokens.answer(p.label)[:-1] for p in predictions]  # without the trained end token
    continuations = gmm.continue_answers(visual, answers, max_new_tokens)
    return [replace(p, description=c) for p, c in zip(predictions, continuations)]


def classify_rules(gmm: GMM, visual: torch.Tensor, class_names: list[str], rules: list[Rule],
                   stats: ClassifierStats = ClassifierStats(), matcher: TextMatcher | None = None,
                   top_k: int = 1) -> dict[Rule, list[Prediction]]:
    """Several rules over the same images, sharing the model's passes: a prototype rule reuses the first-token
    scores of a trie walk with the same prior (one forward, the same numbers), so evaluation can report a rule
    and its fusion for the price of one."""
    if not class_names:
        raise ValueError("no classes to predict among")
    rules = [Rule(r) for r in rules]
    for rule in rules:
        stats.check(rule, len(class_names))
    top_k = max(1, min(top_k, len(class_names)))
    prior = stats.first_token_prior
    out: dict[Rule, list[Prediction]] = {}
    walks: dict[bool, ConstrainedPrediction] = {}  # by whether the first step was prior-corrected
    trie = gmm.label_trie(class_names) if any(r.trie for r in rules) else None
    for rule in sorted(rules, key=lambda r: r.fused):  # walks first: fused rules reuse their scores
        if rule is Rule.FREE:
            out[rule] = _free(gmm, visual, class_names, matcher, top_k)
            continue
        if not rule.fused:
            walks[rule.prior] = gmm.decode_constrained(visual, trie, prior if rule.prior else None)
            out[rule] = _walked(gmm, walks[rule.prior], class_names, prior if rule.prior else None, top_k)
            continue
        walk = walks.get(rule.prior) or next(iter(walks.values()), None)
        first = walk.first_token_log_prob if walk is not None else gmm.first_token_log_prob(visual, trie)
        generative = first - prior if rule.prior else first
        scores = (ridge_fused_scores(generative, visual, stats.ridge_head, stats.fusion) if rule.ridge
                  else fused_scores(generative, visual, stats.prototypes))
        out[rule] = _ranked(gmm, scores, class_names, top_k)
    return out


def _answer_text(gmm: GMM, label: str) -> str:
    return f"{gmm.tokens.format.answer_template} {label}{gmm.tokens.format.terminator}"


def _walked(gmm: GMM, walk: ConstrainedPrediction, class_names: list[str], prior: torch.Tensor | None,
            top_k: int) -> list[Prediction]:
    """The walk's class first, then the others by their (prior-corrected) first-token score."""
    ranking_scores = walk.first_token_log_prob - prior if prior is not None else walk.first_token_log_prob
    results = []
    for b, index in enumerate(walk.classes.tolist()):
        others = [c for c in ranking_scores[b].argsort(descending=True).tolist() if c != index][: top_k - 1]
        ranked = [(class_names[index], float(walk.log_prob[b]))]
        ranked += [(class_names[c], float(ranking_scores[b, c])) for c in others]
        results.append(Prediction(ranked[0][0], ranked[0][1], _answer_text(gmm, class_names[index]), ranked))
    return results


def _ranked(gmm: GMM, scores: torch.Tensor, class_names: list[str], top_k: int) -> list[Prediction]:
    """Classes by descending score (ties: the lower index, as argmax)."""
    results = []
    for row in scores:
        order = sorted(range(len(class_names)), key=lambda c: (-float(row[c]), c))[:top_k]
        ranked = [(class_names[c], float(row[c])) for c in order]
        results.append(Prediction(ranked[0][0], ranked[0][1], _answer_text(gmm, ranked[0][0]), ranked))
    return results


def _free(gmm: GMM, visual: torch.Tensor, class_names: list[str], matcher: TextMatcher | None,
          top_k: int) -> list[Prediction]:
    if matcher is None:
        raise ValueError("free decoding needs a matcher")
    texts = gmm.generate(visual)
    sims = matcher.similarities([gmm.tokens.strip_answer(t) for t in texts], class_names)
    values, indices = sims.topk(top_k, dim=1)
    return [Prediction(class_names[int(i[0])], float(v[0]), text,
                       [(class_names[int(c)], float(s)) for c, s in zip(i, v)])
            for text, v, i in zip(texts, values, indices)]
