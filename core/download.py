"""Fetch public datasets from their original sources and convert them (``lumos data download``).

Raw files go to ``<cache_dir>/<name>/raw/`` (users without network may put them there by
hand); the converted folder holds ``interactions.csv`` (``user_id,item_id,timestamp``,
sorted stably by user then time), ``items.csv`` (``item_id,title,categories`` with
``|``-separated categories, one row per interacted item) and ``source.json`` (URLs,
SHA-256 of the raw files, date, converter version) so results trace back to their inputs.

Every raw file, downloaded or placed by hand, must have the SHA-256 pinned next to its URL in
:data:`DATASETS` before it is converted: the https origin alone does not prove a mirror or a
cached copy is the published file. One that differs is refused and never converted.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from lumosrec.core.errors import DownloadError
from lumosrec.core.paths import cache_dir as cache_folder
from lumosrec.core.progress import progress_bar

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Bump when the output of a converter changes, so stale cached conversions are redone.
CONVERTER_VERSION = 1
TIMEOUT_S = 30

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

Interaction = tuple[int, int, int]
ItemInfo = tuple[str, list[str]]


def _reason(exc: BaseException) -> str:
    """Describe an exception on one line (the CLI prints messages as single lines)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    text = str(exc.reason) if isinstance(exc, urllib.error.URLError) else str(exc)
    text = f"missing {text}" if isinstance(exc, KeyError) else text or type(exc).__name__
    return " ".join(text.split())


def _parse(path: Path, member: str | None, encoding: str, parse: Callable[[str], T | None]) -> list[T]:
    """Parse every non-blank line of a plain, gzipped or zipped text file.

    All decompression and parsing failures become one :class:`DownloadError` naming the
    file and line, because a half-downloaded or tampered file must not surface as a
    zipfile/zlib traceback.  ``parse`` returns ``None`` for lines to skip.
    """
    path = Path(path)
    where = f"{path} (member {member})" if member else str(path)
    if not path.is_file():
        raise DownloadError(f"missing raw file {path}")
    records: list[T] = []
    lineno = 0
    try:
        with contextlib.ExitStack() as stack:
            if member is not None:
                archive = stack.enter_context(zipfile.ZipFile(path))
                if member not in archive.namelist():
                    raise ValueError(f"the archive has no {member}")
                raw = stack.enter_context(archive.open(member))
            elif path.suffix == ".gz":
                raw = stack.enter_context(gzip.open(path))
            else:
                raw = stack.enter_context(open(path, "rb"))
            for lineno, line in enumerate(io.TextIOWrapper(raw, encoding=encoding), 1):  # noqa: B007 -- named in errors
                if line.strip():
                    record = parse(line.rstrip("\r\n"))
                    if record is not None:
                        records.append(record)
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        KeyError,
        IndexError,
        ValueError,
        TypeError,
        SyntaxError,
    ) as exc:
        at = f", line {lineno}" if lineno else ""
        raise DownloadError(
            f"{where}{at} is corrupt or not in the expected format "
            f"({_reason(exc)}); delete it and re-run to download it again"
        ) from exc
    return records


def _literal(line: str) -> dict:
    """Read a dict written as JSON (reviews) or as a Python literal (McAuley's metadata)."""
    try:  # JSON first: it is much faster and the metadata's quotes make it fail at once
        value = json.loads(line)
    except ValueError:
        value = ast.literal_eval(line)
    if not isinstance(value, dict):
        raise ValueError("expected one object per line")
    return value


def _rating_parser(sep: str, min_rating: int | None) -> Callable[[str], Interaction | None]:
    def parse(line: str) -> Interaction | None:
        fields = line.split(sep)
        if len(fields) != 4:
            raise ValueError(f"expected 4 fields separated by {sep!r}, got {len(fields)}")
        user, item, rating, ts = fields
        if min_rating is not None and int(rating) < min_rating:
            return None
        return int(user), int(item), int(ts)

    return parse


