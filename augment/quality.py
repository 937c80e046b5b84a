"""How good the views are, measured without training anything.

Each user's view is made from the training part of its leave-one-out split only; the
validation item is the target (the test item is never read, except to count false negatives).
Per (source, view), over users:

* ``hit_at_5`` / ``hit_at_length``: the validation item among the first 5 / all items of the
  view (the future view's job; reported for every view for reference);
* ``false_negative_rate``: share of users whose view holds the validation or the test item, the
  user's later choices (what the counterfactual view must avoid);
* ``category_overlap``: share of view items sharing a category with the user's last 5 items,
  and ``similarity_to_recent``: mean text cosine of view items to those items (the paraphrase
  view's job);
* ``coverage``: share of users with a non-empty view (LLM sources: not fallen back to retrieval);
* ``users_per_min`` / ``seconds``: the cost of making the three views.

Sources: floors (``random``; ``popularity``, which a device cannot know), retrieval by text
(``text-last``: nearest to the last item; ``text-recent``: to the mean of the last three), by a
trained model's item embeddings (``model-last``, ``model-recent``), a ``blend`` of those scores,
and the on-device LLM (``llm``: free generation; ``llm-rank``: ranked catalog candidates, with
``llm-rank-uncalibrated`` read from the same forward passes and ``rank-candidates``, the
candidate list itself, the ceiling of any ranking of it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumosrec.augment.cache import ViewCache
from lumosrec.augment.grounding import ItemSpace, TextEncoder
from lumosrec.augment.prompts import VIEWS
from lumosrec.augment.retrieval import RECENT, distant_items, paraphrase_substitutes
from lumosrec.augment.runtime import Generator
from lumosrec.augment.views import PerView, ViewConfig, ViewMaker
from lumosrec.core.dataset import Dataset
from lumosrec.core.evaluation import LeaveOneOut

RETRIEVAL_SOURCES = ("random", "popularity", "text-last", "text-recent", "model-last", "model-recent", "blend")
LLM_SOURCES = ("llm", "llm-rank")
#: view lengths of the retrieval sources: a long future list (hit@20), LUMOS's 5 elsewhere
FUTURE_LENGTH, OTHER_LENGTH = 20, 5
#: the "recent items" of the paraphrase metrics
RECENT_ITEMS = 5
#: the share of least popular items that the popularity floor's counterfactual draws from
UNPOPULAR = 0.1


@dataclass
class Users:
    """The evaluated users: keys, training histories, validation and test items."""

    keys: list[str]
    histories: list[list[int]]
    valid: np.ndarray
    test: np.ndarray

    @classmethod
    def from_split(cls, dataset: Dataset, split: LeaveOneOut, users: Sequence[int]) -> Users:
        users = list(users)
        return cls(
            [dataset.user_ids[u] for u in users],
            [split.train[u].tolist() for u in users],
            split.valid[users],
            split.test[users],
        )

    def head(self, n: int) -> Users:
        return Users(self.keys[:n], self.histories[:n], self.valid[:n], self.test[:n])


def view_metrics(
    views: Sequence[Sequence[int]],
    users: Users,
    text: ItemSpace,
    categories: Sequence[Sequence[str]],
    covered: Sequence[bool] | None = None,
) -> dict[str, float]:
    """The quality of one view of every user (``views[i]`` belongs to user ``i``); ``covered``
    says which users got the source's own view (default: a non-empty one)."""
    hit5, hit_all, false_negative, overlap, similarity, lengths = [], [], [], [], [], []
    for items, history, valid, test in zip(views, users.histories, users.valid, users.test):
        items = [int(i) for i in items]
        lengths.append(len(items))
        hit5.append(int(valid) in items[:5])
        hit_all.append(int(valid) in items)
        false_negative.append(int(valid) in items or int(test) in items)
        if not items:
            continue
        recent = history[-RECENT_ITEMS:]
        labels = {label for item in recent for label in categories[item]}
        overlap.append(np.mean([bool(labels & set(categories[item])) for item in items]))
        similarity.append(float((text.vectors[items] @ text.vectors[recent].T).mean()))
    covered = [bool(items) for items in views] if covered is None else covered
    return {
        "users": len(views),
        "length": float(np.mean(lengths)),
        "hit_at_5": float(np.mean(hit5)),
        "hit_at_length": float(np.mean(hit_all)),
        "false_negative_rate": float(np.mean(false_negative)),
        "category_overlap": float(np.mean(overlap)) if overlap else None,
        "similarity_to_recent": float(np.mean(similarity)) if similarity else None,
        "coverage": float(np.mean(covered)),
    }


