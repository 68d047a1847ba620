"""GMM: frozen vision encoder -> trained projection -> frozen causal LLM that writes the class name.

Shapes: visual tokens (B, T, Dv) -> projected (B, T, H) -> placed in the prompt
    [prefix text | T image tokens | question text] [answer: template, " label", ".", eos]
The loss is next-token cross-entropy on the answer tokens only. Prediction either generates freely
(the paper; a matcher maps the text to a class) or walks a trie of the seen class names so every
answer is a valid class (beyond the paper; faster too, because the template is teacher-forced).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .label_trie import LabelTrie
from .projection import Projection
from .prompt import PromptFormat, PromptTokens

IGNORE = -100


@dataclass
class ConstrainedPrediction:
    classes: torch.Tensor  # (B,) index into the class list
    log_prob: torch.Tensor  # (B,) log-probability of the decoded name tokens
    first_token_log_prob: torch.Tensor  # (B, C) log p(first name token of each class): a cheap ranking


class GMM(nn.Module):
    def __init__(self, llm: nn.Module, tokenizer, projection: Projection, prompt: PromptFormat = PromptFormat()):
        super().__init__()
        self.llm, self.projection = llm, projection
        self.tokens = PromptTokens(tokenizer, prompt)
        self.tokenizer = tokenizer

    # ---- inputs -------------------------------------------------------------------------------
    def _embed_ids(self, ids: list[int], batch: int) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device)).expand(batch, -1, -1)

    def prompt_embeds(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, T, Dv) visual tokens -> (B, L, H) prompt embeddings; L is the same for every sample."""
        batch = visual.shape[0]
        image = self.projection(visual.to(self.projection.weight.dtype))
        parts = [self._embed_ids(self.tokens.prefix, batch), image, self._embed_ids(self.tokens.question, batch)]
        dtype = self.llm.get_input_embeddings().weight.dtype
        return torch.cat([p.to(dtype) for p in parts], dim=1)

    # ---- training -----------------------------------------------------------------------------
    def loss(self, visual: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens; prompt and image positions are masked."""
        prompt = self.prompt_embeds(visual)
        batch, prompt_len, _ = prompt.shape
        answers = [self.tokens.answer(name) for name in class_names]
        width = max(map(len, answers))
        pad = self.tokenizer.pad_token_id
        answer_ids = torch.tensor([a + [pad] * (width - len(a)) for a in answers], device=prompt.device)
        targets = torch.tensor([a + [IGNORE] * (width - len(a)) for a in answers], device=prompt.device)
        inputs = torch.cat([prompt, self.llm.get_input_embeddings()(answer_ids)], dim=1)
        mask = torch.cat([torch.ones(batch, prompt_len, dtype=torch.long, device=prompt.device),
                          (targets != IGNORE).long()], dim=1)
        hidden = self.llm.base_model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        # the token at position prompt_len + j is predicted from position prompt_len + j - 1
        logits = self.llm.get_output_embeddings()(hidden[:, prompt_len - 1: prompt_len - 1 + width])
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)

    # ---- prediction ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, visual: torch.Tensor, max_new_tokens: int = 24) -> list[str]:
        """Greedy free generation; each sample stops at its own end-of-sequence token."""
        out = self.llm(inputs_embeds=self.prompt_embeds(visual), use_cache=True, logits_to_keep=1)
        finished = torch.zeros(visual.shape[0], dtype=torch.bool, device=visual.device)
        steps = []
        for _ in range(max_new_tokens):
            token, finished = greedy_step(out.logits[:, -1], finished, self.tokens.eos, self.tokenizer.pad_token_id)
            steps.append(token)
            if finished.all():
                break
            out = self.llm(input_ids=token[:, None], cache=out.cache, use_cache=True,
                           logits_to_keep=1)
        generated = torch.stack(steps, dim=1).tolist()
        return [self.tokenizer.decode(cut_at_eos(ids, self.tokens.eos), skip_special_tokens=True) for ids in generated]

    def label_trie(self, class_names: list[str]) -> LabelTrie:
        return LabelTrie([self.tokens.label_sequence(name) for name in class_names])

    @torch.no_grad()
    def decode_constrained(self, visual: torch.Tensor, trie: LabelTrie) -> ConstrainedPrediction:
        """Teacher-force the template, then walk the trie greedily until each sample's class is unique."""
        batch = visual.shape[0]
        prefix = torch.cat([self.prompt_embeds(visual), self._embed_ids(self.tokens.template, batch)], dim=1)
        out = self.llm(inputs_embeds=prefix, use_cache=True, logits_to_keep=1)
        log_probs = out.logits[:, -1].float().log_softmax(-1)
        first_tokens = torch.tensor(_first_tokens(trie), device=log_probs.device)
        first = log_probs[:, first_tokens]
        nodes = [trie.root] * batch
        result = torch.full((batch,), -1, dtype=torch.long)
        score = torch.zeros(batch)
        while True:
            chosen = torch.full((batch,), self.tokenizer.pad_token_id, dtype=torch.long)
            for b, node in enumerate(nodes):
                if result[b] >= 0:
                    continue
                allowed = list(node.children)
                best = int(log_probs[b, allowed].argmax())
                chosen[b] = allowed[best]
                score[b] += float(log_probs[b, allowed[best]])
                nodes[b] = node.children[allowed[best]]
                resolved = LabelTrie.resolved(nodes[b])
                if resolved is not None:
                    result[b] = resolved
            if bool((result >= 0).all()):
                return ConstrainedPrediction(result, score, first.cpu())
            out = self.llm(input_ids=chosen[:, None].to(prefix.device), cache=out.cache,
                           use_cache=True, logits_to_keep=1)
            log_probs = out.logits[:, -1].float().log_softmax(-1)


def _first_tokens(trie: LabelTrie) -> list[int]:
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
