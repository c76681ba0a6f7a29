"""The pipelines' progress display: a live bar on a terminal, a line every `every` seconds in a log."""
from __future__ import annotations

import os
import sys


def progress_bar(total: int, *, unit: str, desc: str, every: float = 10.0):
    """A tqdm bar on stderr; when stderr is not a terminal (a Ray job log, CI) it prints at most every `every` s."""
    from tqdm import tqdm

    # jobs/console.py may put a filter between stderr and the terminal; it says so, and the bar stays live
    live = sys.stderr.isatty() or os.environ.get("LAWM_CONSOLE_IS_TTY") == "1"
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if live else every)
