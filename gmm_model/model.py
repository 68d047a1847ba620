"""GMM: frozen vision encoder -> trained projection -> frozen causal LLM that writes the class name.

Shapes: visual tokens (B, T, Dv) -> projected (B, T, H) -> placed in the prompt
    [prefix text (question)] [T image tokens] [suffix text] [answer: template, " label", ".", eos]
The prefix is identical for every sample and never sees the image, so its keys/values are computed
once and shared by every batch (training and decoding). The loss is next-token cross-entropy on the
answer tokens only. Prediction either generates freely (the paper; a matcher maps the text to a
class) or walks a trie of the seen class names so every answer is a valid class (beyond the paper;
faster too, because the template is teacher-forced).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .label_trie import LabelTrie
from .projection import Projection
from .prompt import PromptTokens
from .spec import PromptFormat

@dataclass
class ConstrainedPrediction:
    classes: torch.Tensor  # (B,) index into the class list
    log_prob: torch.Tensor  # (B,) log-probability of the decoded name tokens
    first_token_log_prob: torch.Tensor  # (B, C) log p(first name token of each class): a cheap ranking


@dataclass(frozen=True)
class Continuation:
    text: str  # what the model wrote after the given answer
    ended: bool  # it wrote its own end-of-sequence token within the bound (False: cut at the bound)
    tokens: int  # how many tokens it wrote (the end token not counted)


class GMM(nn.Module):
    def __init__(self, llm: nn.Module, tokenizer, projection: Projection, prompt: PromptFormat = PromptFormat()):
        super().__init__()
        self.llm, self.projection = llm, projection
        self.tokens = PromptTokens(tokenizer, prompt)
        self.tokenizer = tokenizer
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ---- inputs -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def llm_width(self) -> int:
        """The LLM's embedding size: what a projection maps visual tokens to."""
        return self.llm.get_input_embeddings().embedding_dim

    def _embed_ids(self, ids: list[int], batch: int) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device)).expand(batch, -1, -1)

    def prefix_cache(self, batch: int) -> DynamicCache | None:
        """A fresh KV cache holding the shared text prefix, expanded to `batch` (no copy)."""
        if not self.tokens.prefix:
            return None
        if self._prefix_kv is None:
            with torch.no_grad():
                out = self.llm(input_ids=torch.tensor([self.tokens.prefix], device=self.device), use_cache=True)
            self._prefix_kv = [(layer[0], layer[1]) for layer in out.cache]
        return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                            for k, v in self._prefix_kv], config=self.llm.config)

    def image_embeds(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, T, Dv) visual tokens -> (B, T + len(suffix), H): what follows the cached prefix."""
        image = self.projection(visual.to(self.device, next(self.projection.parameters()).dtype))
        suffix = self._embed_ids(self.tokens.suffix, visual.shape[0])
        return torch.cat([image.to(suffix.dtype), suffix], dim=1)

    # ---- training -----------------------------------------------------------------------------
    def loss(self, visual: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens; prompt and image positions carry no loss.

        The batch runs as ONE packed sequence: each sample's prompt and answer (less its last token, whose output
        predicts nothing) back to back, every token attending to the shared prefix and to its own sample's earlier
        tokens only, positions restarting per sample. Right-padding the answers to the longest one computed about a
        fifth more tokens than the samples have (the names differ in length) and made each layer's matmuls a
        batch of short ones; packed, they are one (tokens, H) matmul with no padding.
        """
        return self.loss_and_class_log_posterior(visual, class_names)[0]

    def loss_and_class_log_posterior(self, visual: torch.Tensor, class_names: list[str],
                                     candidates: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`loss`, and from the same forward (B, K) log-softmax over the candidate first name tokens at the
        position that predicts the first name token (the model's class posterior, which classifier alignment
        trains; None without candidates)."""
        prompt = self.image_embeds(visual)
        batch, prompt_len, _ = prompt.shape
        answers = [self.tokens.answer(name) for name in class_names]
        lengths = torch.tensor([prompt_len + len(answer) - 1 for answer in answers], device=self.device)
        fed = self.llm.get_input_embeddings()(torch.tensor([t for a in answers for t in a[:-1]], device=self.device))
        pieces = fed.split([len(answer) - 1 for answer in answers])
        inputs = torch.cat([part for i in range(batch) for part in (prompt[i], pieces[i])])[None]
        sample = torch.repeat_interleave(torch.arange(batch, device=self.device), lengths)  # (L,) each token's sample
        first = torch.cumsum(lengths, 0) - lengths  # where each sample starts
        position = torch.arange(len(sample), device=self.device) - first[sample]
        prefix = len(self.tokens.prefix)
        own_past = (sample[:, None] == sample[None, :]) & (position[None, :] <= position[:, None])
        mask = torch.cat([own_past.new_ones(len(sample), prefix), own_past], 1)[None, None]  # True: attends
        hidden = self.llm.base_model(inputs_embeds=inputs, attention_mask=mask, position_ids=(position + prefix)[None],
                                     cache=self.prefix_cache(1)).last_hidden_state[0]
        # answer token j of a sample is predicted from its position prompt_len + j - 1. The LM head (a
        # vocabulary-wide matmul, the largest single one) runs on those rows only, gathered into one contiguous
        # (n, H) block: on a strided slice torch ran it as a batched matmul over an expanded copy of the weight
        rows = torch.cat([torch.arange(len(answer), device=self.device) + start + prompt_len - 1
                          for start, answer in zip(first.tolist(), answers)])
        targets = torch.tensor([t for answer in answers for t in answer], device=self.device)
        head = self.llm.get_output_embeddings()
        loss = F.cross_entropy(head(hidden[rows]).float(), targets)
        if candidates is None:
            return loss, None
        first_name = first + prompt_len - 1 + len(self.tokens.template)  # the position predicting the first name token
        index = torch.tensor(candidates, device=self.device)
        bias = head.bias[index] if getattr(head, "bias", None) is not None else None
        return loss, F.linear(hidden[first_name], head.weight[index], bias).float().log_softmax(-1)

    # ---- prediction ---------------------------------------------------------------------------
    def _start(self, embeds: torch.Tensor):
        return self.llm(inputs_embeds=embeds, cache=self.prefix_cache(embeds.shape[0]), use_cache=True,
                        logits_to_keep=1)

    def _step(self, tokens: torch.Tensor, cache):
        return self.llm(input_ids=tokens[:, None].to(self.device), cache=cache, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def generate(self, visual: torch.Tensor, max_new_tokens: int = 24) -> list[str]:
        """Greedy free generation; each sample stops at its own end-of-sequence token."""
        if max_new_tokens < 1:
            return [""] * visual.shape[0]
        ids, _ = self._greedy(self._start(self.image_embeds(visual)), visual.shape[0], max_new_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    @torch.no_grad()
    def continue_answers(self, visual: torch.Tensor, answers: list[list[int]],
                         max_new_tokens: int) -> list[Continuation]:
        """Teacher-force each sample's answer tokens after its image, then write on greedily until the sample's
        own end-of-sequence token or `max_new_tokens`. The answer is kept exactly as given (e.g. a trie-decoded
        label); only what follows it is generated. The end token is not allowed as the very first new token:
        the projection was trained to stop right after the answer, so without this the model would always
        write nothing. Samples are batched by answer length, so no padding sits between answer and continuation."""
        if len(answers) != visual.shape[0]:
            raise ValueError(f"{len(answers)} answers for {visual.shape[0]} images")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if any(not answer for answer in answers):
            raise ValueError("every answer needs at least one token to continue from")
        results: list[Continuation | None] = [None] * len(answers)
        by_length: dict[int, list[int]] = {}
        for b, answer in enumerate(answers):
            by_length.setdefault(len(answer), []).append(b)
        table = self.llm.get_input_embeddings()
        for rows in by_length.values():
            answer_ids = torch.tensor([answers[b] for b in rows], dtype=torch.long, device=self.device)
            embeds = torch.cat([self.image_embeds(visual[rows]), table(answer_ids)], dim=1)
            ids, ended = self._greedy(self._start(embeds), len(rows), max_new_tokens, ban_eos_first=True)
            for b, row, end in zip(rows, ids, ended):
                results[b] = Continuation(self.tokenizer.decode(row, skip_special_tokens=True).strip(), end, len(row))
        return results

    def _greedy(self, out, batch: int, max_new_tokens: int,
                ban_eos_first: bool = False) -> tuple[list[list[int]], list[bool]]:
        """Greedy steps from a forward's output: each sample's new token ids (cut at its eos) and whether it
        wrote its eos within the bound."""
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        steps = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1]
            if ban_eos_first and step == 0:
                logits = logits.clone()
                logits[:, self.tokens.eos] = float("-inf")
            token, finished = greedy_step(logits, finished, self.tokens.eos, self.tokenizer.pad_token_id)
            steps.append(token)
            if finished.all():
                break
            out = self._step(token, out.cache)
        generated = torch.stack(steps, dim=1).tolist()
        return [cut_at_eos(ids, self.tokens.eos) for ids in generated], finished.tolist()

    def label_trie(self, class_names: list[str]) -> LabelTrie:
        """Sequences end with eos, as trained, so a name that is a prefix of another stays reachable."""
        return LabelTrie([self.tokens.label_sequence(name) + [self.tokens.eos] for name in class_names])

    def _answer_start(self, visual: torch.Tensor):
        """Forward the image and the teacher-forced template: the model output and the next-token log-probs."""
        batch = visual.shape[0]
        out = self._start(torch.cat([self.image_embeds(visual), self._embed_ids(self.tokens.template, batch)], 1))
        return out, out.logits[:, -1].float().log_softmax(-1).cpu()

    @torch.no_grad()
    def first_token_log_prob(self, visual: torch.Tensor, trie: LabelTrie) -> torch.Tensor:
        """(B, C) log p(first name token of each class | image, template): one forward, no walk."""
        return self._answer_start(visual)[1][:, torch.tensor(first_tokens(trie))]

    @torch.no_grad()
    def decode_constrained(self, visual: torch.Tensor, trie: LabelTrie,
                           first_token_prior: torch.Tensor | None = None) -> ConstrainedPrediction:
        """Teacher-force the template, then walk the trie greedily until each sample's class is unique.

        `first_token_prior` ((C,) log prior of each class's first token, see predict.first_token_prior)
        is subtracted at the first step only: the choice among first tokens becomes p(token | image) /
        p(token), which removes the model's standing preference for some names (the newest classes).
        Each later step forwards only the samples still walking (their rows of the cache kept, the rest dropped):
        most names are settled by their first token, so a batch's longest name no longer costs every sample a step.
        """
        batch = visual.shape[0]
        out, log_probs = self._answer_start(visual)
        first = log_probs[:, torch.tensor(first_tokens(trie))]
        root_prior = {}
        if first_token_prior is not None:
            root_prior = dict(zip(first_tokens(trie), first_token_prior.tolist()))  # classes sharing a token share it
        nodes = [trie.root] * batch
        result = torch.full((batch,), -1, dtype=torch.long)
        score = torch.zeros(batch)
        walking = list(range(batch))  # the samples still walking; row i of log_probs and the cache is walking[i]
        while True:
            chosen = []
            for i, b in enumerate(walking):
                node = nodes[b]
                allowed = list(node.children)
                choice = log_probs[i, allowed]
                if root_prior and node is trie.root:
                    choice = choice - torch.tensor([root_prior[t] for t in allowed])
                best = allowed[int(choice.argmax())]
                chosen.append(best)
                score[b] += log_probs[i, best]
                nodes[b] = node.children[best]
                resolved = LabelTrie.resolved(nodes[b])
                if resolved is not None:
                    result[b] = resolved
            rows = [i for i, b in enumerate(walking) if result[b] < 0]
            if not rows:
                return ConstrainedPrediction(result, score, first)
            if len(rows) < len(walking):
                out.cache.batch_select_indices(torch.tensor(rows, device=self.device))
            walking = [walking[i] for i in rows]
            out = self._step(torch.tensor([chosen[i] for i in rows], dtype=torch.long), out.cache)
            log_probs = out.logits[:, -1].float().log_softmax(-1).cpu()


def first_tokens(trie: LabelTrie) -> list[int]:
    """The first name token of every class, in class order."""
    first = [0] * len(trie.root.classes)
    for token, child in trie.root.children.items():
        for c in child.classes:
            first[c] = token
    return first


def greedy_step(logits: torch.Tensor, finished: torch.Tensor, eos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy step for a batch: finished samples emit padding; a sample finishes on its own eos."""
    token = logits.argmax(-1).masked_fill(finished, pad)
    return token, finished | (token == eos)


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
