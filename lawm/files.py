"""Atomic, durable file writes: the one place lawm writes a file that must never be seen half-written.

Contract: every writer here writes a temporary file `.NAME.<pid>.tmp` beside the target, flushes and fsyncs it,
renames it over the target and fsyncs the folder, so a crash or a power cut leaves the old file or the new one,
never a part. A failure (an exception inside `atomic_file`) removes the temporary file; what a killed process
left behind is removed by `sweep_temporaries`. Readers treat a missing, empty or unreadable marker as absent
(`read_json_object`), so a rerun redoes that work instead of crashing.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """`with atomic_file(p) as fh: fh.write(...)`: `p` appears, whole and fsynced, only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # a marker written next must never point at bytes still in a cache
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def read_json_object(path: str | Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, empty or unreadable (then the work is redone)."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def sweep_temporaries(folder: str | Path) -> None:
    """Remove the `.NAME.tmp` files a killed writer left anywhere under `folder`."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def atomic_write_parquet(path: str | Path, table) -> Path:
    """A pandas DataFrame as parquet (pyarrow), written atomically; the one parquet writer of lawm."""
    with atomic_file(path) as fh:
        table.to_parquet(fh, index=False)
    return Path(path)
