"""Offline tests for lumosrec.download: tiny fakes in the exact original file formats."""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import re
import threading
import zipfile
from pathlib import Path

import pytest

from lumosrec.core import download as dl
from lumosrec.core import paths
from lumosrec.core.download import DATASETS, RawFile, convert_ml1m, download
from lumosrec.core.errors import DownloadError, LumosError
from lumosrec.core.paths import cache_dir, cache_root


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in dl.ML100K_GENRES)


ML100K_DATA = (
    "\n".join(
        [
            "2\t20\t3\t881250949",
            "1\t30\t4\t881250950",
            "1\t10\t5\t881250940",  # earlier, listed later: must move first
            "2\t10\t1\t881250000",
            "1\t20\t2\t881250950",  # same user and time as the 30-row: source order kept
        ]
    )
    + "\n"
)
_TOY_GENRES = _flags("Animation", "Children's", "Comedy")
ML100K_ITEM = (
    "\n".join(
        [
            f"10|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{_TOY_GENRES}",
            f"20|Shawshank Redemption, The (1994)|01-Jan-1994||http://x|{_flags('Drama')}",
            f"30|Métisse (Café au Lait) (1993)|01-Jan-1993||http://y|{_flags('unknown')}",
            f"40|Never Rated (1990)|01-Jan-1990||http://z|{_flags('Western')}",
        ]
    )
    + "\n"
)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _ml100k_zip(path: Path) -> Path:
    return _zip(path, {"ml-100k/u.data": ML100K_DATA.encode("ascii"), "ml-100k/u.item": ML100K_ITEM.encode("latin-1")})


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin_fakes(monkeypatch, name: str, raw_dir: Path) -> None:
    """Pin the dataset's raw files to the fakes in ``raw_dir``, which stand in for the published
    files (whose real SHA-256 they cannot have)."""
    spec = DATASETS[name]
    files = {f: dataclasses.replace(raw, sha256=_sha256(raw_dir / f)) for f, raw in spec.files.items()}
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, files=files))


def _serve(monkeypatch, name: str, filename: str, url: str, sha256: str | None) -> None:
    spec = DATASETS[name]
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, files={filename: RawFile(url, sha256)}))


def test_ml100k_from_preplaced_raw(tmp_path: Path, monkeypatch) -> None:
    _ml100k_zip(tmp_path / "ml-100k" / "raw" / "ml-100k.zip")
    _pin_fakes(monkeypatch, "ml-100k", tmp_path / "ml-100k" / "raw")
    out = download("ml-100k", cache_dir=tmp_path, progress=False)
    assert out == tmp_path / "ml-100k"
    assert (out / "interactions.csv").read_text(encoding="utf-8").splitlines() == [
        "user_id,item_id,timestamp",
        "1,10,881250940",
        "1,30,881250950",
        "1,20,881250950",
        "2,10,881250000",
        "2,20,881250949",
    ]
    assert _rows(out / "items.csv") == [
        ["item_id", "title", "categories"],
        ["10", "Toy Story (1995)", "Animation|Children's|Comedy"],
        ["20", "Shawshank Redemption, The (1994)", "Drama"],
        ["30", "Métisse (Café au Lait) (1993)", "unknown"],
    ]
    text = (out / "items.csv").read_text(encoding="utf-8")
    assert '20,"Shawshank Redemption, The (1994)",Drama\n' in text
    info = json.loads((out / "source.json").read_text(encoding="utf-8"))
    raw = (out / "raw" / "ml-100k.zip").read_bytes()
    assert info["sha256"] == {"ml-100k.zip": hashlib.sha256(raw).hexdigest()}
    assert info["urls"] == {"ml-100k.zip": DATASETS["ml-100k"].files["ml-100k.zip"].url}
    assert info["sha256_pinned"] == {"ml-100k.zip": True}
    assert info["converter_version"] == dl.CONVERTER_VERSION and info["date"]


def test_cached_conversion_is_reused_and_force_redoes_it(tmp_path: Path, monkeypatch) -> None:
    _ml100k_zip(tmp_path / "ml-100k" / "raw" / "ml-100k.zip")
    _pin_fakes(monkeypatch, "ml-100k", tmp_path / "ml-100k" / "raw")
    out = download("ml-100k", cache_dir=tmp_path, progress=False)
    (out / "interactions.csv").write_text("user_id,item_id,timestamp\n", encoding="utf-8")
    assert download("ml-100k", cache_dir=tmp_path, progress=False) == out
    assert len(_rows(out / "interactions.csv")) == 1  # untouched: no reconversion
    # A stale converter version triggers reconversion from the cached raw files.
    monkeypatch.setattr(dl, "CONVERTER_VERSION", dl.CONVERTER_VERSION + 1)
    download("ml-100k", cache_dir=tmp_path, progress=False)
    assert len(_rows(out / "interactions.csv")) == 6


