"""The three view prompts of LUMOS, versioned, with one in-domain few-shot exchange each.

Each prompt is a chat: a system turn that fixes the output format, one example exchange,
then the user's last ``history_len`` training titles (with their first category) and the
task. The example is built from the public catalog only (items of one category as the
history; other items of that category as "next" and "same taste"; items of an unrelated
category as "would not choose"), so it is in the dataset's own domain and the same for every
user: the prompt's long shared prefix then stays in the runtime's KV cache. Small models copy
out-of-domain examples (movie titles for beauty products), hence in-domain examples
(``research/llm_runtime.md`` §3).

The ``llm-rank`` views use other prompts (:func:`build_rank_prompt`): the history, then catalog
candidates labelled with letters, and a question answered by one letter, whose next-token
probabilities rank the candidates.

Bump :data:`PROMPT_VERSION` (:data:`RANK_VERSION`) whenever a text below changes: it is part of
the cache key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lumosrec.augment.runtime import Chat

PROMPT_VERSION = "v1"
VIEWS = ("future", "paraphrase", "counterfactual")
MAX_TITLE_CHARS = 90


@dataclass(frozen=True)
class Domain:
    """How the prompts name the catalog's items."""

    noun: str
    verb: str


DOMAINS = {
    "movies": Domain("movie", "watched"),
    "products": Domain("product", "bought"),
    "items": Domain("item", "chose"),
}

YEAR_SUFFIX = re.compile(r"\(\d{4}\)\s*$")

SYSTEM = (
    "You are a recommender system for a catalog of {noun}s. You only output {noun} titles, one per line, "
    "with no numbering and no comments."
)
TASKS = {
    "future": "List {k} other {noun}s this user will want next.",
    "paraphrase": "List {k} different {noun}s that express the same taste as this list, without repeating any of them.",
    "counterfactual": "List {k} {noun}s this user would never choose, unlike everything in the list.",
}


def detect_domain(titles: Sequence[str]) -> str:
    """``movies`` when most titles end with a year, as in MovieLens; else ``products``."""
    named = [title for title in titles if title]
    if named and sum(bool(YEAR_SUFFIX.search(t)) for t in named) > len(named) / 2:
        return "movies"
    return "products"


def _line(title: str, categories: Sequence[str], max_chars: int = MAX_TITLE_CHARS, bullet: str = "-") -> str:
    title = title if len(title) <= max_chars else title[: max_chars - 1].rstrip() + "…"
    return f"{bullet} {title} [{categories[-1]}]" if categories else f"{bullet} {title}"


@dataclass
class FewShot:
    """The example exchange of each view, drawn from the catalog."""

    history: list[int]
    answers: dict[str, list[int]]

    @property
    def items(self) -> set[int]:
        return set(self.history) | {item for answer in self.answers.values() for item in answer}


EXAMPLE_HISTORY, EXAMPLE_ANSWER = 4, 3


def few_shot_example(titles: Sequence[str], categories: Sequence[Sequence[str]], seed: int = 0) -> FewShot:
    """History and answers from the catalog: the largest category gives the history and the
    "next"/"same taste" answers, the largest category sharing no label with it the
    "would never choose" answer. The example is short: it only has to show the format."""
    rng = np.random.default_rng(seed)
    named = [i for i in range(1, len(titles)) if titles[i]]
    by_category: dict[str, list[int]] = {}
    for item in named:
        if categories[item]:
            by_category.setdefault(categories[item][-1], []).append(item)
    needed = EXAMPLE_HISTORY + 2 * EXAMPLE_ANSWER
    ranked = [label for label, items in sorted(by_category.items(), key=lambda kv: -len(kv[1])) if len(items) >= needed]
    if ranked:
        liked = ranked[0]
        liked_labels = {label for item in by_category[liked] for label in categories[item]}
        unrelated = next(
            (
                label
                for label in ranked[1:]
                if not liked_labels & {lab for item in by_category[label] for lab in categories[item]}
            ),
            ranked[-1] if len(ranked) > 1 else None,
        )
        pool = list(rng.permutation(by_category[liked]))
        other = list(rng.permutation(by_category[unrelated])) if unrelated else list(rng.permutation(named))
    else:  # no usable categories: the example still shows the format
        pool = other = list(rng.permutation(named))
    history, pool = pool[:EXAMPLE_HISTORY], pool[EXAMPLE_HISTORY:]
    answers = {
        "future": pool[:EXAMPLE_ANSWER],
        "paraphrase": pool[EXAMPLE_ANSWER : 2 * EXAMPLE_ANSWER],
        "counterfactual": [item for item in other if item not in history][:EXAMPLE_ANSWER],
    }
    return FewShot([int(i) for i in history], {view: [int(i) for i in items] for view, items in answers.items()})


