"""The three LUMOS views of each user, made on the device from its training history.

For every user, :class:`ViewMaker` asks the local LLM for a *future* view (items the user
will want next), a *paraphrase* view (other items with the same intent) and a
*counterfactual* view (items this user would not choose), parses the answers into titles
and grounds them to catalog items (:mod:`lumosrec.augment.grounding`). The counterfactual view must be
unlike the user: an item is kept only if its similarity to the user's profile is below the
``counterfactual_quantile`` of the user's own items' similarities. A view with fewer than
``min_grounded`` usable items falls back to retrieval (:mod:`lumosrec.augment.retrieval`); a view
with enough but fewer than ``items_per_view`` is padded with retrieval items. Both are
counted in :class:`ViewStats`, never silent. Views are cached per user
(:mod:`lumosrec.augment.cache`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from lumosrec.augment.cache import View, ViewCache, history_hash
from lumosrec.augment.grounding import ItemSpace, TextEncoder, ground
from lumosrec.augment.prompts import (
    DOMAINS,
    PROMPT_VERSION,
    VIEWS,
    build_prompt,
    detect_domain,
    few_shot_example,
    parse_titles,
)
from lumosrec.augment.retrieval import retrieval_view
from lumosrec.augment.runtime import Chat, Generator
from lumosrec.core.errors import ConfigError

MODES = ("llm", "retrieval")
RETRIEVAL_VERSION = "retrieval-v1"


@dataclass
class ViewConfig:
    """View generation settings (``lumos views generate`` flags)."""

    mode: str = "llm"
    views: tuple[str, ...] = VIEWS
    history_len: int = 10
    items_per_view: int = 5
    max_new_tokens: int = 64
    temperature: float = 0.0
    threshold: float = 0.6
    min_grounded: int = 2
    counterfactual_quantile: float = 0.1
    users_per_batch: int = 12
    domain: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown views mode {self.mode!r}; choose one of {', '.join(MODES)}")
        unknown = set(self.views) - set(VIEWS)
        if unknown:
            raise ConfigError(f"unknown view(s) {', '.join(sorted(unknown))}; choose from {', '.join(VIEWS)}")
        if self.domain != "auto" and self.domain not in DOMAINS:
            raise ConfigError(f"unknown domain {self.domain!r}; choose auto or one of {', '.join(DOMAINS)}")


@dataclass
class PerView:
    """Counters of one view over the users made in a call (cache hits excluded)."""

    users: int = 0
    asked_llm: int = 0
    parsed: int = 0
    titles: int = 0
    grounded_titles: int = 0
    llm: int = 0
    padded: int = 0
    fallback: int = 0
    rejected_as_too_similar: int = 0
    grounding_similarity_sum: float = 0.0
    profile_similarity_sum: float = 0.0
    items: int = 0

    def summary(self) -> dict:
        asked = max(self.asked_llm, 1)
        return {
            **{k: v for k, v in asdict(self).items() if not k.endswith("_sum")},
            "parse_rate": self.parsed / asked if self.asked_llm else None,
            "grounding_rate": self.grounded_titles / self.titles if self.titles else None,
            "fallback_rate": self.fallback / asked if self.asked_llm else None,
            "mean_grounding_similarity": self.grounding_similarity_sum / self.grounded_titles
            if self.grounded_titles
            else None,
            "mean_profile_similarity": self.profile_similarity_sum / self.items if self.items else None,
        }


@dataclass
class ViewStats:
    """What one :meth:`ViewMaker.make` call did."""

    users: int = 0
    from_cache: int = 0
    seconds: float = 0.0
    own_profile_similarity_sum: float = 0.0
    own_items: int = 0
    per_view: dict[str, PerView] = field(default_factory=dict)

    def summary(self) -> dict:
        made = self.users - self.from_cache
        return {
            "users": self.users,
            "from_cache": self.from_cache,
            "made": made,
            "seconds": self.seconds,
            "users_per_minute": 60 * made / self.seconds if self.seconds else None,
            "mean_own_profile_similarity": self.own_profile_similarity_sum / self.own_items if self.own_items else None,
            "views": {view: counters.summary() for view, counters in self.per_view.items()},
        }


class ViewMaker:
    """Makes (or loads from the cache) the views of users from their training histories.

    Parameters
    ----------
    titles, categories : sequence
        The catalog's text by item index (index 0 is padding).
    space : ItemSpace
        Item similarity for grounding, the counterfactual check and the retrieval views.
    config : ViewConfig
    generator : Generator, optional
        The local LLM; required in ``llm`` mode.
    encoder : TextEncoder, optional
        Embeds generated titles; required in ``llm`` mode (the one that built ``space``).
    cache : ViewCache, optional
    """

    def __init__(
        self,
        titles: Sequence[str],
        categories: Sequence[Sequence[str]],
        space: ItemSpace,
        config: ViewConfig,
        generator: Generator | None = None,
        encoder: TextEncoder | None = None,
        cache: ViewCache | None = None,
    ) -> None:
        if config.mode == "llm" and (generator is None or encoder is None):
            raise ConfigError("llm views need a generator and a text encoder; use --views retrieval otherwise")
        self.titles, self.categories, self.space, self.config = titles, categories, space, config
        self.generator, self.encoder, self.cache = generator, encoder, cache
        domain = detect_domain(titles) if config.domain == "auto" else config.domain
        self.domain = DOMAINS[domain]
        self.example = few_shot_example(titles, categories, config.seed)
        if config.mode == "llm":
            self.model_key, self.version = generator.model_info()["key"], PROMPT_VERSION
        else:
            self.model_key, self.version = space.source, RETRIEVAL_VERSION

    def prompts(self, history: Sequence[int]) -> dict[str, Chat]:
        """The prompts of every view for one training history (its last ``history_len`` items)."""
        recent = list(history[-self.config.history_len :])
        return {
            view: build_prompt(
                view, recent, self.titles, self.categories, self.example, self.domain, self.config.items_per_view
            )
            for view in self.config.views
        }

    def make(
        self, histories: Mapping[str, Sequence[int]], progress: bool = True
    ) -> tuple[dict[str, dict[str, View]], ViewStats]:
        """Views of every user in ``histories`` (user key -> training history, oldest first)."""
        started = time.perf_counter()
        stats = ViewStats(users=len(histories), per_view={view: PerView() for view in self.config.views})
        views: dict[str, dict[str, View]] = {}
        pending = []
        for user, history in histories.items():
            cached = (
                self.cache.get(self.model_key, self.version, user, self.config.views, history_hash(history))
                if self.cache
                else None
            )
            if cached is not None:
                views[user] = cached
            else:
                pending.append(user)
        stats.from_cache = len(histories) - len(pending)
        bar = tqdm(total=len(pending), desc="views", unit="user", disable=not progress or not pending)
        for start in range(0, len(pending), self.config.users_per_batch):
            batch = pending[start : start + self.config.users_per_batch]
            made = self._make_batch({user: histories[user] for user in batch}, stats)
            for user, user_views in made.items():
                if self.cache:
                    self.cache.put(self.model_key, self.version, user, history_hash(histories[user]), user_views)
                views[user] = user_views
            bar.update(len(batch))
            elapsed = time.perf_counter() - started
            bar.set_postfix(users_per_min=f"{60 * bar.n / elapsed:.1f}")
        bar.close()
        stats.seconds = time.perf_counter() - started
        return views, stats

    def _make_batch(self, histories: Mapping[str, Sequence[int]], stats: ViewStats) -> dict[str, dict[str, View]]:
        texts: dict[tuple[str, str], str] = {}
        if self.config.mode == "llm":
            per_user = {user: self.prompts(history) for user, history in histories.items()}
            keys = [(user, view) for user in histories for view in self.config.views]
            prompts = [per_user[user][view] for user, view in keys]
            outputs = self.generator.generate(
                prompts, self.config.max_new_tokens, self.config.temperature, self.config.seed
            )
            texts = dict(zip(keys, outputs))
        parsed = {key: parse_titles(text) for key, text in texts.items()}
        flat = [title for titles in parsed.values() for title in titles]
        vectors = self.encoder.encode(flat) if flat else np.zeros((0, self.space.vectors.shape[1]), np.float32)
        offsets, offset = {}, 0
        for key, titles in parsed.items():
            offsets[key] = vectors[offset : offset + len(titles)]
            offset += len(titles)
        result = {}
        for user, history in histories.items():
            rng = np.random.default_rng([self.config.seed, int(history_hash(history), 16) % 2**32])
            centre, own = self.space.profile(history)
            stats.own_profile_similarity_sum += float(own.sum())
            stats.own_items += len(own)
            result[user] = {}
            for view in self.config.views:
                counters = stats.per_view[view]
                counters.users += 1
                key = (user, view)
                view_record = self._one_view(
                    view, history, centre, own, parsed.get(key), offsets.get(key), texts.get(key, ""), rng, counters
                )
                result[user][view] = view_record
                counters.items += len(view_record.items)
                counters.profile_similarity_sum += float(sum(view_record.profile_similarity))
        return result

    def _one_view(
        self,
        view: str,
        history: Sequence[int],
        centre: np.ndarray,
        own: np.ndarray,
        titles: list[str] | None,
        title_vectors: np.ndarray | None,
        text: str,
        rng: np.random.Generator,
        counters: PerView,
    ) -> View:
        k, seen = self.config.items_per_view, set(int(i) for i in history)
        grounded: list[tuple[int, float]] = []
        if titles is not None:
            counters.asked_llm += 1
            counters.parsed += bool(titles)
            counters.titles += len(titles)
            grounded = ground(title_vectors, self.space, self.config.threshold, seen | self.example.items)
            counters.grounded_titles += len(grounded)
            counters.grounding_similarity_sum += sum(similarity for _, similarity in grounded)
            if view == "counterfactual":
                ceiling = float(np.quantile(own, self.config.counterfactual_quantile))
                unlike = [(item, s) for item, s in grounded if float(self.space.vectors[item] @ centre) < ceiling]
                counters.rejected_as_too_similar += len(grounded) - len(unlike)
                grounded = unlike
        grounded = grounded[:k]
        if titles is not None and len(grounded) >= self.config.min_grounded:
            items, grounding = [item for item, _ in grounded], [s for _, s in grounded]
            source = "llm"
            if len(items) < k:
                extra = retrieval_view(view, self.space, history, k - len(items), seen | set(items), rng)
                items, grounding, source = items + extra, grounding + [math.nan] * len(extra), "llm+retrieval"
                counters.padded += 1
            else:
                counters.llm += 1
        else:
            counters.fallback += titles is not None
            items = retrieval_view(view, self.space, history, k, seen, rng)
            grounding, source = [math.nan] * len(items), "retrieval"
        profile = [float(self.space.vectors[item] @ centre) for item in items]
        return View(items, source, grounding, profile, text)