def test_ml1m_conversion_and_min_rating(tmp_path: Path, monkeypatch) -> None:
    ratings = "3::2::5::978300760\n1::1::2::978300019\n1::2::4::978300000\n3::1::3::978300700\n"
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Amélie, or else (2001)::Comedy|Romance\n"
    _zip(
        tmp_path / "ml-1m" / "raw" / "ml-1m.zip",
        {"ml-1m/ratings.dat": ratings.encode("ascii"), "ml-1m/movies.dat": movies.encode("latin-1")},
    )
    _pin_fakes(monkeypatch, "ml-1m", tmp_path / "ml-1m" / "raw")
    out = download("ml-1m", cache_dir=tmp_path, progress=False)
    assert _rows(out / "interactions.csv")[1:] == [
        ["1", "2", "978300000"],
        ["1", "1", "978300019"],
        ["3", "1", "978300700"],
        ["3", "2", "978300760"],
    ]
    assert _rows(out / "items.csv")[1:] == [
        ["1", "Toy Story (1995)", "Animation|Children's|Comedy"],
        ["2", "Amélie, or else (2001)", "Comedy|Romance"],
    ]
    liked = tmp_path / "liked"
    convert_ml1m(out / "raw", liked, min_rating=4)
    assert _rows(liked / "interactions.csv")[1:] == [["1", "2", "978300000"], ["3", "2", "978300760"]]
    assert _rows(liked / "items.csv")[1:] == [["2", "Amélie, or else (2001)", "Comedy|Romance"]]


def _gz_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def test_amazon_conversion_maps_ids(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "amazon-beauty" / "raw"
    reviews = [
        ("B_USER", "ASIN_X", 300),
        ("A_USER", "ASIN_Y", 200),
        ("B_USER", "ASIN_Y", 100),
        ("A_USER", "ASIN_Z", 100),
        ("A_USER", "ASIN_X", 200),
    ]
    _gz_lines(
        raw / "reviews_Beauty_5.json.gz",
        [
            json.dumps(
                {
                    "reviewerID": u,
                    "asin": a,
                    "reviewerName": "n",
                    "overall": 5.0,
                    "reviewText": "ok",
                    "unixReviewTime": t,
                    "reviewTime": "01 1, 2014",
                }
            )
            for u, a, t in reviews
        ],
    )
    meta = [
        {"asin": "ASIN_UNUSED", "title": "Not reviewed", "categories": [["Beauty", "Nails"]]},
        {
            "asin": "ASIN_Y",
            "title": 'Soap, "extra" mild',
            "price": 3.5,
            "categories": [["Beauty", "Bath & Body", "Soaps"], ["Health", "Soap"]],
        },
        {"asin": "ASIN_Z", "title": "Crème brûlée lotion", "categories": [["Skin Care", "Lotion"]]},
        {"asin": "ASIN_X", "categories": [["Beauty"]]},
    ]
    _gz_lines(raw / "meta_Beauty.json.gz", [repr(m) for m in meta])  # python literals, not JSON
    _pin_fakes(monkeypatch, "amazon-beauty", raw)
    out = download("amazon-beauty", cache_dir=tmp_path, progress=False)
    # Sorted by (reviewer, time): A_USER: Z@100, Y@200, X@200 (tie keeps source order); B_USER: Y, X
    assert _rows(out / "user_map.csv") == [["user_id", "reviewer_id"], ["1", "A_USER"], ["2", "B_USER"]]
    assert _rows(out / "item_map.csv") == [["item_id", "asin"], ["1", "ASIN_Z"], ["2", "ASIN_Y"], ["3", "ASIN_X"]]
    assert _rows(out / "interactions.csv")[1:] == [
        ["1", "1", "100"],
        ["1", "2", "200"],
        ["1", "3", "200"],
        ["2", "2", "100"],
        ["2", "3", "300"],
    ]
    assert _rows(out / "items.csv")[1:] == [
        ["1", "Crème brûlée lotion", "Skin Care|Lotion"],
        ["2", 'Soap, "extra" mild', "Bath & Body|Soaps"],
        ["3", "", ""],
    ]


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, LumosError) and message and "\n" not in message
    return message


