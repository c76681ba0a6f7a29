"""Are these outputs from these settings and inputs? One answer for every resumable writer.

A folder of outputs carries a marker holding `hash`, the digest of everything that decides its content (settings
and the identity of its inputs). The runner's `_stage.json` / `_pending.json`, ingest's `_work/settings.json` and
encode's `features/.settings.json` are such markers: each caller decides what goes into the digest (and what, like
timeouts or batch sizes, does not change the outputs), this module decides whether a marker matches. A marker that
is missing, empty or unreadable never matches (the work is redone); markers are written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lawm.config import config_hash
from lawm.files import atomic_write_json, read_json_object


def digest(*parts: Any) -> str:
    """The identity of outputs made from `parts` (configs as dataclasses or dicts, input identities, hashes)."""
    return config_hash(*parts)


def matches(marker: str | Path, expected: str) -> bool:
    return record_matches(read_json_object(marker), expected)


def record_matches(record: dict | None, expected: str) -> bool:
    """The same test on a marker already read (None: missing or unreadable)."""
    return record is not None and record.get("hash") == expected


def record(marker: str | Path, hash: str, **extra: Any) -> None:
    """Write the marker (atomically): `hash` plus whatever the caller wants to keep beside it."""
    atomic_write_json(marker, {"hash": hash, **extra})
