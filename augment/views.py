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

Mode ``llm-rank`` asks the LLM to *order* catalog candidates instead of writing titles: about
20 items near the history (text neighbours of the last item and of the recent items, and
neighbours under the received model's item embeddings when given; for the counterfactual view
also items far from the profile) are shuffled, labelled A, B, C ... in one prompt per view, and
ranked by the log-probability of each label as the answer's first token, in one forward pass
(LlamaRec). Small models prefer some labels whatever the content; the label log-probabilities
of a content-free prompt (every title ``N/A``) are subtracted (contextual calibration, Zhao et
al. 2021). Every item is a catalog item by construction; the view is the best
``items_per_view`` (for the counterfactual, those that pass the profile check).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from lumosrec.augment.cache import View, ViewCache, history_hash
from lumosrec.augment.grounding import ItemSpace, TextEncoder, ground
from lumosrec.augment.prompts import (
    DOMAINS,
    LABELS,
    PROMPT_VERSION,
    RANK_VERSION,
    VIEWS,
    build_prompt,
    build_rank_prompt,
    detect_domain,
    few_shot_example,
    parse_titles,
)
from lumosrec.augment.retrieval import RECENT, distant_items, neighbours_of, retrieval_view
from lumosrec.augment.runtime import Chat, Generator
from lumosrec.core.errors import ConfigError
from lumosrec.core.progress import progress_bar

log = logging.getLogger(__name__)