def test_offline_without_raw_files(tmp_path: Path, monkeypatch) -> None:
    url = "http://127.0.0.1:9/x.zip"
    _serve(monkeypatch, "ml-100k", "ml-100k.zip", url, DATASETS["ml-100k"].files["ml-100k.zip"].sha256)
    with pytest.raises(DownloadError) as excinfo:
        download("ml-100k", cache_dir=tmp_path, progress=False)
    message = _one_line_error(excinfo)
    assert "ml-100k" in message and url in message and str(tmp_path / "ml-100k" / "raw") in message
    assert not list((tmp_path / "ml-100k" / "raw").iterdir())  # no .part left behind
    assert not (tmp_path / "ml-100k" / "source.json").exists()


def test_unknown_name_lists_known(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as excinfo:
        download("ml-20m", cache_dir=tmp_path)
    message = _one_line_error(excinfo)
    assert "ml-20m" in message and all(name in message for name in DATASETS)


@pytest.mark.parametrize("payload", [b"this is not a zip file", None])
def test_corrupt_zip(tmp_path: Path, monkeypatch, payload: bytes | None) -> None:
    archive = tmp_path / "ml-100k" / "raw" / "ml-100k.zip"
    if payload is None:  # a valid zip lacking the expected member
        _zip(archive, {"ml-100k/u.data": ML100K_DATA.encode()})
    else:
        archive.parent.mkdir(parents=True)
        archive.write_bytes(payload)
    _pin_fakes(monkeypatch, "ml-100k", archive.parent)  # corrupt as published: the converter's check
    with pytest.raises(DownloadError) as excinfo:
        download("ml-100k", cache_dir=tmp_path, progress=False)
    assert str(archive) in _one_line_error(excinfo)
    assert not (tmp_path / "ml-100k" / "source.json").exists()


def test_corrupt_gzip_and_bad_line(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "amazon-beauty" / "raw"
    raw.mkdir(parents=True)
    (raw / "reviews_Beauty_5.json.gz").write_bytes(gzip.compress(b'{"reviewerID": "A"')[:-6])
    (raw / "meta_Beauty.json.gz").write_bytes(gzip.compress(b""))
    _pin_fakes(monkeypatch, "amazon-beauty", raw)
    with pytest.raises(DownloadError) as excinfo:
        download("amazon-beauty", cache_dir=tmp_path, progress=False)
    assert "reviews_Beauty_5.json.gz" in _one_line_error(excinfo)
    _gz_lines(
        raw / "reviews_Beauty_5.json.gz",
        ['{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}', '{"reviewerID": "A", "asin": "B"}'],
    )
    _pin_fakes(monkeypatch, "amazon-beauty", raw)
    with pytest.raises(DownloadError) as excinfo:
        download("amazon-beauty", cache_dir=tmp_path, progress=False)
    assert "line 2" in _one_line_error(excinfo)


@pytest.fixture
def http_root(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http(tmp_path: Path, monkeypatch, http_root) -> None:
    root, base = http_root
    _ml100k_zip(root / "served.zip")
    _serve(monkeypatch, "ml-100k", "ml-100k.zip", f"{base}/served.zip", _sha256(root / "served.zip"))
    out = download("ml-100k", cache_dir=tmp_path / "cache", progress=True)
    assert (out / "raw" / "ml-100k.zip").read_bytes() == (root / "served.zip").read_bytes()
    assert [p.name for p in (out / "raw").iterdir()] == ["ml-100k.zip"]
    assert len(_rows(out / "interactions.csv")) == 6
    _serve(monkeypatch, "ml-100k", "ml-100k.zip", f"{base}/missing.zip", _sha256(root / "served.zip"))
    with pytest.raises(DownloadError) as excinfo:
        download("ml-100k", cache_dir=tmp_path / "cache", force=True, progress=False)
    assert "404" in _one_line_error(excinfo)
    assert (out / "raw" / "ml-100k.zip").is_file()  # failed refetch keeps the old file


def test_one_cache_root(monkeypatch, tmp_path: Path, caplog) -> None:
    monkeypatch.delenv("LUMOS_CACHE_DIR", raising=False)
    monkeypatch.delenv("LUMOS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir("datasets") == tmp_path / ".cache" / "lumos" / "datasets"
    monkeypatch.setenv("LUMOS_CACHE", str(tmp_path / "root"))
    assert cache_root() == tmp_path / "root"
    assert cache_dir("datasets") == tmp_path / "root" / "datasets"
    assert cache_dir("views") == tmp_path / "root" / "views"
    # the old variable named the datasets folder alone: still honoured, with a deprecation line
    monkeypatch.setenv("LUMOS_CACHE_DIR", str(tmp_path / "old"))
    paths._warn_legacy_datasets_env.cache_clear()
    with caplog.at_level("WARNING"):
        assert cache_dir("datasets") == tmp_path / "old"
    assert "LUMOS_CACHE_DIR is deprecated" in caplog.text
    assert cache_dir("views") == tmp_path / "root" / "views"


def test_published_files_are_https_and_pinned() -> None:
    for name, spec in DATASETS.items():
        for filename, raw in spec.files.items():
            assert raw.url.startswith("https://") and raw.url.endswith("/" + filename), (name, filename)
            assert re.fullmatch(r"[0-9a-f]{64}", raw.sha256 or ""), (name, filename)


def test_download_with_wrong_hash_is_refused_and_not_used(tmp_path: Path, monkeypatch, http_root) -> None:
    root, base = http_root
    served = _ml100k_zip(root / "served.zip")
    good = served.read_bytes()
    _serve(monkeypatch, "ml-100k", "ml-100k.zip", f"{base}/served.zip", "0" * 64)
    with pytest.raises(DownloadError) as excinfo:
        download("ml-100k", cache_dir=tmp_path, progress=False)
    message = _one_line_error(excinfo)
    assert "ml-100k.zip" in message and "0" * 64 in message and _sha256(served) in message
    assert not list((tmp_path / "ml-100k" / "raw").iterdir())  # not renamed into place, no .part left
    assert not (tmp_path / "ml-100k" / "interactions.csv").exists()
    # a verified file stays when a forced refetch brings other bytes
    _serve(monkeypatch, "ml-100k", "ml-100k.zip", f"{base}/served.zip", _sha256(served))
    out = download("ml-100k", cache_dir=tmp_path, progress=False)
    _zip(served, {"ml-100k/u.data": b"1\t1\t1\t1\n", "ml-100k/u.item": ML100K_ITEM.encode("latin-1")})
    with pytest.raises(DownloadError) as excinfo:
        download("ml-100k", cache_dir=tmp_path, force=True, progress=False)
    assert _sha256(served) in _one_line_error(excinfo)
    assert [p.name for p in (out / "raw").iterdir()] == ["ml-100k.zip"]
    assert (out / "raw" / "ml-100k.zip").read_bytes() == good


def test_hand_placed_raw_file_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    archive = _ml100k_zip(tmp_path / "ml-100k" / "raw" / "ml-100k.zip")  # not the published file
    with pytest.raises(DownloadError) as excinfo:
        download("ml-100k", cache_dir=tmp_path, progress=False)
    message = _one_line_error(excinfo)
    assert str(archive) in message and _sha256(archive) in message
    assert DATASETS["ml-100k"].files["ml-100k.zip"].sha256 in message and "delete it and re-run" in message
    assert archive.is_file()  # the user's file is left to them
    assert not (tmp_path / "ml-100k" / "interactions.csv").exists()
    assert not (tmp_path / "ml-100k" / "source.json").exists()


def test_conversion_of_other_raw_files_is_not_reused(tmp_path: Path, monkeypatch) -> None:
    # e.g. converted from a plain-http download before the hashes were pinned
    raw = tmp_path / "ml-100k" / "raw"
    _ml100k_zip(raw / "ml-100k.zip")
    _pin_fakes(monkeypatch, "ml-100k", raw)
    download("ml-100k", cache_dir=tmp_path, progress=False)
    _serve(monkeypatch, "ml-100k", "ml-100k.zip", "http://127.0.0.1:9/x.zip", "f" * 64)
    with pytest.raises(DownloadError) as excinfo:
        download("ml-100k", cache_dir=tmp_path, progress=False)
    assert "f" * 64 in _one_line_error(excinfo)


def test_unpinned_file_is_used_with_a_warning_and_recorded(tmp_path: Path, monkeypatch, caplog) -> None:
    archive = _ml100k_zip(tmp_path / "ml-100k" / "raw" / "ml-100k.zip")
    _serve(monkeypatch, "ml-100k", "ml-100k.zip", DATASETS["ml-100k"].files["ml-100k.zip"].url, None)
    with caplog.at_level("WARNING", logger=dl.__name__):
        out = download("ml-100k", cache_dir=tmp_path, progress=False)
    assert "ml-100k.zip has no published SHA-256" in caplog.text and _sha256(archive) in caplog.text
    info = json.loads((out / "source.json").read_text(encoding="utf-8"))
    assert info["sha256"] == {"ml-100k.zip": _sha256(archive)} and info["sha256_pinned"] == {"ml-100k.zip": False}
