"""Matchers: map generated text to the most similar seen class name in a text-embedding space.

A matcher implements `embed(texts) -> (N, D)` unit vectors and `identity`; the label bank and
`similarities` are shared. The paper uses CLIP's text tower (OpenCLIPTextMatcher); the offline
default is sentence-transformers all-MiniLM-L6-v2 (any sentence-transformers model by name or
directory works).
"""
from __future__ import annotations

import torch

from .weights import matcher_location, weights_id


class TextMatcher:
    """Embeds texts; caches the embeddings of class names (the label bank)."""

    identity: str

    def __init__(self) -> None:
        self._bank: dict[str, torch.Tensor] = {}

    def embed(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def label_bank(self, class_names: list[str]) -> torch.Tensor:
        missing = [n for n in dict.fromkeys(class_names) if n not in self._bank]
        if missing:
            self._bank.update(zip(missing, self.embed(missing)))
        return torch.stack([self._bank[n] for n in class_names])

    def similarities(self, texts: list[str], class_names: list[str]) -> torch.Tensor:
        """(len(texts), len(class_names)) cosine similarities."""
        if not class_names:
            raise ValueError("cannot match against an empty list of class names")
        return self.embed(texts) @ self.label_bank(class_names).T


class SentenceTransformerMatcher(TextMatcher):
    """Any sentence-transformers model: a hub name, a directory, or `package:<module>` for a bundled one."""

    def __init__(self, spec: str):
        super().__init__()
        from sentence_transformers import SentenceTransformer

        location = matcher_location(spec)
        try:
            self.model = SentenceTransformer(location, device="cpu")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load sentence-transformers matcher {spec!r}: {error}") from error
        self.identity = f"sentence-transformers:{spec}"

    def embed(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=False).float().cpu()


class OpenCLIPTextMatcher(TextMatcher):
    """CLIP's text tower through open_clip (the paper's matcher, e.g. ViT-B-16 with 'openai' weights).

    Texts are tokenised by the model's own tokenizer and cut to its context (77 tokens for CLIP);
    the image tower is dropped after loading.
    """

    def __init__(self, name: str, weights: str | None):
        super().__init__()
        import open_clip

        from .backbones import create_open_clip

        self.model = create_open_clip(name, weights)
        del self.model.visual
        self.tokenizer = open_clip.get_tokenizer(name)
        self.identity = f"open_clip-text:{name}/{weights_id(weights)}"

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()