def _history_block(domain: Domain, history: Sequence[int], titles, categories) -> str:
    lines = "\n".join(_line(titles[i], categories[i]) for i in history if titles[i])
    return f"A user {domain.verb} these {domain.noun}s, oldest first:\n{lines}\n"


def build_prompt(
    view: str,
    history: Sequence[int],
    titles: Sequence[str],
    categories: Sequence[Sequence[str]],
    example: FewShot,
    domain: Domain,
    k: int,
) -> Chat:
    """The chat prompt of one view for one user's (training) history."""
    task = TASKS[view].format(k=k, noun=domain.noun)
    answer = "\n".join(titles[i][:MAX_TITLE_CHARS] for i in example.answers[view])
    return [
        {"role": "system", "content": SYSTEM.format(noun=domain.noun)},
        {"role": "user", "content": _history_block(domain, example.history, titles, categories) + task},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": _history_block(domain, history, titles, categories) + task},
    ]


BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|#+)\s*")
CATEGORY_SUFFIX = re.compile(r"\s*\[[^\]]*\]\s*$")
#: a list squeezed into one line: "A [Cat], B [Cat]" (titles themselves may contain commas)
AFTER_TAG = re.compile(r"(?<=\])\s*[,;]\s*")


def parse_titles(text: str, max_chars: int = 200) -> list[str]:
    """Title-shaped lines of a completion: bullets, numbers, quotes and category tags removed;
    empty, header-like (``...:``) and overlong lines dropped."""
    titles = []
    for line in text.splitlines():
        for part in AFTER_TAG.split(line):
            part = CATEGORY_SUFFIX.sub("", BULLET.sub("", part)).strip().strip("\"'`*").strip()
            if 2 <= len(part) <= max_chars and not part.endswith(":"):
                titles.append(part)
    return titles


RANK_VERSION = "rank-v1"
#: candidate labels: capital letters, one token each in the usual tokenizers (checked by the backend)
LABELS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: titles are cut shorter than in the free prompts: a rank prompt lists history and candidates
RANK_TITLE_CHARS = 60
#: what replaces every title in the content-free prompt of the calibration (Zhao et al., 2021)
CONTENT_FREE = "N/A"
RANK_SYSTEM = (
    "You are a recommender system for a catalog of {noun}s. You answer with the letter of one candidate, nothing else."
)
RANK_TASKS = {
    "future": "Which candidate will this user want next? Answer with its letter.",
    "paraphrase": "Which candidate expresses the same taste as this list? Answer with its letter.",
    "counterfactual": "Which candidate would this user never choose, unlike everything in the list? "
    "Answer with its letter.",
}


def build_rank_prompt(
    view: str,
    history: Sequence[int],
    candidates: Sequence[int],
    titles: Sequence[str],
    categories: Sequence[Sequence[str]],
    domain: Domain,
    content_free: bool = False,
) -> Chat:
    """The ranking prompt of one view: the history, the candidates labelled A, B, C ..., the
    question. The assistant's answer is left to the model, whose first token is the label.

    ``content_free`` replaces every title (history and candidates) by ``N/A`` and drops the
    categories: the prompt of the label-bias calibration, the same for every user."""

    def line(item: int, bullet: str) -> str:
        if content_free:
            return f"{bullet} {CONTENT_FREE}"
        return _line(titles[item], categories[item], RANK_TITLE_CHARS, bullet)

    past = "\n".join(line(i, "-") for i in history if content_free or titles[i])
    listed = "\n".join(line(item, f"{label}.") for label, item in zip(LABELS, candidates))
    return [
        {"role": "system", "content": RANK_SYSTEM.format(noun=domain.noun)},
        {
            "role": "user",
            "content": f"A user {domain.verb} these {domain.noun}s, oldest first:\n{past}\n\n"
            f"Candidates:\n{listed}\n\n{RANK_TASKS[view]}",
        },
    ]
