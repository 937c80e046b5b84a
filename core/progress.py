"""Progress bars that suit where the output goes.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (a log file, CI, ``nohup``): a redrawn
bar is one ever-growing line of carriage returns, so the same tqdm writes plain lines instead, at
most one every :data:`LINE_INTERVAL` seconds, plus the final one.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm

#: seconds between two progress lines when the output is not a terminal
LINE_INTERVAL = 30.0


class _Lines:
    """A stream wrapper that turns tqdm's in-place redraws into one line each."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)`` on a terminal; plain lines every :data:`LINE_INTERVAL` seconds
    elsewhere (``file`` in ``options`` is the stream, standard error by default)."""
    stream = options.pop("file", None) or sys.stderr
    if not stream.isatty():
        options.setdefault("mininterval", LINE_INTERVAL)
        options["maxinterval"] = max(float(options.get("maxinterval", 0.0)), options["mininterval"])
        options.update(file=_Lines(stream), dynamic_ncols=False, ncols=100, ascii=True)
    else:
        options["file"] = stream
    return tqdm(iterable, **options)
