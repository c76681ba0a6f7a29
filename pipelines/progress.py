"""The pipelines' progress display: a live bar on a terminal, a line every `every` seconds in a log."""
from __future__ import annotations

import sys


def progress_bar(total: int, *, unit: str, desc: str, every: float = 10.0):
    """A tqdm bar on stderr; when stderr is not a terminal (a Ray job log, CI) it prints at most every `every` s."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else every)
