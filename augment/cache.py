"""On-device caches of LLM output, in SQLite files.

:class:`ViewCache` holds LUMOS's views: one record per user and view, keyed by (model, prompt
version, user, view), carrying the hash of the history they were made from. A lookup with
another hash misses, so a user whose history grew is regenerated while everyone else is
reused. All views of a user are written in one transaction, so a kill leaves either all of a
user's views or none of them, and a rerun resumes with the users still missing.

:class:`TextCache` holds SRA-CL's texts (user summaries, item descriptions) the same way,
keyed by (model, prompt version, kind, key) and the hash of the prompt's input.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lumosrec.core.errors import DataError

#: a view cache's file name inside its folder (``lumos views generate --out``, ``views-dir``)
CACHE_FILE = "views.sqlite"

VIEW_SCHEMA = """
CREATE TABLE IF NOT EXISTS views (
    model TEXT NOT NULL, prompt_version TEXT NOT NULL, user TEXT NOT NULL, view TEXT NOT NULL,
    history_hash TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (model, prompt_version, user, view)
)
"""


def history_hash(history: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(item)) for item in history).encode()).hexdigest()[:16]


@dataclass
class View:
    """One view of one user: catalog items (indices) in order, with provenance.

    ``source`` is ``llm`` (every item grounded from the LLM's output), ``llm+retrieval``
    (enough grounded, padded with retrieval items) or ``retrieval`` (fallback, or retrieval
    mode). ``grounding`` is each item's title-to-item cosine (NaN for retrieval items),
    ``profile_similarity`` its cosine to the user's profile; ``text`` the raw LLM output.
    """

    items: list[int]
    source: str
    grounding: list[float] = field(default_factory=list)
    profile_similarity: list[float] = field(default_factory=list)
    text: str = ""


TEXT_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (
    model TEXT NOT NULL, prompt_version TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    input_hash TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (model, prompt_version, kind, key)
)
"""


#: one row per generated batch, so that the cost of a cache filled over several (resumed) runs adds up
GENERATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS generation (
    model TEXT NOT NULL, prompt_version TEXT NOT NULL, kind TEXT NOT NULL,
    texts INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, seconds REAL NOT NULL
)
"""


def _readable(method: Callable) -> Callable:
    """``method`` with a damaged cache file (truncated, overwritten) as a one-line DataError."""

    @functools.wraps(method)
    def guarded(self: _SQLiteCache, *args: object, **kwargs: object) -> object:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError:  # locked, unreachable: not the file's fault
            raise
        except sqlite3.DatabaseError as error:
            raise DataError(
                f"{self.path} is damaged ({error}): delete it, and the next run makes {self.contents} again"
            ) from error

    return guarded


class _SQLiteCache:
    #: what the file holds, for the message that asks to delete it
    contents = "its contents"

    @_readable
    def __init__(self, path: str | Path, *schemas: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # several client processes of a simulation may share one cache file
        self._db = sqlite3.connect(self.path, timeout=120, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        for schema in schemas:
            self._db.execute(schema)

    def close(self) -> None:
        self._db.close()


class ViewCache(_SQLiteCache):
    """Views of users, persisted in ``path`` (SQLite)."""

    contents = "the views"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, VIEW_SCHEMA)

    @_readable
    def get(
        self, model: str, prompt_version: str, user: str, views: Iterable[str], expected_hash: str
    ) -> dict[str, View] | None:
        """All requested views of ``user`` made from the history with ``expected_hash``, else None."""
        views = list(views)
        rows = self._db.execute(
            f"SELECT view, history_hash, record FROM views WHERE model=? AND prompt_version=? AND user=? "
            f"AND view IN ({','.join('?' * len(views))})",
            (model, prompt_version, user, *views),
        ).fetchall()
        found = {view: View(**json.loads(record)) for view, digest, record in rows if digest == expected_hash}
        return found if len(found) == len(views) else None

    @_readable
    def put(self, model: str, prompt_version: str, user: str, digest: str, views: dict[str, View]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO views VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (model, prompt_version, user, view, digest, json.dumps(asdict(record)))
                    for view, record in views.items()
                ],
            )

    @_readable
    def latest(self, user: str) -> dict[str, View]:
        """The most recently written record of each view of ``user``, whatever its model."""
        rows = self._db.execute("SELECT view, record FROM views WHERE user=? ORDER BY rowid", (user,))
        return {view: View(**json.loads(record)) for view, record in rows}


class TextCache(_SQLiteCache):
    """Generated texts (``kind``: ``user`` summaries, ``item`` descriptions), persisted in ``path``."""

    contents = "the texts (LLM time)"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, TEXT_SCHEMA, GENERATION_SCHEMA)

    @_readable
    def get(
        self, model: str, prompt_version: str, kind: str, keys: Sequence[str], input_hashes: Sequence[str]
    ) -> dict[str, str]:
        """The cached text of each key whose stored input hash matches."""
        keys, expected, found = list(keys), dict(zip(keys, input_hashes)), {}
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = keys[start : start + 500]
            rows = self._db.execute(
                f"SELECT key, input_hash, text FROM texts WHERE model=? AND prompt_version=? AND kind=? "
                f"AND key IN ({','.join('?' * len(chunk))})",
                (model, prompt_version, kind, *chunk),
            )
            found.update({key: text for key, digest, text in rows if expected[key] == digest})
        return found

    @_readable
    def put(
        self,
        model: str,
        prompt_version: str,
        kind: str,
        texts: dict[str, tuple[str, str]],
        completion_tokens: int,
        seconds: float,
    ) -> None:
        """Store ``{key: (input hash, text)}`` and what generating them cost, in one transaction."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO texts VALUES (?, ?, ?, ?, ?, ?)",
                [(model, prompt_version, kind, key, digest, text) for key, (digest, text) in texts.items()],
            )
            self._db.execute(
                "INSERT INTO generation VALUES (?, ?, ?, ?, ?, ?)",
                (model, prompt_version, kind, len(texts), completion_tokens, seconds),
            )

    @_readable
    def cost(self, model: str, prompt_version: str, kind: str) -> dict[str, float]:
        """What generating every stored text of ``kind`` cost, over all the runs that made them."""
        texts, tokens, seconds = self._db.execute(
            "SELECT COALESCE(SUM(texts), 0), COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(seconds), 0.0) "
            "FROM generation WHERE model=? AND prompt_version=? AND kind=?",
            (model, prompt_version, kind),
        ).fetchone()
        return {"made": texts, "completion_tokens": tokens, "seconds": seconds}
