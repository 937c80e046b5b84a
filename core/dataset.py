"""Reading interaction data into chronological per-user item sequences.

Two input formats are accepted (see ``../shared/DESIGN.md`` §1):

* a folder with ``interactions.csv`` (``user_id,item_id,timestamp``) and an optional
  ``items.csv`` (``item_id,title,categories``, categories ``|``-separated);
* a one-line-per-user benchmark file (``user item item ...``, e.g. ``Beauty.txt``), with an
  optional ``items.csv`` beside it or given explicitly.

Users are ordered by time (ties keep file order), items are re-indexed ``1..N`` in the
order of their original ids (``0`` is padding) — every item of ``items.csv`` when there is
one, so that nodes holding different users agree on the index — and users with fewer than
:data:`MIN_INTERACTIONS` interactions are dropped and reported. Every malformed input
raises :class:`lumosrec.core.errors.DataError` naming the file, line and column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lumosrec.core.errors import DataError

log = logging.getLogger(__name__)

#: Leave-one-out needs a training item, a validation item and a test item.
MIN_INTERACTIONS = 3
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "categories")


@dataclass
class Dataset:
    """Chronological item sequences of every kept user, plus item text.

    Attributes
    ----------
    name : str
        Human-readable name (the folder or file name).
    sequences : list of numpy.ndarray
        One int64 array of item indices (``1..num_items``) per user, oldest first.
    user_ids : list of str
        Original user id of each sequence.
    item_ids : list of str
        Original item id of each index; ``item_ids[0]`` is the padding placeholder ``""``.
    titles, categories : list
        Item text by index (empty string / empty tuple when unknown).
    dropped_users : dict
        Original user id -> number of interactions, for users dropped as too short.
    """

    name: str
    sequences: list[np.ndarray]
    user_ids: list[str]
    item_ids: list[str]
    titles: list[str]
    categories: list[tuple[str, ...]]
    dropped_users: dict[str, int] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def has_text(self) -> bool:
        """Whether any item has a title (LLM views and text similarity need one)."""
        return any(self.titles[1:])

    def subset(self, users: Sequence[int]) -> Dataset:
        """The given users (indices) with the whole catalog, so item indices keep their meaning."""
        return replace(self, sequences=[self.sequences[u] for u in users], user_ids=[self.user_ids[u] for u in users])

    def content_sha256(self) -> str:
        """SHA-256 of the users' sequences and the catalog (ids and text): the same for the same data
        whatever its path or format, different as soon as an interaction or an item changes."""
        digest = hashlib.sha256()
        for user, sequence in zip(self.user_ids, self.sequences):
            digest.update(f"{user}\0{len(sequence)}\0".encode())
            digest.update(np.asarray(sequence, dtype=np.int64).tobytes())
        for item, title, categories in zip(self.item_ids, self.titles, self.categories):
            digest.update("\0".join((item, title, *categories, "\n")).encode())
        return digest.hexdigest()

    def stats(self) -> dict[str, float | int | str]:
        """Summary statistics, as printed by ``lumos data stats``."""
        lengths = np.array([len(s) for s in self.sequences])
        items = range(1, self.num_items + 1)
        return {
            "dataset": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "avg_length": round(float(lengths.mean()), 2),
            "median_length": float(np.median(lengths)),
            "max_length": int(lengths.max()),
            "density": round(self.num_interactions / (self.num_users * self.num_items), 6),
            "title_coverage": round(sum(bool(self.titles[i]) for i in items) / self.num_items, 4),
            "category_coverage": round(sum(bool(self.categories[i]) for i in items) / self.num_items, 4),
            "dropped_users": len(self.dropped_users),
        }


def sample_users(num_users: int, sample: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """A fixed random sample of ``sample`` user indices, sorted (all users when ``sample`` is 0
    or not smaller than ``num_users``): the same subset for every method given the seed."""
    users = np.arange(num_users)
    if 0 < sample < num_users:
        users = np.sort(np.random.default_rng(seed).choice(users, sample, replace=False))
    return users


@dataclass
class _ItemText:
    titles: dict[str, str]
    categories: dict[str, tuple[str, ...]]


def load_dataset(path: str | Path, items_path: str | Path | None = None) -> Dataset:
    """Load a dataset folder or a one-line-per-user sequences file.

    Parameters
    ----------
    path : str or Path
        A folder holding ``interactions.csv`` (and usually ``items.csv``), or a
        whitespace-separated sequences file.
    items_path : str or Path, optional
        An ``items.csv`` to use instead of the one found beside the interactions.

    Returns
    -------
    Dataset
        Users with at least :data:`MIN_INTERACTIONS` interactions; the others are listed in
        ``Dataset.dropped_users`` and logged.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        interactions = path / "interactions.csv"
        if not interactions.is_file():
            raise DataError(
                f"{path}: interactions.csv not found (expected a folder with interactions.csv "
                "and items.csv, or a one-line-per-user sequences file)"
            )
        default_items = path / "items.csv"
        user_items = _read_interactions(interactions)
        source = interactions
    else:
        default_items = path.parent / "items.csv"
        user_items = _read_sequences_file(path)
        source = path
    if items_path is not None:
        items_path = Path(items_path)
        if not items_path.is_file():
            raise DataError(f"{items_path}: no such items file")
    elif default_items.is_file():
        items_path = default_items
    text = _read_items(items_path) if items_path is not None else None
    if text is None:
        log.warning("%s: no items.csv, items have no text", path)
    name = path.name if path.is_dir() else path.stem
    return _index(name, user_items, text, source, items_path)


