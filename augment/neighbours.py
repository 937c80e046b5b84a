"""Top-k neighbour search over unit vectors: SRA-CL's user and item retrieval.

* ``exact`` (default): cosine similarity against every candidate, in chunks of rows so that
  memory stays ``chunk x candidates``; exact and fast enough for catalogs of 10^5 items on CPU;
* ``approximate``: a FAISS HNSW graph (``pip install faiss-cpu``), for catalogs where the
  exact scan is too slow; recall is below 1 and reported nowhere else, so use it knowingly;
* :func:`random_neighbours`: uniform draws, the "random instead of semantic retrieval" ablation.

A row never retrieves itself. When fewer than ``k + 1`` candidates exist, ``k`` shrinks.
"""

from __future__ import annotations

import numpy as np

from lumosrec.core.errors import ConfigError

INDEXES = ("exact", "approximate")


def _checked_k(k: int, candidates: np.ndarray) -> int:
    if k < 1:
        raise ConfigError(f"the number of neighbours must be at least 1, not {k}")
    if len(candidates) < 2:
        raise ConfigError("neighbour retrieval needs at least two candidates")
    return min(k, len(candidates) - 1)


def nearest_neighbours(
    vectors: np.ndarray, k: int, candidates: np.ndarray | None = None, index: str = "exact", chunk: int = 1024
) -> np.ndarray:
    """The ``k`` most similar candidates of every row of ``vectors`` (rows are unit vectors).

    Parameters
    ----------
    vectors : ndarray, shape (n, d)
    k : int
    candidates : ndarray of row indices, optional
        Rows that may be retrieved (default: all).
    index : {"exact", "approximate"}

    Returns
    -------
    ndarray, shape (n, k'), int64
        Row indices into ``vectors``, most similar first; ``k' = min(k, len(candidates) - 1)``.
    """
    if index not in INDEXES:
        raise ConfigError(f"unknown index {index!r}; choose one of {', '.join(INDEXES)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    candidates = np.arange(len(vectors)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    k = _checked_k(k, candidates)
    if index == "approximate":
        return _faiss_neighbours(vectors, k, candidates)
    pool = vectors[candidates]
    position = np.full(len(vectors), -1, dtype=np.int64)
    position[candidates] = np.arange(len(candidates))
    result = np.empty((len(vectors), k), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        rows = np.arange(start, min(start + chunk, len(vectors)))
        scores = vectors[rows] @ pool.T
        own = position[rows]
        scores[np.flatnonzero(own >= 0), own[own >= 0]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        result[rows] = candidates[np.take_along_axis(top, order, axis=1)]
    return result


def _faiss_neighbours(vectors: np.ndarray, k: int, candidates: np.ndarray) -> np.ndarray:
    try:
        import faiss
    except ImportError:
        raise ConfigError("the approximate index needs FAISS: pip install faiss-cpu") from None
    graph = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efSearch = max(64, 4 * k)
    graph.add(vectors[candidates])
    _, found = graph.search(vectors, k + 1)
    result = np.empty((len(vectors), k), dtype=np.int64)
    for row, hits in enumerate(found):
        hits = [int(candidates[h]) for h in hits if h >= 0 and candidates[h] != row][:k]
        # a graph search may return fewer hits than asked: top up with the first hit
        result[row] = hits + [hits[0]] * (k - len(hits))
    return result


def random_neighbours(num_rows: int, k: int, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct candidates drawn uniformly per row, never the row itself."""
    candidates = np.asarray(candidates, dtype=np.int64)
    k = _checked_k(k, candidates)
    result = np.empty((num_rows, k), dtype=np.int64)
    for row in range(num_rows):
        draw = rng.choice(len(candidates), size=k + 1, replace=False)
        picked = candidates[draw]
        result[row] = picked[picked != row][:k]
    return result
