"""A client's views of its own users, on its own device: loaded from its cache, made when missing.

The LUMOS objective (:mod:`lumosrec.client.objectives.lumos`) calls :func:`client_views`
before a node trains. Views
never leave the node: they are read from (and written to) the node's view cache folder and
turned into item tables for the local loss.

* Catalogs with item text: the views of the configured mode (``llm`` or ``retrieval``) are
  looked up in the SQLite cache (:mod:`lumosrec.augment.cache`) by model, prompt version and history
  hash; only users without a matching record are made, with the LLM loaded on first need
  (:class:`lumosrec.augment.backends.LazyGenerator`). ``lumos views generate`` fills the same cache
  ahead of a federation.
* Catalogs without text (``amazon-baby``, ``amazon-cellphones``): retrieval views over the
  item embeddings of the global model the client last received. They change with the model,
  so they are remade every round and not cached (a few matrix products per user).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lumosrec.augment.backends import LazyGenerator
from lumosrec.augment.cache import CACHE_FILE, ViewCache
from lumosrec.augment.grounding import DEFAULT_ENCODER, ItemSpace, TextEncoder
from lumosrec.augment.runtime import DEFAULT_MODEL, RuntimeConfig
from lumosrec.augment.views import LLM_MODES, MODES, ViewConfig, ViewMaker
from lumosrec.core.dataset import Dataset, sample_users
from lumosrec.core.errors import ConfigError
from lumosrec.core.paths import cache_dir

log = logging.getLogger(__name__)

#: what a row of results says about where its views came from
SOURCE_LLM, SOURCE_TEXT_RETRIEVAL, SOURCE_MODEL_RETRIEVAL = "llm", "retrieval:text", "retrieval:model-embeddings"
SOURCE_LLM_RANK = "llm-rank"
#: ``views`` values: the generation modes, and ``model``: retrieval over the received model's item
#: embeddings for any catalog (what catalogs without text always get)
VIEW_SOURCES = (*MODES, "model")


@dataclass(frozen=True)
class ViewSettings:
    """The run-config keys ``views*`` of the Flower app."""

    mode: str = "llm"
    folder: str = ""
    model: str = DEFAULT_MODEL
    backend: str = "auto"
    items_per_view: int = 5
    encoder: str = DEFAULT_ENCODER
    #: LLM modes only: a fixed random subset of this many users gets LLM views and every other
    #: user text retrieval views (0: every user); the LLM's time on CPU grows with the users
    llm_users: int = 0
    llm_seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in VIEW_SOURCES:
            raise ConfigError(f"unknown views mode {self.mode!r}; choose one of {', '.join(VIEW_SOURCES)}")

    @classmethod
    def from_config(cls, run_config: Mapping, node_config: Mapping) -> ViewSettings:
        """A node's ``views-dir`` (``--node-config``) wins over the run's."""
        return cls(
            mode=str(run_config["views"]),
            folder=str(node_config.get("views-dir", run_config["views-dir"])),
            model=str(run_config["views-model"]),
            backend=str(run_config["views-backend"]),
            items_per_view=int(run_config["views-items"]),
            llm_users=int(run_config.get("views-llm-users", 0)),
            llm_seed=int(run_config.get("views-llm-seed", 0)),
        )

    def view_config(self) -> ViewConfig:
        """The generation settings: the same whether views are made ahead or on the client."""
        # views over the model are retrieval views in another item space
        mode = "retrieval" if self.mode == "model" else self.mode
        return ViewConfig(mode=mode, items_per_view=self.items_per_view)

    def llm_subset(self, dataset: Dataset) -> np.ndarray | None:
        """The dataset indices of the users whose views the LLM writes when that is not every
        user (``views-llm-users``), else None: the same users for every run given the seed."""
        if self.mode not in LLM_MODES or not dataset.has_text or not 0 < self.llm_users < dataset.num_users:
            return None
        return sample_users(dataset.num_users, self.llm_users, self.llm_seed)

    def without_llm(self) -> ViewSettings:
        """The settings of the users outside the LLM subset: text retrieval, no LLM."""
        return replace(self, mode="retrieval", llm_users=0)

    def cache_path(self, dataset_name: str) -> Path:
        folder = Path(self.folder) if self.folder else cache_dir("views") / dataset_name
        return folder / CACHE_FILE


def views_source(dataset: Dataset, settings: ViewSettings) -> str:
    """``llm``, ``llm-rank``, ``retrieval:text`` or ``retrieval:model-embeddings`` (``views =
    "model"``, and catalogs without text)."""
    if not dataset.has_text or settings.mode == "model":
        return SOURCE_MODEL_RETRIEVAL
    source = {"llm": SOURCE_LLM, "llm-rank": SOURCE_LLM_RANK}.get(settings.mode, SOURCE_TEXT_RETRIEVAL)
    if settings.llm_subset(dataset) is not None:
        return f"{source} ({settings.llm_users} users, seed {settings.llm_seed}), {SOURCE_TEXT_RETRIEVAL} (the others)"
    return source


#: (dataset identity, settings) -> (dataset, maker): one maker per process, as a Ray actor serves
#: many virtual clients; holding the dataset keeps its identity from being reused
_MAKERS: dict[tuple[int, ViewSettings], tuple[Dataset, ViewMaker]] = {}


def _text_maker(dataset: Dataset, settings: ViewSettings) -> ViewMaker:
    key = (id(dataset), settings)
    if key not in _MAKERS:
        _MAKERS[key] = (dataset, _new_text_maker(dataset, settings))
    return _MAKERS[key][1]


def _new_text_maker(dataset: Dataset, settings: ViewSettings) -> ViewMaker:
    encoder = TextEncoder(settings.encoder)
    space = ItemSpace.from_text(dataset.titles, encoder, cache_dir("embeddings"))
    config = settings.view_config()
    generator = (
        LazyGenerator(RuntimeConfig(model=settings.model, backend=settings.backend))
        if settings.mode in LLM_MODES
        else None
    )
    cache = ViewCache(settings.cache_path(dataset.name))
    return ViewMaker(dataset.titles, dataset.categories, space, config, generator, encoder, cache)


def client_views(
    dataset: Dataset,
    users: Sequence[int],
    histories: Sequence[np.ndarray],
    settings: ViewSettings,
    item_embeddings: np.ndarray | None = None,
    progress: bool = False,
) -> list[dict[str, list[int]]]:
    """``{view: item indices}`` for each of ``users`` (dataset indices) from their training
    ``histories``; ``item_embeddings`` (the received model's table) serve ``views = "model"`` and
    catalogs without text."""
    subset = settings.llm_subset(dataset)
    if subset is not None:
        in_subset = np.isin(np.asarray(users, dtype=np.int64), subset)
        views: dict[int, dict[str, list[int]]] = {}
        for part, part_settings in ((in_subset, replace(settings, llm_users=0)), (~in_subset, settings.without_llm())):
            chosen = np.flatnonzero(part)
            if chosen.size:
                made = client_views(dataset, [users[i] for i in chosen], [histories[i] for i in chosen], part_settings)
                views.update(zip(chosen.tolist(), made))
        return [views[i] for i in range(len(users))]
    keyed = {dataset.user_ids[user]: [int(i) for i in history] for user, history in zip(users, histories)}
    if dataset.has_text and settings.mode != "model":
        maker = _text_maker(dataset, settings)
    else:
        if item_embeddings is None:
            raise ValueError(f"{dataset.name}: views over the model need the model's item embeddings")
        maker = ViewMaker(
            dataset.titles,
            dataset.categories,
            ItemSpace.from_embeddings(item_embeddings),
            replace(settings.view_config(), mode="retrieval"),  # an llm mode falls back: no text to prompt with
        )
    made, stats = maker.make(keyed, progress=progress)
    if stats.users > stats.from_cache and maker.cache is not None:
        log.info("made the views of %d users (%d from the cache)", stats.users - stats.from_cache, stats.from_cache)
    if maker.generator is not None:
        # give the machine's LLM lock back: another client process may have users to make
        maker.generator.close()
    return [{name: view.items for name, view in made[user].items()} for user in keyed]
