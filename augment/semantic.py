"""SRA-CL's semantic side: LLM-written texts, their embeddings and the semantic neighbours.

Cui et al., "Semantic Retrieval Augmented Contrastive Learning for Sequential
Recommendation", NeurIPS 2025 (``research/sracl.md`` §4-5). Before training, the local LLM
(:mod:`lumosrec.augment.runtime`, the runtime of LUMOS's views) writes

* a preference summary per user, from the last ``history_len`` items of the user's
  *training* sequence only: no validation or test item reaches a prompt. One summary per
  user rather than one per prefix (DESIGN.md §2 allows it; the paper's code prompts every
  prefix, 20x the calls);
* a description per item that occurs in some training sequence, from its title, categories
  and the ``co_items`` items that most often precede it in training sequences.

A sentence encoder (all-MiniLM-L6-v2 by default) embeds the texts; ``source = "raw-text"``
embeds the titles themselves instead (the paper's "w/o LLM" ablation). Users then retrieve
their ``k`` most similar other users and items their ``k`` most similar described items
(:mod:`lumosrec.augment.neighbours`), or random ones for the "random retrieval" ablation.

Texts are cached in ``<folder>/texts.sqlite`` (keyed by model, prompt version and the
prompt's input), so a rerun or another seed reuses them and an interrupted run resumes; the
LLM cost (tokens, minutes, users and items per minute) goes to ``<folder>/report.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lumosrec.augment.backends import LazyGenerator
from lumosrec.augment.cache import TextCache
from lumosrec.augment.grounding import DEFAULT_ENCODER, TextEncoder, cached_encode
from lumosrec.augment.neighbours import INDEXES, nearest_neighbours, random_neighbours
from lumosrec.augment.prompts import DOMAINS, MAX_TITLE_CHARS, Domain, detect_domain, few_shot_example
from lumosrec.augment.runtime import Chat, Generator, RuntimeConfig
from lumosrec.core.dataset import Dataset
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import LeaveOneOut
from lumosrec.core.paths import cache_dir
from lumosrec.core.progress import progress_bar
from lumosrec.core.results import environment, peak_rss_mb, write_json

log = logging.getLogger(__name__)

PROMPT_VERSION = "sracl-v1"  # bump whenever a prompt text or example changes: part of the cache key
SOURCES = ("llm", "raw-text")
RETRIEVALS = ("semantic", "random")
TEXT_FILE, REPORT_FILE = "texts.sqlite", "report.json"

SYSTEM = "You are an expert in recommending {noun}s. You write short, specific, factual summaries."
USER_TASK = (
    "A user {verb} these {noun}s, oldest first:\n{lines}\n"
    "Summarize this user's preferences in {noun}s in at most 40 words."
)
ITEM_TASK = (
    "Describe this {noun} and the kind of user who would choose it, in at most 40 words.\n"
    "{Noun}: {title}\nCategories: {categories}\nUsers chose it right after: {before}"
)


@dataclass
class SemanticConfig:
    """How the semantic side is made (``lumos train --method sracl`` flags)."""

    source: str = "llm"
    retrieval: str = "semantic"
    index: str = "exact"
    k: int = 10
    encoder: str = DEFAULT_ENCODER
    history_len: int = 20
    co_items: int = 3
    user_tokens: int = 64
    item_tokens: int = 64
    #: tokens of each text the encoder reads (all-MiniLM-L6-v2 was trained on 128)
    encoder_tokens: int = 128
    folder: str = ""
    domain: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("source", self.source, SOURCES),
            ("retrieval", self.retrieval, RETRIEVALS),
            ("index", self.index, INDEXES),
        ):
            if value not in choices:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if self.domain != "auto" and self.domain not in DOMAINS:
            raise ConfigError(f"unknown domain {self.domain!r}; choose auto or one of {', '.join(DOMAINS)}")

    def cache_folder(self, dataset_name: str) -> Path:
        return Path(self.folder) if self.folder else cache_dir("semantic") / dataset_name


@dataclass
class SemanticSide:
    """Per user and item: a semantic vector and the neighbours retrieved with it.

    ``user_neighbours[u]`` are user indices, ``item_neighbours[i]`` item indices; an item
    without a description (no training interaction) has itself as every neighbour, so
    substituting it changes nothing.
    """

    user_vectors: np.ndarray
    item_vectors: np.ndarray
    user_neighbours: np.ndarray
    item_neighbours: np.ndarray
    report: dict = field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return int(self.user_vectors.shape[1])


def _short(title: str) -> str:
    return title if len(title) <= MAX_TITLE_CHARS else title[: MAX_TITLE_CHARS - 1].rstrip() + "…"


def _taste(items: Sequence[int], categories: Sequence[Sequence[str]]) -> str:
    """The (at most two) most frequent categories of ``items``, as a phrase."""
    counts = Counter(label for item in items for label in categories[item][-1:])
    return " and ".join(label.lower() for label, _ in counts.most_common(2)) or "varied"


def _user_turn(
    history: Sequence[int], titles: Sequence[str], categories: Sequence[Sequence[str]], domain: Domain
) -> str:
    lines = "\n".join(
        f"- {_short(titles[i])}" + (f" [{categories[i][-1]}]" if categories[i] else "") for i in history if titles[i]
    )
    return USER_TASK.format(verb=domain.verb, noun=domain.noun, lines=lines)


def _item_turn(
    item: int, before: Sequence[int], titles: Sequence[str], categories: Sequence[Sequence[str]], domain: Domain
) -> str:
    context = "; ".join(_short(titles[i]) for i in before if titles[i]) or "none recorded"
    return ITEM_TASK.format(
        noun=domain.noun,
        Noun=domain.noun.capitalize(),
        title=_short(titles[item]),
        categories=", ".join(categories[item]) or "unknown",
        before=context,
    )


@dataclass
class Examples:
    """One worked exchange per prompt, built from the catalog (as the view prompts' few-shot
    example, :func:`lumosrec.augment.prompts.few_shot_example`): a 135M model asked for a summary
    without one invents a film plot; with one it describes the user."""

    user: tuple[str, str]
    item: tuple[str, str]

    @classmethod
    def from_catalog(
        cls, titles: Sequence[str], categories: Sequence[Sequence[str]], domain: Domain, seed: int = 0
    ) -> Examples:
        shot = few_shot_example(titles, categories, seed)
        history, item = shot.history, shot.answers["future"][0]
        taste = _taste(history, categories)
        user_answer = (
            f"Prefers {taste} {domain.noun}s, for example {_short(titles[history[-1]])} and "
            f"{_short(titles[history[0]])}; likely to choose more {taste} {domain.noun}s next."
        )
        item_answer = (
            f"A {', '.join(categories[item]).lower() or 'general'} {domain.noun}. It suits users who "
            f"like {_taste([item, *history[-2:]], categories)} {domain.noun}s such as "
            f"{_short(titles[history[-1]])}."
        )
        return cls(
            (_user_turn(history, titles, categories, domain), user_answer),
            (_item_turn(item, history[-2:], titles, categories, domain), item_answer),
        )


def _chat(turn: str, example: tuple[str, str], domain: Domain) -> Chat:
    return [
        {"role": "system", "content": SYSTEM.format(noun=domain.noun)},
        {"role": "user", "content": example[0]},
        {"role": "assistant", "content": example[1]},
        {"role": "user", "content": turn},
    ]


def preceding_items(train: Sequence[np.ndarray], count: int) -> dict[int, list[int]]:
    """For every item of the training sequences, the ``count`` items that most often come
    right before it (ties: the earlier seen first)."""
    before: dict[int, Counter] = {}
    for sequence in train:
        for previous, item in zip(sequence[:-1].tolist(), sequence[1:].tolist()):
            if previous != item:
                before.setdefault(item, Counter())[previous] += 1
    return {item: [i for i, _ in before.get(item, Counter()).most_common(count)] for item in training_items(train)}


def training_items(train: Sequence[np.ndarray]) -> list[int]:
    """Every item of the training sequences, in index order."""
    return sorted({int(i) for sequence in train for i in sequence.tolist()})


def _digest(prompt: Chat) -> str:
    return hashlib.sha256(repr(prompt).encode()).hexdigest()[:16]


@dataclass
class TextStats:
    """LLM cost of one kind of text in one call."""

    texts: int = 0
    from_cache: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "texts": self.texts,
            "from_cache": self.from_cache,
            **rates(self.texts - self.from_cache, self.completion_tokens, self.seconds),
        }


def rates(made: int, completion_tokens: int, seconds: float) -> dict:
    """``made`` texts of ``completion_tokens`` in ``seconds``, per minute and per second."""
    return {
        "made": made,
        "completion_tokens": completion_tokens,
        "seconds": seconds,
        "minutes": seconds / 60,
        "per_minute": 60 * made / seconds if seconds else None,
        "tokens_per_second": completion_tokens / seconds if seconds else None,
    }


def generate_texts(
    kind: str,
    prompts: dict[str, Chat],
    generator: Generator,
    model_key: str,
    cache: TextCache,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[dict[str, str], TextStats]:
    """One text per prompt (``{key: chat}``): cached ones reused, the rest generated in
    batches and stored as each batch finishes."""
    digests = {key: _digest(prompt) for key, prompt in prompts.items()}
    texts = cache.get(model_key, PROMPT_VERSION, kind, list(digests), list(digests.values()))
    pending = [key for key in prompts if key not in texts]
    stats = TextStats(texts=len(prompts), from_cache=len(texts))
    bar = progress_bar(total=len(pending), desc=f"{kind} texts", unit=kind, disable=not progress or not pending)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        tokens_before, batch_started = generator.stats.completion_tokens, time.perf_counter()
        outputs = generator.generate([prompts[key] for key in batch], max_new_tokens)
        made = {key: " ".join(text.split()) for key, text in zip(batch, outputs)}
        tokens, seconds = generator.stats.completion_tokens - tokens_before, time.perf_counter() - batch_started
        cache.put(
            model_key, PROMPT_VERSION, kind, {key: (digests[key], text) for key, text in made.items()}, tokens, seconds
        )
        texts.update(made)
        stats.completion_tokens += tokens
        stats.seconds += seconds
        bar.update(len(batch))
        bar.set_postfix(per_min=f"{60 * bar.n / stats.seconds:.1f}")
    bar.close()
    return texts, stats


def _require_text(dataset: Dataset) -> None:
    if not dataset.has_text:
        raise ConfigError(
            f"SRA-CL reads item titles, and {dataset.name} has none; use a dataset with an items.csv that has titles"
        )


def semantic_prompts(
    dataset: Dataset, split: LeaveOneOut, config: SemanticConfig
) -> tuple[dict[str, Chat], dict[str, Chat]]:
    """The summary prompt of every user (by user id) and the description prompt of every
    titled item that occurs in training (by item index). Only ``split.train`` is read:
    validation and test items never reach a prompt."""
    titles, categories = dataset.titles, dataset.categories
    domain = DOMAINS[detect_domain(titles) if config.domain == "auto" else config.domain]
    before = preceding_items(split.train, config.co_items)
    # the worked examples too are drawn from training items only
    examples = Examples.from_catalog(
        [title if i in before else "" for i, title in enumerate(titles)], categories, domain, config.seed
    )
    users = {
        dataset.user_ids[u]: _chat(
            _user_turn(sequence[-config.history_len :].tolist(), titles, categories, domain), examples.user, domain
        )
        for u, sequence in enumerate(split.train)
    }
    items = {
        str(item): _chat(_item_turn(item, previous, titles, categories, domain), examples.item, domain)
        for item, previous in before.items()
        if titles[item]
    }
    return users, items


def semantic_texts(
    dataset: Dataset, split: LeaveOneOut, config: SemanticConfig, runtime: RuntimeConfig, progress: bool = True
) -> tuple[list[str], dict[int, str], dict]:
    """The text embedded for every user (by index) and every described item, and the LLM cost."""
    _require_text(dataset)
    titles, categories = dataset.titles, dataset.categories
    if config.source == "raw-text":
        users = [
            "; ".join(titles[i] for i in sequence[-config.history_len :].tolist() if titles[i])
            for sequence in split.train
        ]
        items = {
            item: f"{titles[item]} ({', '.join(categories[item])})" if categories[item] else titles[item]
            for item in training_items(split.train)
            if titles[item]
        }
        return users, items, {"source": "raw-text"}
    user_prompts, item_prompts = semantic_prompts(dataset, split, config)
    generator = LazyGenerator(runtime)
    folder = config.cache_folder(dataset.name)
    cache = TextCache(folder / TEXT_FILE)
    try:
        user_texts, user_stats = generate_texts(
            "user", user_prompts, generator, generator.key, cache, config.user_tokens, runtime.batch_size, progress
        )
        item_texts, item_stats = generate_texts(
            "item", item_prompts, generator, generator.key, cache, config.item_tokens, runtime.batch_size, progress
        )
        model = generator.model_info()
        # what the whole cache cost, whichever runs (resumed, interrupted) made its texts
        generation = {kind: rates(**cache.cost(generator.key, PROMPT_VERSION, kind)) for kind in ("user", "item")}
    finally:
        cache.close()
        generator.close()
    report = {
        "source": "llm",
        "dataset": dataset.name,
        "users": dataset.num_users,
        "prompt_version": PROMPT_VERSION,
        "model": model,
        "runtime": asdict(runtime),
        "user_texts": user_stats.summary(),
        "item_texts": item_stats.summary(),
        "generation": generation,
        "peak_rss_mb": peak_rss_mb(),
        "versions": environment(),
    }
    write_json(folder / REPORT_FILE, report)
    users = [user_texts[user] for user in dataset.user_ids]
    # the title first: a small model's description can drift from the item it describes
    items = {int(key): f"{titles[int(key)]}. {text}" for key, text in item_texts.items()}
    return users, items, report


def build_semantic_side(
    dataset: Dataset,
    split: LeaveOneOut,
    config: SemanticConfig | None = None,
    runtime: RuntimeConfig | None = None,
    progress: bool = True,
) -> SemanticSide:
    """Texts, embeddings and neighbours of every user and described item of ``dataset``."""
    config, runtime = config or SemanticConfig(), runtime or RuntimeConfig()
    started = time.perf_counter()
    user_texts, item_texts, report = semantic_texts(dataset, split, config, runtime, progress)
    encoder = TextEncoder(config.encoder, max_length=config.encoder_tokens)
    embeddings = cache_dir("embeddings")
    user_vectors = cached_encode(encoder, user_texts, embeddings)
    described = np.array(sorted(item_texts), dtype=np.int64)
    item_vectors = np.zeros((dataset.num_items + 1, encoder.dimension), dtype=np.float32)
    item_vectors[described] = cached_encode(encoder, [item_texts[i] for i in described.tolist()], embeddings)
    rng = np.random.default_rng(config.seed)
    if config.retrieval == "random":
        user_neighbours = random_neighbours(dataset.num_users, config.k, np.arange(dataset.num_users), rng)
        found = random_neighbours(dataset.num_items + 1, config.k, described, rng)
    else:
        user_neighbours = nearest_neighbours(user_vectors, config.k, index=config.index)
        found = nearest_neighbours(item_vectors, config.k, described, config.index)
    item_neighbours = np.repeat(np.arange(dataset.num_items + 1)[:, None], found.shape[1], axis=1)
    item_neighbours[described] = found[described]
    report = {
        **report,
        "config": asdict(config),
        "encoder": encoder.name,
        "described_items": len(described),
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "semantic side of %s: %d users, %d described items, %s retrieval (k=%d), %.0f s",
        dataset.name,
        dataset.num_users,
        len(described),
        config.retrieval,
        user_neighbours.shape[1],
        report["seconds"],
    )
    return SemanticSide(user_vectors, item_vectors, user_neighbours, item_neighbours, report)
