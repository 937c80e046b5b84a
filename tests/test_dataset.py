from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumosrec.core.dataset import load_dataset
from lumosrec.core.errors import DataError
from tests.conftest import write


def test_folder_is_ordered_by_time_and_reindexed(folder: Path) -> None:
    dataset = load_dataset(folder)
    assert dataset.user_ids == ["10", "30"]
    assert dataset.item_ids == ["", "5", "7", "8", "9"]
    # user 10: 5@50, 7@100, 9@200, 5@300 -> indices 1, 2, 4, 1
    np.testing.assert_array_equal(dataset.sequences[0], [1, 2, 4, 1])
    # user 30: 8@5, then 9 and 7 tie at 10 and keep file order
    np.testing.assert_array_equal(dataset.sequences[1], [3, 4, 2])
    assert dataset.titles[1] == "Alpha, the first"
    assert dataset.categories[1] == ("A", "B")
    assert dataset.categories[3] == ()


def test_short_users_are_dropped_and_reported(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = load_dataset(folder)
    assert dataset.dropped_users == {"40": 2}
    assert dataset.stats()["dropped_users"] == 1
    assert "dropped 1 user(s)" in caplog.text


def test_stats(folder: Path) -> None:
    stats = load_dataset(folder).stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 4, 7)
    assert stats["avg_length"] == 3.5
    assert stats["category_coverage"] == 0.75


def test_sequences_file_with_items_beside_it(tmp_path: Path) -> None:
    write(tmp_path / "Beauty.txt", "1 3 2 3\n2 1 2 3 1\n3 1\n")
    write(tmp_path / "items.csv", "item_id,title,categories\n1,a,\n2,b,\n3,c,\n")
    dataset = load_dataset(tmp_path / "Beauty.txt")
    assert dataset.name == "Beauty"
    np.testing.assert_array_equal(dataset.sequences[1], [1, 2, 3, 1])
    assert dataset.dropped_users == {"3": 1}
    assert dataset.titles[1:] == ["a", "b", "c"]


def test_sequences_file_without_items(tmp_path: Path) -> None:
    write(tmp_path / "seq.txt", "1 10 20 30\n")
    dataset = load_dataset(tmp_path / "seq.txt")
    assert dataset.num_items == 3 and dataset.stats()["title_coverage"] == 0.0


BAD_INPUTS = {
    "missing folder": (None, None, "no such file or folder"),
    "missing interactions": ("", "item_id,title,categories\n1,a,\n", "interactions.csv not found"),
    "misnamed column": ("user,item_id,timestamp\n1,1,1\n", None, "line 1: missing column(s) user_id"),
    "missing column": ("user_id,item_id\n1,1\n", None, "missing column(s) timestamp"),
    "non-integer id": (
        "user_id,item_id,timestamp\n1,1,1\n1,x7,2\n",
        None,
        "line 3, column item_id: 'x7' is not an integer",
    ),
    "empty id": ("user_id,item_id,timestamp\n,1,1\n", None, "line 2, column user_id: empty value"),
    "bad timestamp": ("user_id,item_id,timestamp\n1,1,soon\n", None, "line 2, column timestamp"),
    "unknown item": (
        "user_id,item_id,timestamp\n1,1,1\n1,2,2\n1,99,3\n",
        "item_id,title,categories\n1,a,\n2,b,\n",
        "line 4: item 99 is not in",
    ),
    "empty file": ("", None, "interactions.csv: file is empty"),
    "header only": ("user_id,item_id,timestamp\n", None, "no interactions after the header"),
    "duplicated row": ("user_id,item_id,timestamp\n1,1,1\n1,2,2\n1,1,1\n", None, "line 4: duplicate of line 2"),
    "duplicated item": (
        "user_id,item_id,timestamp\n1,1,1\n",
        "item_id,title,categories\n1,a,\n1,b,\n",
        "line 3: item_id 1 is listed twice",
    ),
    "missing items column": ("user_id,item_id,timestamp\n1,1,1\n", "item_id,name\n1,a\n", "missing column(s) title"),
    "only short users": ("user_id,item_id,timestamp\n1,1,1\n1,2,2\n", None, "no user has at least 3"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_file_line_and_column(tmp_path: Path, case: str) -> None:
    interactions, items, message = BAD_INPUTS[case]
    root = tmp_path / "data"
    if interactions is not None:
        root.mkdir()
        if interactions or case == "empty file":
            write(root / "interactions.csv", interactions)
        if items is not None:
            write(root / "items.csv", items)
    with pytest.raises(DataError) as error:
        load_dataset(root)
    text = str(error.value)
    assert message in text
    assert "\n" not in text
    if case not in ("missing folder", "missing interactions", "only short users"):
        assert ".csv" in text


def test_bad_sequences_file(tmp_path: Path) -> None:
    write(tmp_path / "seq.txt", "1 2 3\n2 4 five\n")
    with pytest.raises(DataError, match=r"seq.txt line 2, column 3: 'five'"):
        load_dataset(tmp_path / "seq.txt")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("interactions.csv", b"user_id,item_id,timestamp\n1,2,3\n1,\xe9,4\n", "not UTF-8 text"),  # Latin-1
        ("interactions.csv", bytes(range(256)) * 8, "not UTF-8 text"),  # binary garbage
        ("interactions.csv", b"user_id,item_id,timestamp\n1,2," + b"9" * 200_000 + b"\n", "line 2: field larger"),
        ("seq.txt", b"1 2 3\n" + bytes(range(128, 256)) * 4, "not UTF-8 text"),
    ],
    ids=["latin-1", "binary", "oversized-field", "binary-sequences"],
)
def test_undecodable_or_oversized_input_is_one_line_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        load_dataset(tmp_path if name.endswith(".csv") else tmp_path / name)
    text = str(error.value)
    assert message in text and name in text and "\n" not in text