def _top(scores: np.ndarray, k: int, exclude: set[int], valid: np.ndarray) -> list[int]:
    scores = np.where(valid, scores.astype(np.float64), -np.inf)
    if exclude:
        scores[list(exclude)] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    return [int(i) for i in top[np.argsort(-scores[top])] if np.isfinite(scores[i])]


def _zscore(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return (scores - scores[valid].mean()) / (scores[valid].std() + 1e-12)


def _near(space: ItemSpace, items: Sequence[int]) -> np.ndarray:
    return space.vectors @ space.vectors[list(items)].sum(0)


def blend_space(text: ItemSpace, model: ItemSpace) -> ItemSpace:
    """Text and model vectors side by side, each scaled by 1/sqrt(2): the cosine of two items is
    the mean of their two cosines (the blend's paraphrase and counterfactual views)."""
    vectors = np.concatenate([text.vectors, model.vectors], axis=1) / np.sqrt(2)
    vectors[~(text.has_vector & model.has_vector)] = 0
    return ItemSpace(vectors.astype(np.float32), "blend:text+model")


class RetrievalSources:
    """The views of the non-LLM sources for one user: ``source -> {view: items}``."""

    def __init__(self, text: ItemSpace, model: ItemSpace | None, train: Sequence[Sequence[int]], seed: int) -> None:
        self.text, self.model, self.seed = text, model, seed
        self.valid = text.has_vector & (model.has_vector if model is not None else True)
        self.valid[0] = False
        counts = np.bincount(np.concatenate([np.asarray(h, dtype=np.int64) for h in train]), minlength=len(self.valid))
        self.popularity = counts[: len(self.valid)].astype(np.float64)
        order = np.argsort(self.popularity[self.valid], kind="stable")
        self.unpopular = np.flatnonzero(self.valid)[order][: max(OTHER_LENGTH, int(self.valid.sum() * UNPOPULAR))]
        self.blend = blend_space(text, model) if model is not None else None

    def sources(self) -> list[str]:
        return [s for s in RETRIEVAL_SOURCES if self.model is not None or not s.startswith(("model", "blend"))]

    def views(self, source: str, history: Sequence[int], rng: np.random.Generator) -> dict[str, list[int]]:
        seen = set(int(i) for i in history)
        if source == "random":
            pool = np.flatnonzero(self.valid)
            pool = pool[~np.isin(pool, list(seen))]
            drawn = [int(i) for i in rng.choice(pool, FUTURE_LENGTH + 2 * OTHER_LENGTH, replace=False)]
            return {
                "future": drawn[:FUTURE_LENGTH],
                "paraphrase": drawn[FUTURE_LENGTH : FUTURE_LENGTH + OTHER_LENGTH],
                "counterfactual": drawn[FUTURE_LENGTH + OTHER_LENGTH :],
            }
        if source == "popularity":
            pool = [int(i) for i in self.unpopular if int(i) not in seen]
            return {
                "future": _top(self.popularity, FUTURE_LENGTH, seen, self.valid),
                "paraphrase": _top(self.popularity, OTHER_LENGTH, seen, self.valid),
                "counterfactual": [int(i) for i in rng.choice(pool, OTHER_LENGTH, replace=False)],
            }
        if source == "blend":
            scores = sum(
                _zscore(_near(space, items), self.valid)
                for space in (self.text, self.model)
                for items in (history[-1:], history[-RECENT:])
            )
            space = self.blend
        else:
            space = self.text if source.startswith("text") else self.model
            scores = _near(space, history[-1:] if source.endswith("last") else history[-RECENT:])
        return {
            "future": _top(scores, FUTURE_LENGTH, seen, self.valid),
            "paraphrase": paraphrase_substitutes(space, history, OTHER_LENGTH, seen),
            "counterfactual": distant_items(space, history, OTHER_LENGTH, seen, rng),
        }


def retrieval_rows(sources: RetrievalSources, users: Users, categories: Sequence[Sequence[str]]) -> list[dict]:
    """One row per (non-LLM source, view) over ``users``."""
    rows = []
    for source in sources.sources():
        started = time.perf_counter()
        made = [
            sources.views(source, history, np.random.default_rng([sources.seed, n]))
            for n, history in enumerate(users.histories)
        ]
        seconds = time.perf_counter() - started
        for view in VIEWS:
            rows.append(
                {
                    "source": source,
                    "view": view,
                    **view_metrics([m[view] for m in made], users, sources.text, categories),
                    "users_per_min": 60 * len(made) / seconds,
                    "seconds": seconds,
                }
            )
    return rows


def llm_rows(
    mode: str,
    dataset: Dataset,
    users: Users,
    text: ItemSpace,
    generator: Generator,
    encoder: TextEncoder,
    cache_path: Path,
    progress: bool = True,
) -> list[dict]:
    """The rows of one LLM source (``llm`` or ``llm-rank``), the views made through :class:`ViewMaker`
    and cached in ``cache_path``. ``llm-rank`` also gives ``llm-rank-uncalibrated`` (the same
    log-probabilities, ranked raw) and ``rank-candidates`` (each view's candidate list)."""
    cache = ViewCache(cache_path)
    try:
        maker = ViewMaker(dataset.titles, dataset.categories, text, ViewConfig(mode=mode), generator, encoder, cache)
        made, stats = maker.make(dict(zip(users.keys, users.histories)), progress=progress)
    finally:
        cache.close()
    summary = stats.summary()
    cost = {"users_per_min": summary["users_per_minute"], "seconds": summary["seconds"]}
    rows = []
    for view in VIEWS:
        records = [made[key][view] for key in users.keys]
        covered = [record.source != "retrieval" for record in records]
        rows.append(
            {
                "source": mode,
                "view": view,
                **view_metrics([r.items for r in records], users, text, dataset.categories, covered),
                **cost,
            }
        )
        if mode != "llm-rank":
            continue
        ranked = [json.loads(record.text) for record in records]
        raw = [
            maker.select_ranked(
                view,
                history,
                r["candidates"],
                np.asarray(r["logprobs"]),
                np.random.default_rng([maker.config.seed, n]),
                PerView(),
                calibrate=False,
            )
            for n, (history, r) in enumerate(zip(users.histories, ranked))
        ]
        rows.append(
            {
                "source": "llm-rank-uncalibrated",
                "view": view,
                **view_metrics(
                    [r.items for r in raw], users, text, dataset.categories, [r.source != "retrieval" for r in raw]
                ),
                **cost,
            }
        )
        rows.append(
            {
                "source": "rank-candidates",
                "view": view,
                **view_metrics([r["candidates"] for r in ranked], users, text, dataset.categories),
                "users_per_min": None,
                "seconds": None,
            }
        )
    return rows


COLUMNS = (
    "length",
    "hit_at_5",
    "hit_at_length",
    "false_negative_rate",
    "category_overlap",
    "similarity_to_recent",
    "coverage",
    "users_per_min",
)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table, one line per (sample, source, view)."""
    head = ["dataset", "sample", "users", "source", "view", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["dataset"], row["sample"], row["users"], row["source"], row["view"]]
        cells += ["-" if row[c] is None else f"{row[c]:.3f}" for c in COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def measure(
    dataset: Dataset,
    split: LeaveOneOut,
    users: Sequence[int],
    llm_users: int,
    text: ItemSpace,
    model: ItemSpace | None,
    generator: Generator | None,
    encoder: TextEncoder | None,
    cache_dir: Path,
    sources: Sequence[str] = LLM_SOURCES,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """All rows of one dataset: the non-LLM sources on ``users`` (sample ``all``) and on the
    first ``llm_users`` of them (sample ``llm-users``), the LLM ``sources`` on those."""
    everyone = Users.from_split(dataset, split, users)
    subset = everyone.head(llm_users)
    retrieval = RetrievalSources(text, model, split.train, seed)
    rows = []
    for sample, group in (("all", everyone), ("llm-users", subset)):
        log(f"{dataset.name}: non-LLM sources on {len(group.keys)} users ({sample})")
        rows += [
            {"dataset": dataset.name, "sample": sample, **row}
            for row in retrieval_rows(retrieval, group, dataset.categories)
        ]
    for mode in sources if generator is not None else ():
        log(f"{dataset.name}: {mode} on {llm_users} users")
        found = llm_rows(
            mode, dataset, subset, text, generator, encoder, cache_dir / f"{dataset.name}-{mode}.sqlite", progress
        )
        rows += [{"dataset": dataset.name, "sample": "llm-users", **row} for row in found]
    return rows
