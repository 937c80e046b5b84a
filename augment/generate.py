"""``lumos views generate`` / ``inspect``: the views of a dataset's users, cached in a folder.

The folder holds ``views.sqlite`` (the cache, reused and resumed by later runs) and
``report.json`` (settings, model, versions, throughput and per-view accounting of the last
run). Only training histories (leave-one-out: all but the last two items) reach a prompt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from lumosrec.augment.backends import LazyGenerator
from lumosrec.augment.cache import CACHE_FILE, ViewCache
from lumosrec.augment.grounding import DEFAULT_ENCODER, ItemSpace, TextEncoder
from lumosrec.augment.runtime import Generator, RuntimeConfig
from lumosrec.augment.views import LLM_MODES, ViewConfig, ViewMaker
from lumosrec.core.dataset import Dataset, sample_users
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.paths import cache_dir
from lumosrec.core.results import environment, peak_rss_mb, write_json

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


def select_users(dataset: Dataset, sample: int = 0, user_ids: Sequence[str] = (), seed: int = 0) -> list[int]:
    """User indices: the given original ids, a fixed random sample of ``sample`` users, or all."""
    if user_ids:
        index = {user: i for i, user in enumerate(dataset.user_ids)}
        missing = [user for user in user_ids if user not in index]
        if missing:
            raise ConfigError(f"unknown user id(s) {', '.join(missing[:5])} in {dataset.name}")
        return [index[user] for user in user_ids]
    return sample_users(dataset.num_users, sample, seed).tolist()


def item_space(dataset: Dataset, mode: str, encoder: TextEncoder | None, item_embeddings: Path | None) -> ItemSpace:
    """Text embeddings when the catalog has titles, else a trained model's item embeddings."""
    if item_embeddings is not None:
        try:
            state = torch.load(item_embeddings, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise ConfigError(f"cannot read item embeddings from {item_embeddings}: {error}") from None
        weight = state.get("state_dict", state).get("item_embedding.weight")
        if weight is None or weight.shape[0] != dataset.num_items + 1:
            raise ConfigError(f"{item_embeddings} has no item_embedding.weight for {dataset.num_items} items")
        return ItemSpace.from_embeddings(weight.float().numpy())
    if not dataset.has_text:
        flags = "--item-embeddings MODEL.pt" if mode == "retrieval" else "--views retrieval --item-embeddings MODEL.pt"
        raise ConfigError(
            f"{dataset.name} has no item titles, so neither an LLM nor text similarity can "
            f"read it; run with {flags} (a model trained on this dataset)"
        )
    return ItemSpace.from_text(dataset.titles, encoder or TextEncoder(), cache_dir("embeddings"))


def generate_views(
    dataset: Dataset,
    out: Path,
    view_config: ViewConfig,
    runtime: RuntimeConfig | None = None,
    users: Sequence[int] | None = None,
    encoder_name: str = DEFAULT_ENCODER,
    item_embeddings: Path | None = None,
    progress: bool = True,
    generator: Generator | None = None,
) -> dict:
    """Make (or reuse) the views of ``users`` and write ``report.json`` in ``out``.

    ``generator`` is an already loaded LLM (else ``runtime`` says which to load); it is left
    open for the caller.
    """
    split = leave_one_out(dataset.sequences, dataset.num_items)
    users = list(range(dataset.num_users)) if users is None else list(users)
    llm = view_config.mode in LLM_MODES
    encoder = TextEncoder(encoder_name) if llm or item_embeddings is None else None
    model_space = None
    if view_config.mode == "llm-rank" and item_embeddings is not None:
        # ranking reads titles: text similarity stays, the model's neighbours join the candidates
        model_space = item_space(dataset, view_config.mode, None, item_embeddings)
        item_embeddings = None
    space = item_space(dataset, view_config.mode, encoder, item_embeddings)
    owned = generator is None and llm
    # loaded on the first user missing from the cache: a run whose views were made ahead (on a
    # GPU, say) never loads the LLM here
    generator = LazyGenerator(runtime or RuntimeConfig()) if owned else generator
    cache = ViewCache(out / CACHE_FILE)
    try:
        maker = ViewMaker(
            dataset.titles, dataset.categories, space, view_config, generator, encoder, cache, model_space
        )
        histories = {dataset.user_ids[u]: split.train[u].tolist() for u in users}
        log.info("%s views of %d users of %s (%s)", view_config.mode, len(users), dataset.name, maker.model_key)
        _, stats = maker.make(histories, progress=progress)
        # read before closing: a lazy generator forgets its model when it closes
        model = generator.model_info() if generator else {"key": maker.model_key}
        generation = generator.stats.as_dict() if generator else None
    finally:
        cache.close()
        if owned:
            generator.close()
    report = {
        "dataset": dataset.name,
        "users": len(users),
        "view_config": asdict(view_config),
        "runtime": asdict(runtime or RuntimeConfig()) if owned else None,
        "model": model,
        "item_space": space.source,
        "prompt_version": maker.version,
        "domain": maker.domain.noun,
        "stats": stats.summary(),
        "generation": generation,
        "peak_rss_mb": peak_rss_mb(),
        "versions": environment(),
    }
    write_json(out / REPORT_FILE, report)
    return report


def format_stats(stats: dict) -> str:
    """The per-view accounting as a small table."""
    columns = (
        "parse_rate",
        "grounding_rate",
        "mean_grounding_similarity",
        "fallback_rate",
        "padded",
        "mean_profile_similarity",
    )
    lines = [f"{'view':<15}" + "".join(f"{c:>27}" for c in columns)]
    for view, values in stats["views"].items():
        cells = [values[c] for c in columns]
        lines.append(f"{view:<15}" + "".join(f"{'-' if v is None else round(v, 3):>27}" for v in cells))
    own = stats["mean_own_profile_similarity"]
    lines.append(
        f"users {stats['users']} ({stats['from_cache']} from cache), "
        f"{stats['users_per_minute'] or 0:.1f} users/min; the users' own items: profile similarity "
        f"{own if own is None else round(own, 3)}"
    )
    return "\n".join(lines)


def inspect_views(dataset: Dataset, out: Path, user_ids: Sequence[str], history_len: int = 10) -> str:
    """A user's recent training titles next to each cached view's titles and similarities."""
    cache_path = out / CACHE_FILE
    if not cache_path.is_file():
        raise ConfigError(f"no views in {out}; run lumos views generate first")
    cache = ViewCache(cache_path)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    index = {user: i for i, user in enumerate(dataset.user_ids)}
    blocks = []
    try:
        for user in user_ids:
            if user not in index:
                raise ConfigError(f"unknown user id {user} in {dataset.name}")
            records = cache.latest(user)
            if not records:
                raise ConfigError(f"no cached views for user {user} in {cache_path}")
            history = split.train[index[user]].tolist()
            lines = [f"user {user}: last {min(history_len, len(history))} of {len(history)} training items"]
            lines += [f"    {_title(dataset, i)}" for i in history[-history_len:]]
            for view, record in records.items():
                lines.append(f"  {view} ({record.source}):")
                lines += [
                    f"    {_title(dataset, i):<70} grounding {_number(g)}  profile {_number(p)}"
                    for i, g, p in zip(record.items, record.grounding, record.profile_similarity)
                ]
            blocks.append("\n".join(lines))
    finally:
        cache.close()
    return "\n\n".join(blocks)


def _title(dataset: Dataset, item: int) -> str:
    title = dataset.titles[item] or f"item {dataset.item_ids[item]}"
    return title if len(title) <= 68 else title[:67] + "…"


def _number(value: float) -> str:
    return "  -  " if value is None or math.isnan(value) else f"{value:.2f}"