def _unreadable(path: Path, line: int, error: Exception) -> DataError:
    """The one-line error of a file that is not UTF-8 text or has an oversized field."""
    if isinstance(error, UnicodeDecodeError):
        # text is decoded in blocks, so the bad byte is at this line or a little after it
        return DataError(
            f"{path} near line {line}: not UTF-8 text (a binary file, or another encoding: save it as UTF-8)"
        )
    return DataError(f"{path} line {line}: {error}")


def _csv_rows(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, row)`` of a CSV reader; undecodable bytes and oversized fields become a DataError."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as error:  # before the line was read
            raise _unreadable(path, reader.line_num + 1, error) from None
        except csv.Error as error:  # in the line just read
            raise _unreadable(path, reader.line_num, error) from None
        yield reader.line_num, row


def _text_lines(handle, path: Path) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of a text file; undecodable bytes become a DataError."""
    line = 0
    while True:
        try:
            text = next(handle)
        except StopIteration:
            return
        except UnicodeDecodeError as error:
            raise _unreadable(path, line + 1, error) from None
        line += 1
        yield line, text


def _open_csv(path: Path, expected: tuple[str, ...]) -> tuple:
    """Open a CSV, check its header and return (rows after the header, handle, column positions)."""
    handle = open(path, newline="", encoding="utf-8")  # noqa: SIM115 -- the caller closes it
    reader = _csv_rows(csv.reader(handle), path)
    try:
        _, header = next(reader, (1, None))
    except DataError:
        handle.close()
        raise
    if header is None:
        handle.close()
        raise DataError(f"{path}: file is empty (expected a header line {','.join(expected)})")
    header = [column.strip().lstrip("\ufeff") for column in header]
    missing = [column for column in expected if column not in header]
    if missing:
        handle.close()
        raise DataError(
            f"{path} line 1: missing column(s) {', '.join(missing)}; expected "
            f"{','.join(expected)}, found {','.join(header)}"
        )
    return reader, handle, [header.index(column) for column in expected]


def _parse_int(value: str, path: Path, line: int, column: str) -> str:
    value = value.strip()
    if not value:
        raise DataError(f"{path} line {line}, column {column}: empty value")
    try:
        int(value)
    except ValueError:
        raise DataError(f"{path} line {line}, column {column}: {value!r} is not an integer id") from None
    return value


def _read_interactions(path: Path) -> dict[str, list[tuple[float, int, str]]]:
    """Return user -> [(timestamp, line, item)] read from ``interactions.csv``."""
    reader, handle, (user_col, item_col, time_col) = _open_csv(path, INTERACTION_COLUMNS)
    width = max(user_col, item_col, time_col) + 1
    user_items: dict[str, list[tuple[float, int, str]]] = {}
    seen: dict[tuple[str, str, str], int] = {}
    with handle:
        for line, row in reader:
            if not row:
                continue
            if len(row) < width:
                raise DataError(f"{path} line {line}: expected {width} columns, found {len(row)}")
            user = _parse_int(row[user_col], path, line, "user_id")
            item = _parse_int(row[item_col], path, line, "item_id")
            stamp = row[time_col].strip()
            try:
                timestamp = float(stamp)
            except ValueError:
                raise DataError(f"{path} line {line}, column timestamp: {stamp!r} is not a number") from None
            key = (user, item, stamp)
            if key in seen:
                raise DataError(f"{path} line {line}: duplicate of line {seen[key]} ({','.join(key)})")
            seen[key] = line
            user_items.setdefault(user, []).append((timestamp, line, item))
    if not user_items:
        raise DataError(f"{path}: no interactions after the header")
    return user_items


def _read_sequences_file(path: Path) -> dict[str, list[tuple[float, int, str]]]:
    """Return user -> [(order, line, item)] read from a ``user item item ...`` file."""
    user_items: dict[str, list[tuple[float, int, str]]] = {}
    with open(path, encoding="utf-8") as handle:
        for line, text in _text_lines(handle, path):
            fields = text.split()
            if not fields:
                continue
            user = _parse_int(fields[0], path, line, "1 (user)")
            if user in user_items:
                raise DataError(f"{path} line {line}: user {user} already has a line")
            user_items[user] = [
                (float(position), line, _parse_int(item, path, line, str(position + 2)))
                for position, item in enumerate(fields[1:])
            ]
    if not user_items:
        raise DataError(f"{path}: file is empty (expected lines 'user item item ...')")
    return user_items


def _read_items(path: Path) -> _ItemText:
    reader, handle, (id_col, title_col, category_col) = _open_csv(path, ITEM_COLUMNS)
    titles: dict[str, str] = {}
    categories: dict[str, tuple[str, ...]] = {}
    with handle:
        for line, row in reader:
            if not row:
                continue
            if len(row) <= id_col:
                raise DataError(f"{path} line {line}: expected {len(ITEM_COLUMNS)} columns, found {len(row)}")
            item = _parse_int(row[id_col], path, line, "item_id")
            if item in titles:
                raise DataError(f"{path} line {line}: item_id {item} is listed twice")
            titles[item] = row[title_col].strip() if len(row) > title_col else ""
            raw = row[category_col] if len(row) > category_col else ""
            categories[item] = tuple(c.strip() for c in raw.split("|") if c.strip())
    return _ItemText(titles, categories)


def _index(
    name: str,
    user_items: dict[str, list[tuple[float, int, str]]],
    text: _ItemText | None,
    source: Path,
    items_path: Path | None,
) -> Dataset:
    """Drop short users, check items against the catalog, re-index items 1..N."""
    if text is not None:
        for events in user_items.values():
            for _, line, item in events:
                if item not in text.titles:
                    raise DataError(f"{source} line {line}: item {item} is not in {items_path}")
    dropped = {u: len(e) for u, e in user_items.items() if len(e) < MIN_INTERACTIONS}
    kept = {u: sorted(e) for u, e in user_items.items() if len(e) >= MIN_INTERACTIONS}
    if dropped:
        log.warning("%s: dropped %d user(s) with fewer than %d interactions", name, len(dropped), MIN_INTERACTIONS)
    if not kept:
        raise DataError(f"{name}: no user has at least {MIN_INTERACTIONS} interactions")
    # The catalog is public and shared by every federated node, so when it is known it fixes
    # the item index; otherwise the interacted items do.
    catalog = text.titles if text is not None else {item for events in kept.values() for _, _, item in events}
    item_ids = sorted(catalog, key=int)
    index = {item: i for i, item in enumerate(item_ids, start=1)}
    users = sorted(kept, key=int)
    sequences = [np.array([index[item] for _, _, item in kept[u]], dtype=np.int64) for u in users]
    titles = [""] + [text.titles.get(i, "") if text else "" for i in item_ids]
    categories = [()] + [text.categories.get(i, ()) if text else () for i in item_ids]
    return Dataset(name, sequences, users, ["", *item_ids], titles, categories, dropped)


def catalog_size(path: str | Path) -> int:
    """Number of items in a catalog (``items.csv``, or a folder holding one).

    A deployed server knows the public catalog but no user's interactions; the catalog alone
    fixes the item index, exactly as :func:`load_dataset` builds it on the nodes.
    """
    return len(_read_items(_catalog_items(path)).titles)


def _catalog_items(path: str | Path) -> Path:
    path = Path(path)
    items = path / "items.csv" if path.is_dir() else path
    if not items.is_file():
        raise DataError(f"{items}: no such items file")
    return items


def catalog_titles(path: str | Path) -> list[str]:
    """A catalog's titles by item index (``""`` for padding index 0), indexed as the nodes index it."""
    text = _read_items(_catalog_items(path))
    return ["", *(text.titles[item] for item in sorted(text.titles, key=int))]


def catalog_sha256(path: str | Path) -> str:
    """SHA-256 of a catalog's items file."""
    return hashlib.sha256(_catalog_items(path).read_bytes()).hexdigest()


#: a catalog folder's record of the dataset it was cut from (``lumos deploy split`` writes it)
CATALOG_NAME_FILE = "dataset.json"


def catalog_name(path: str | Path) -> str:
    """The name of the dataset a catalog belongs to: recorded in its folder by ``lumos deploy
    split``, else the folder's (or file's) name."""
    path = Path(path)
    try:
        return str(json.loads((path / CATALOG_NAME_FILE).read_text(encoding="utf-8"))["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return path.name if path.is_dir() else path.stem
