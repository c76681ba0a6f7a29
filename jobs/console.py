"""The pipeline's console: Ray's known, harmless noise is held back; everything else passes through unchanged.

Ray prints some lines at ERROR or WARNING level that say nothing about this run's health and that a user can do
nothing about (listed in `KNOWN_NOISE`, each with the reason it is harmless here). Some come from Ray's C++ core
writing straight to file descriptor 2, so filtering `sys.stderr` is not enough: `quiet_ray_noise()` points fd 2 at
a pipe read by a small child process (this file, run as a script) that copies every other line to the real stderr
and, at the end, says how many lines it held back and how to see them.

Contract: nothing but the listed lines is dropped, and nothing is lost when the pipeline dies: the filter is a separate
process that ignores SIGINT and drains the pipe until every writer is gone, so a crash trace printed by a dying
driver still reaches the terminal. `LAWM_RAW_LOGS=1` turns the filter off. Ray's own log files keep everything.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from typing import BinaryIO, Iterator

# (text that identifies the line, why it is harmless here). Matched as substrings of one line.
KNOWN_NOISE = (
    # Ray Data's actor pool and Ray Train's PreemptionWatcher create restartable actors with arguments in the object
    # store; Ray warns that a restart would fail if those were evicted (ray-project/ray#53727). Encode resumes per
    # shard and training from its last checkpoint, so a lost actor costs a rerun, not data.
    ("has constructor arguments in the object store and max_restarts > 0", "ray-project/ray#53727"),
    # the raylet counts worker processes started at once against the CPU count; Ray Data's and Ray Train's own
    # helper actors exceed it on a 2-CPU machine without any harm
    ("PYTHON worker processes have been started on node", "worker start-up count"),
    # encode turns Ray Data's progress bars off to print its own one line
    ("Progress bars disabled. To enable, set", "encode's own progress line"),
    # Ray Train's two lines per checkpoint, with every metric: lawm's own progress line says the same once
    ("Checkpoint successfully created at: Checkpoint(", "training's own progress line"),
    ("Reporting training result ", "training's own progress line"),
)
RAW_ENV = "LAWM_RAW_LOGS"
TTY_ENV = "LAWM_CONSOLE_IS_TTY"  # set while the filter stands between this process and a terminal


def filter_lines(src: BinaryIO, dst: BinaryIO, patterns: tuple[bytes, ...]) -> int:
    """Copy `src` to `dst` piece by piece, a piece ending at a newline or a carriage return (so a progress bar's
    in-place updates pass as they come), leaving out pieces that contain a pattern; returns how many were left out.
    A last piece without an ending is copied too."""
    hidden, pending = 0, b""

    def emit(piece: bytes) -> int:
        if any(p in piece for p in patterns):
            return 1
        dst.write(piece)
        return 0

    while chunk := src.read1(65536):
        pieces = re.split(rb"(?<=[\r\n])", pending + chunk)
        pending = pieces.pop()  # the unfinished tail ('' when the chunk ended a piece)
        for piece in pieces:
            hidden += emit(piece)
        dst.flush()
    if pending:
        hidden += emit(pending)
        dst.flush()
    return hidden


@contextlib.contextmanager
def quiet_ray_noise() -> Iterator[None]:
    """Within the block, fd 2 (C++ and Python alike) goes through the filter child; restored on the way out."""
    if os.environ.get(RAW_ENV, "") not in ("", "0"):
        yield
        return
    sys.stderr.flush()
    if os.isatty(2):  # fd 2 becomes a pipe: progress bars ask this to stay live bars (pipelines/progress.py)
        os.environ[TTY_ENV] = "1"
    original = os.dup(2)
    read, write = os.pipe()
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=read, stdout=original,
                             close_fds=True)
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.environ.pop(TTY_ENV, None)
        os.dup2(original, 2)  # the pipe's last writer in this process is gone: the child sees EOF once Ray's are
        os.close(original)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a detached process still holds the pipe; its lines stop here
            child.kill()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the pipeline; this drains what it prints meanwhile
    hidden = filter_lines(sys.stdin.buffer, sys.stdout.buffer, tuple(p.encode() for p, _ in KNOWN_NOISE))
    if hidden:
        sys.stdout.write(f"(lawm held back {hidden} line(s) of known, harmless Ray noise; {RAW_ENV}=1 shows them, "
                         "and Ray's own logs (the session's logs/ folder) keep everything)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
