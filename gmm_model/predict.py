"""One prediction API over both decoding modes, shared by evaluation and serving."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .matcher import TextMatcher
from .model import GMM

DecodeMode = Literal["trie", "free"]


@dataclass
class Prediction:
    label: str
    score: float  # trie: log-probability of the name tokens; free: cosine similarity to the label
    text: str  # the answer the LLM wrote (trie: the template with the decoded name)
    top_k: list[tuple[str, float]]


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Standardise each row, so scores of different kinds can be added."""
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6)


def first_token_prior(first_token_log_prob_of_means: torch.Tensor) -> torch.Tensor:
    """(M, C) log p(first token of class c | mean features of class m), over the M = C seen classes
    -> (C,) log of its average: how much the model favours class c on a class-balanced set of inputs.

    Beyond the paper: a projection trained task after task makes the LLM favour the newest names for
    any image. Subtracting this prior (logit adjustment with the marginal estimated on class means,
    which are class statistics, not exemplars) removes the standing preference and keeps the evidence.
    """
    return first_token_log_prob_of_means.float().logsumexp(0) - math.log(first_token_log_prob_of_means.shape[0])


def fuse_with_prototypes(first_token_log_prob: torch.Tensor, visual: torch.Tensor,
                         prototypes: torch.Tensor) -> torch.Tensor:
    """Beyond the paper: add the z-scored generative score of each class (log p of its first name
    token) to the z-scored cosine similarity of the image's mean token to the class prototype
    (unit-norm class means of the same features, as in nearest-class-mean). Returns (B,) class indices.

    The generative score alone leans toward the newest classes; the prototypes do not drift.
    """
    similarity = torch.nn.functional.normalize(visual.float().mean(1), dim=1) @ prototypes.T
    return (zscore(first_token_log_prob.float()) + zscore(similarity)).argmax(1)


def predict(gmm: GMM, visual: torch.Tensor, class_names: list[str], mode: DecodeMode = "trie",
            matcher: TextMatcher | None = None, top_k: int = 1,
            prior: torch.Tensor | None = None) -> list[Prediction]:
    """Classify (B, T, D) visual tokens among `class_names`.

    trie: constrained decoding, every answer a valid class; top-k beyond the first ranks the other
    classes by the log-probability of their first name token; `prior` (first_token_prior, trie only)
    corrects the first step. free: the paper's mode, free generation then the matcher's most similar
    class name.
    """
    if not class_names:
        raise ValueError("no classes to predict among")
    top_k = max(1, min(top_k, len(class_names)))
    if mode == "trie":
        out = gmm.decode_constrained(visual, gmm.label_trie(class_names), prior)
        results = []
        for b, index in enumerate(out.classes.tolist()):
            ranking = [c for c in out.first_token_log_prob[b].argsort(descending=True).tolist() if c != index]
            ranked = [(class_names[index], float(out.log_prob[b]))]
            ranked += [(class_names[c], float(out.first_token_log_prob[b, c])) for c in ranking[: top_k - 1]]
            text = f"{gmm.tokens.format.answer_template} {class_names[index]}{gmm.tokens.format.terminator}"
            results.append(Prediction(ranked[0][0], ranked[0][1], text, ranked))
        return results
    if mode == "free":
        if matcher is None:
            raise ValueError("free decoding needs a matcher")
        texts = gmm.generate(visual)
        sims = matcher.similarities([gmm.tokens.strip_answer(t) for t in texts], class_names)
        values, indices = sims.topk(top_k, dim=1)
        return [Prediction(class_names[int(i[0])], float(v[0]), text,
                           [(class_names[int(c)], float(s)) for c, s in zip(i, v)])
                for text, v, i in zip(texts, values, indices)]
    raise ValueError(f"unknown decoding mode {mode!r}; use 'trie' or 'free'")