def _write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
    # Write next to the target and rename, so an interrupted run never leaves a
    # truncated CSV that looks valid.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_dataset(out_dir: Path, interactions: list[Interaction], items: Mapping[int, ItemInfo]) -> None:
    """Write interactions (sorted stably by user, time) and the items they use."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    interactions = sorted(interactions, key=lambda r: (r[0], r[2]))
    _write_csv(out_dir / "interactions.csv", ("user_id", "item_id", "timestamp"), interactions)
    # Items without metadata still get a row: downstream code relies on every
    # interacted item being listed.
    rows = []
    for item in sorted({item for _, item, _ in interactions}):
        title, categories = items.get(item, ("", []))
        rows.append((item, title, "|".join(categories)))
    _write_csv(out_dir / "items.csv", ("item_id", "title", "categories"), rows)


def convert_ml100k(raw_dir: Path, out_dir: Path) -> None:
    """Convert ``ml-100k.zip`` (GroupLens MovieLens 100K) found in ``raw_dir``.

    Every rating in ``u.data`` counts as an interaction; genres come from the 19 binary
    flags of ``u.item`` (latin-1).
    """
    archive = Path(raw_dir) / "ml-100k.zip"

    def item(line: str) -> tuple[int, ItemInfo]:
        fields = line.split("|")
        if len(fields) != 5 + len(ML100K_GENRES):
            raise ValueError(f"expected {5 + len(ML100K_GENRES)} |-separated fields, got {len(fields)}")
        genres = [g for g, flag in zip(ML100K_GENRES, fields[5:]) if flag.strip() == "1"]
        return int(fields[0]), (fields[1], genres)

    ratings = _parse(archive, "ml-100k/u.data", "latin-1", _rating_parser("\t", None))
    _write_dataset(out_dir, ratings, dict(_parse(archive, "ml-100k/u.item", "latin-1", item)))


def convert_ml1m(raw_dir: Path, out_dir: Path, min_rating: int | None = None) -> None:
    """Convert ``ml-1m.zip`` (GroupLens MovieLens 1M) found in ``raw_dir``.

    Parameters
    ----------
    min_rating
        Keep only ratings ``>= min_rating``.  ``None`` (default) keeps every rating as an
        implicit interaction; many papers instead use ``4`` to treat only liked movies as
        positives -- pass it explicitly so the choice is visible.
    """
    archive = Path(raw_dir) / "ml-1m.zip"

    def movie(line: str) -> tuple[int, ItemInfo]:
        movie_id, title, genres = line.split("::")
        return int(movie_id), (title, [g for g in genres.split("|") if g])

    ratings = _parse(archive, "ml-1m/ratings.dat", "latin-1", _rating_parser("::", min_rating))
    _write_dataset(out_dir, ratings, dict(_parse(archive, "ml-1m/movies.dat", "latin-1", movie)))


def convert_amazon(
    raw_dir: Path,
    out_dir: Path,
    reviews_file: str = "reviews_Beauty_5.json.gz",
    meta_file: str = "meta_Beauty.json.gz",
    root_category: str = "Beauty",
) -> None:
    """Convert McAuley's 2014 Amazon 5-core reviews plus metadata found in ``raw_dir``.

    Reviewer ids and ASINs become integers ``1..`` in order of first appearance after
    sorting by (reviewer, time); the mappings go to ``user_map.csv`` / ``item_map.csv``.
    Categories are the first category path with the redundant root dropped.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)

    def review(line: str) -> tuple[str, str, int]:
        obj = _literal(line)
        return str(obj["reviewerID"]), str(obj["asin"]), int(obj["unixReviewTime"])

    reviews = sorted(_parse(raw_dir / reviews_file, None, "utf-8", review), key=lambda r: (r[0], r[2]))
    users: dict[str, int] = {}
    asins: dict[str, int] = {}
    interactions = [
        (users.setdefault(u, len(users) + 1), asins.setdefault(a, len(asins) + 1), t) for u, a, t in reviews
    ]

    # The metadata covers the whole category (~250k products); a cheap regex on the asin
    # skips the slow literal_eval for products that have no 5-core reviews.
    asin_re = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")

    def meta(line: str) -> tuple[int, ItemInfo] | None:
        found = asin_re.search(line)
        if found and found.group(1) not in asins:
            return None
        obj = _literal(line)
        if str(obj.get("asin")) not in asins:
            return None
        cats = [str(c) for c in (obj.get("categories") or [[]])[0]]
        if cats and cats[0] == root_category:
            cats = cats[1:]
        return asins[str(obj["asin"])], (str(obj.get("title") or ""), cats)

    items = dict(_parse(raw_dir / meta_file, None, "utf-8", meta))
    _write_dataset(out_dir, interactions, items)
    _write_csv(out_dir / "user_map.csv", ("user_id", "reviewer_id"), ((i, u) for u, i in users.items()))
    _write_csv(out_dir / "item_map.csv", ("item_id", "asin"), ((i, a) for a, i in asins.items()))


