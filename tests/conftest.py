"""Shared fixtures: tiny datasets written in the uniform folder format."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three users; user 30 has ties in time, user 40 is too short to keep."""
    write(
        tmp_path / "interactions.csv",
        "user_id,item_id,timestamp\n"
        "10,7,100\n10,5,50\n10,9,200\n10,5,300\n"
        "30,9,10\n30,7,10\n30,8,5\n"
        "40,7,1\n40,9,2\n",
    )
    write(
        tmp_path / "items.csv",
        'item_id,title,categories\n5,"Alpha, the first",A|B\n7,Beta,B\n8,Gamma,\n9,Delta,C\n',
    )
    return tmp_path