MODES = ("llm", "llm-rank", "retrieval")
LLM_MODES = ("llm", "llm-rank")
RETRIEVAL_VERSION = "retrieval-v2"


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
    #: llm-rank: candidates per prompt, and whether the content-free label bias is subtracted
    candidates: int = 20
    calibrate: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown views mode {self.mode!r}; choose one of {', '.join(MODES)}")
        unknown = set(self.views) - set(VIEWS)
        if unknown:
            raise ConfigError(f"unknown view(s) {', '.join(sorted(unknown))}; choose from {', '.join(VIEWS)}")
        if not self.items_per_view <= self.candidates <= len(LABELS):
            raise ConfigError(f"candidates must lie between items_per_view and {len(LABELS)}, not {self.candidates}")
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
        The local LLM; required in the ``llm`` and ``llm-rank`` modes.
    encoder : TextEncoder, optional
        Embeds generated titles; required in ``llm`` mode (the one that built ``space``).
    cache : ViewCache, optional
    model_space : ItemSpace, optional
        The received model's item embeddings: in ``llm-rank`` mode their neighbours of the
        history join the candidates (part of the cache version, as the views depend on them).
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
        model_space: ItemSpace | None = None,
    ) -> None:
        if config.mode == "llm" and (generator is None or encoder is None):
            raise ConfigError("llm views need a generator and a text encoder; use --views retrieval otherwise")
        if config.mode == "llm-rank" and generator is None:
            raise ConfigError("llm-rank views need a generator; use --views retrieval otherwise")
        self.titles, self.categories, self.space, self.config = titles, categories, space, config
        self.generator, self.encoder, self.cache, self.model_space = generator, encoder, cache, model_space
        self._calibration: dict[str, np.ndarray] = {}
        domain = detect_domain(titles) if config.domain == "auto" else config.domain
        self.domain = DOMAINS[domain]
        self.example = few_shot_example(titles, categories, config.seed)
        if config.mode == "llm":
            self.model_key, self.version = generator.model_info()["key"], PROMPT_VERSION
        elif config.mode == "llm-rank":
            self.model_key = generator.model_info()["key"]
            self.version = RANK_VERSION + ("" if config.calibrate else "-raw") + ("+model" if model_space else "")
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
        bar = progress_bar(total=len(pending), desc="views", unit="user", disable=not progress or not pending)
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
            if start == 0 and len(pending) > len(batch):  # the estimate, before the long part
                minutes = (len(pending) - len(batch)) * elapsed / len(batch) / 60
                log.info(
                    "%s views of %d users to make (%d cached): about %.0f more minutes at the first batch's "
                    "%.1f users/min (fewer users: sample-users; no LLM: views=retrieval)",
                    self.config.mode,
                    len(pending),
                    stats.from_cache,
                    minutes,
                    60 * len(batch) / elapsed,
                )
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
        rngs = {
            user: np.random.default_rng([self.config.seed, int(history_hash(history), 16) % 2**32])
            for user, history in histories.items()
        }
        ranked = self._rank(histories, rngs) if self.config.mode == "llm-rank" else {}
        parsed = {key: parse_titles(text) for key, text in texts.items()}
        flat = [title for titles in parsed.values() for title in titles]
        vectors = self.encoder.encode(flat) if flat else np.zeros((0, self.space.vectors.shape[1]), np.float32)
        offsets, offset = {}, 0
        for key, titles in parsed.items():
            offsets[key] = vectors[offset : offset + len(titles)]
            offset += len(titles)
        result = {}
        for user, history in histories.items():
            rng = rngs[user]
            centre, own = self.space.profile(history)
            stats.own_profile_similarity_sum += float(own.sum())
            stats.own_items += len(own)
            result[user] = {}
            for view in self.config.views:
                counters = stats.per_view[view]
                counters.users += 1
                key = (user, view)
                if key in ranked:
                    view_record = self.select_ranked(view, history, *ranked[key], rng, counters)
                else:
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
        seen = set(int(i) for i in history)
        grounded: list[tuple[int, float]] = []
        if titles is not None:
            counters.asked_llm += 1
            counters.parsed += bool(titles)
            counters.titles += len(titles)
            grounded = ground(title_vectors, self.space, self.config.threshold, seen | self.example.items)
            counters.grounded_titles += len(grounded)
            counters.grounding_similarity_sum += sum(similarity for _, similarity in grounded)
            if view == "counterfactual":
                grounded = self._unlike_profile(grounded, centre, own, counters)
        return self._complete(view, history, grounded if titles is not None else None, centre, text, rng, counters)

    def _unlike_profile(
        self, scored: list[tuple[int, float]], centre: np.ndarray, own: np.ndarray, counters: PerView
    ) -> list[tuple[int, float]]:
        """The counterfactual check: the items less typical of the user than the
        ``counterfactual_quantile`` of its own items (rejections counted)."""
        ceiling = float(np.quantile(own, self.config.counterfactual_quantile))
        unlike = [(item, s) for item, s in scored if float(self.space.vectors[item] @ centre) < ceiling]
        counters.rejected_as_too_similar += len(scored) - len(unlike)
        return unlike

    def _complete(
        self,
        view: str,
        history: Sequence[int],
        chosen: list[tuple[int, float]] | None,
        centre: np.ndarray,
        text: str,
        rng: np.random.Generator,
        counters: PerView,
    ) -> View:
        """The view from the LLM's usable ``(item, grounding)`` pairs, best first (None: the LLM
        was not asked): padded with retrieval items up to ``items_per_view``, or replaced by the
        retrieval view when fewer than ``min_grounded`` are usable; both counted."""
        k, seen = self.config.items_per_view, set(int(i) for i in history)
        chosen = chosen[:k] if chosen is not None else None
        if chosen is not None and len(chosen) >= self.config.min_grounded:
            items, grounding = [item for item, _ in chosen], [s for _, s in chosen]
            source = "llm"
            if len(items) < k:
                extra = retrieval_view(view, self.space, history, k - len(items), seen | set(items), rng)
                items, grounding, source = items + extra, grounding + [math.nan] * len(extra), "llm+retrieval"
                counters.padded += 1
            else:
                counters.llm += 1
        else:
            counters.fallback += chosen is not None
            items = retrieval_view(view, self.space, history, k, seen, rng)
            grounding, source = [math.nan] * len(items), "retrieval"
        profile = [float(self.space.vectors[item] @ centre) for item in items]
        return View(items, source, grounding, profile, text)

    def candidates(self, view: str, history: Sequence[int], rng: np.random.Generator) -> list[int]:
        """The ``llm-rank`` candidates of one view, shuffled so that a label's position says
        nothing about retrieval order: neighbours of the last item and of the recent items (text,
        and the model's item embeddings when given), taken in turn; for the counterfactual view
        every other candidate comes from the items least similar to the profile. No popularity:
        a device cannot know it."""
        n, seen = self.config.candidates, set(int(i) for i in history)
        spaces = [self.space] + ([self.model_space] if self.model_space is not None else [])
        near = _interleave(
            [neighbours_of(space, history[-1:], n, seen) for space in spaces]
            + [neighbours_of(space, history[-RECENT:], n, seen) for space in spaces],
            n,
        )
        if view == "counterfactual":
            near = _interleave([distant_items(self.space, history, n, seen, rng), near], n)
        return [int(i) for i in rng.permutation(near)]

    def calibration(self, view: str) -> np.ndarray:
        """The label log-probabilities of the view's content-free prompt (every title ``N/A``),
        computed once per view: the label bias that calibration subtracts."""
        if view not in self._calibration:
            blank = build_rank_prompt(
                view,
                [0] * self.config.history_len,
                [0] * self.config.candidates,
                self.titles,
                self.categories,
                self.domain,
                content_free=True,
            )
            self._calibration[view] = self.generator.label_logprobs([blank], LABELS[: self.config.candidates])[0]
        return self._calibration[view]

    def _rank(
        self, histories: Mapping[str, Sequence[int]], rngs: Mapping[str, np.random.Generator]
    ) -> dict[tuple[str, str], tuple[list[int], np.ndarray]]:
        """(candidates, label log-probabilities) of every user and view, one forward pass per prompt."""
        keys, candidates, prompts = [], [], []
        for user, history in histories.items():
            recent = list(history[-self.config.history_len :])
            for view in self.config.views:
                listed = self.candidates(view, history, rngs[user])
                keys.append((user, view))
                candidates.append(listed)
                prompts.append(build_rank_prompt(view, recent, listed, self.titles, self.categories, self.domain))
        logprobs = self.generator.label_logprobs(prompts, LABELS[: self.config.candidates])
        return {key: (listed, row[: len(listed)]) for key, listed, row in zip(keys, candidates, logprobs)}

    def select_ranked(
        self,
        view: str,
        history: Sequence[int],
        candidates: Sequence[int],
        logprobs: np.ndarray,
        rng: np.random.Generator,
        counters: PerView,
        calibrate: bool | None = None,
    ) -> View:
        """The view from the candidates' label log-probabilities: the best ``items_per_view``
        (calibrated unless ``calibrate`` or the config says otherwise; for the counterfactual,
        those unlike the profile), padded or replaced by retrieval as in ``llm`` mode. The
        record's ``text`` keeps the candidates and their raw log-probabilities."""
        calibrate = self.config.calibrate if calibrate is None else calibrate
        scores = logprobs - self.calibration(view)[: len(logprobs)] if calibrate else logprobs
        centre, own = self.space.profile(history)
        counters.asked_llm += 1
        counters.parsed += 1
        # ranked items are catalog items: grounding 1
        ranked = [(int(candidates[i]), 1.0) for i in np.argsort(-np.asarray(scores), kind="stable")]
        if view == "counterfactual":
            ranked = self._unlike_profile(ranked, centre, own, counters)
        text = json.dumps(
            {"candidates": [int(i) for i in candidates], "logprobs": [round(float(v), 4) for v in logprobs]}
        )
        return self._complete(view, history, ranked, centre, text, rng, counters)


def _interleave(lists: Sequence[Sequence[int]], n: int) -> list[int]:
    """Up to ``n`` distinct items taken from ``lists`` in turn, each list in its order."""
    chosen: list[int] = []
    for row in zip(*[list(items) + [None] * (n - len(items)) for items in lists]):
        for item in row:
            if item is not None and item not in chosen and len(chosen) < n:
                chosen.append(item)
    return chosen