@dataclass(frozen=True)
class RawFile:
    """A raw file as published: its URL and the SHA-256 it must have.

    ``sha256`` has no default so that every spec states it: ``None`` says that no hash is
    published for the file; it is then used unchecked, with a warning, and the SHA-256 it had
    is recorded in ``source.json``."""

    url: str
    sha256: str | None


@dataclass(frozen=True)
class DatasetSpec:
    """A downloadable dataset: raw file name -> where it is published, and its converter."""

    description: str
    files: Mapping[str, RawFile]
    converter: Callable[[Path, Path], None]


_GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
_SNAP = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "MovieLens 100K (GroupLens)",
        # SHA-256 as in tensorflow/datasets, tensorflow_datasets/url_checksums/movielens.txt
        # (4,924,029 bytes), and several independent loaders
        {
            "ml-100k.zip": RawFile(
                _GROUPLENS + "ml-100k.zip", "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
            )
        },
        convert_ml100k,
    ),
    "ml-1m": DatasetSpec(
        "MovieLens 1M (GroupLens), all ratings",
        # SHA-256 as in tensorflow/datasets, tensorflow_datasets/url_checksums/movielens.txt
        # (5,917,549 bytes), and several independent loaders
        {
            "ml-1m.zip": RawFile(
                _GROUPLENS + "ml-1m.zip", "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
            )
        },
        convert_ml1m,
    ),
    "amazon-beauty": DatasetSpec(
        "Amazon Beauty 5-core reviews (McAuley et al. 2014)",
        # SNAP publishes no checksums. Both SHA-256 as in ShyJason/CaIRec (README.md and
        # scripts/prepare_amazon_beauty.py, fetched from these https URLs); the reviews' also in
        # a SimDiffRec reproduction's Amazon 2014 download script.
        {
            "reviews_Beauty_5.json.gz": RawFile(
                _SNAP + "reviews_Beauty_5.json.gz", "e5925ec99023f1dc9c7d3dff7ef34cfeacd40d1b981b5525e1e4ba9c8abc18fe"
            ),
            "meta_Beauty.json.gz": RawFile(
                _SNAP + "meta_Beauty.json.gz", "c7977dc0e0ead14ac7df8c1c6de74da00e4bebfad87a0f0c5763d4c5bc9b53a0"
            ),
        },
        convert_amazon,
    ),
}


def _verify(name: str, filename: str, raw: RawFile, actual: str, what: str, remedy: str) -> None:
    """Refuse a raw file whose SHA-256 is not the pinned one; warn when none is pinned."""
    if raw.sha256 is None:
        log.warning(
            "%s: %s has no published SHA-256 to check it against; used unchecked, its SHA-256 %s goes to source.json",
            name,
            filename,
            actual,
        )
    elif actual != raw.sha256:
        raise DownloadError(
            f"{name}: {what} has SHA-256 {actual}, expected {raw.sha256}: "
            f"it is not the published {filename} and was not used; {remedy}"
        )


