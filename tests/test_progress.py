"""Progress bars: redrawn in place on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from lumosrec.core.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_in_a_log_is_plain_lines_and_on_a_terminal_redraws_in_place() -> None:
    log, terminal = io.StringIO(), _Terminal()
    for stream in (log, terminal):
        for _ in progress_bar(range(500), desc="work", file=stream, mininterval=0, miniters=100):
            pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) >= 2
    assert lines[0].startswith("work:") and "500/500" in lines[-1]
    assert "\r" in terminal.getvalue()  # a terminal gets tqdm's own bar