def _fetch(name: str, raw: RawFile, dest: Path, progress: bool) -> str:
    """Download ``raw`` to ``dest`` and return its SHA-256. The bytes go to a ``.part`` file,
    renamed into place only when complete and verified, so a partial or tampered download is
    never taken for the raw file."""
    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(raw.url, headers={"User-Agent": "lumosrec"})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(part, "wb") as fh:
            length, received = response.headers.get("Content-Length", ""), 0
            total = int(length) if length.isdigit() else None
            with progress_bar(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress
            ) as bar:
                while chunk := response.read(1 << 16):
                    fh.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise OSError(f"connection closed after {received} of {total} bytes")
        actual = digest.hexdigest()
        _verify(
            name,
            dest.name,
            raw,
            actual,
            f"{dest.name} as downloaded from {raw.url}",
            f"re-run to download it again, or place the published file in {dest.parent} and re-run",
        )
        os.replace(part, dest)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadError(
            f"could not download {name} from {raw.url}: {_reason(exc)}. Check your network "
            f"connection, or place {dest.name} in {dest.parent} and re-run"
        ) from exc
    finally:
        part.unlink(missing_ok=True)
    return actual


def _is_converted(out_dir: Path, spec: DatasetSpec) -> bool:
    try:
        info = json.loads((out_dir / "source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # A conversion made from raw files other than the pinned ones (before the pins existed,
    # or under other pins) is redone, which checks the raw files.
    recorded = info.get("sha256") if isinstance(info, dict) else None
    return (
        isinstance(recorded, dict)
        and all(raw.sha256 in (None, recorded.get(filename)) for filename, raw in spec.files.items())
        and info.get("converter_version") == CONVERTER_VERSION
        and (out_dir / "interactions.csv").is_file()
        and (out_dir / "items.csv").is_file()
    )


def download(name: str, cache_dir: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Download (if needed) and convert a public dataset; return its converted folder.

    Parameters
    ----------
    name
        A key of :data:`DATASETS` (``ml-100k``, ``ml-1m``, ``amazon-beauty``).
    cache_dir
        Root of the dataset cache; defaults to ``$LUMOS_CACHE/datasets`` (:func:`lumosrec.core.paths.cache_dir`).
    force
        Fetch the raw files again and redo the conversion even if both are cached.
    progress
        Show a byte progress bar on stderr while downloading.

    Returns
    -------
    Path
        ``<cache_dir>/<name>/``.  Raw files already in its ``raw/`` folder (e.g. placed
        there by hand) are used without touching the network, once their SHA-256 is checked.

    Raises
    ------
    DownloadError
        Unknown name, network failure, a raw file whose SHA-256 is not the pinned one, or
        corrupt raw files.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise DownloadError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    out_dir = Path(cache_dir if cache_dir is not None else cache_folder("datasets")).expanduser() / name
    raw_dir = out_dir / "raw"
    if not force and _is_converted(out_dir, spec):
        return out_dir
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "source.json").unlink(missing_ok=True)  # marks the folder incomplete until done
    except OSError as exc:
        raise DownloadError(f"cannot write dataset cache {out_dir}: {_reason(exc)}") from exc
    digests: dict[str, str] = {}
    for filename, raw in spec.files.items():
        path = raw_dir / filename
        if force or not path.is_file():
            digests[filename] = _fetch(name, raw, path, progress)
            continue
        # placed by hand, or kept from an earlier download: checked like a fresh download
        try:
            with open(path, "rb") as fh:
                digests[filename] = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise DownloadError(f"cannot read raw file {path}: {_reason(exc)}") from exc
        _verify(
            name,
            filename,
            raw,
            digests[filename],
            str(path),
            f"delete it and re-run to download it, or replace it with the file published at {raw.url}",
        )
    try:
        spec.converter(raw_dir, out_dir)
        info = {
            "dataset": name,
            "description": spec.description,
            "urls": {filename: raw.url for filename, raw in spec.files.items()},
            "sha256": digests,
            "sha256_pinned": {filename: raw.sha256 is not None for filename, raw in spec.files.items()},
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "converter_version": CONVERTER_VERSION,
        }
        (out_dir / "source.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DownloadError(f"could not convert {name} in {out_dir}: {_reason(exc)}") from exc
    return out_dir
