"""WebDataset shards: the one module that names, lists and writes shard tars (ingest packs staged per-video tars
into shards of a target size; encode writes feature shards through the same writer).

Shards are immutable once renamed into place; the set of keys inside existing shards is the record of
what is packed, so a run killed at any point repacks nothing twice and loses nothing. A shard is fsynced before
its rename and the folder after it: the staged tars it replaces are deleted only once it is durable.
"""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from lawm import storage
from lawm.files import atomic_file, sweep_temporaries

_SHARD = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{6})\.tar$")


def shard_keys(path: Path) -> list[str]:
    """Clip keys in a shard, read from tar headers only (no clip data is touched). Raises tarfile.ReadError for a
    tar cut short, even at a member boundary: a finished one ends in two zero blocks."""
    keys = []
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
        end = tar.offset  # where the end-of-archive blocks begin
    if path.stat().st_size < end + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"{path.name} has no end-of-archive blocks: cut short")
    return keys


def list_shards(shard_dir: Path, split: str | None = None) -> list[Path]:
    found = [p for p in sorted(shard_dir.glob("*.tar")) if _SHARD.match(p.name)]
    return [p for p in found if split is None or _SHARD.match(p.name)["split"] == split]


def packed_sources(shard_dir: Path) -> dict[str, str]:
    """sid → shard file name, for every source already inside a finished shard. A shard that does not read to
    its end (cut short by a disk failure) is deleted: its sources count as not packed, so they are redone."""
    mapping = {}
    for shard in list_shards(shard_dir):
        try:
            keys = shard_keys(shard)
        except tarfile.ReadError:
            storage.remove(shard)
            continue
        mapping.update({key.rsplit("_", 1)[0]: shard.name for key in keys})
    return mapping


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member of a WebDataset tar, with mtime 0: the same clips give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_index(path: Path) -> int:
    return int(_SHARD.match(path.name)["index"])


def shard_split(path: Path) -> str:
    return _SHARD.match(path.name)["split"]


def _write_shard(path: Path, staged: list[Path]) -> None:
    with atomic_file(path) as raw, tarfile.open(fileobj=raw, mode="w") as out:
        for stage_tar in staged:
            with tarfile.open(stage_tar, "r") as src:
                for member in src:
                    out.addfile(member, src.extractfile(member))


def pack(pending: list[tuple[str, str, Path]], shard_dir: Path, target_bytes: int, min_shards: int = 1) -> dict[str, str]:
    """Pack staged tars. `pending` holds (split, sid, staged tar) for sources not yet in a shard.

    Sources are packed in (split, sid) order into shards of about `target_bytes`, never splitting a source;
    `min_shards` lowers the target so that each split gets at least that many shards when it has the
    sources for them (data-parallel training needs a shard per worker). Returns sid → shard name.
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(shard_dir)  # a shard a killed run did not finish
    mapping: dict[str, str] = {}
    for split in sorted({s for s, _, _ in pending}):
        items = sorted((sid, p) for s, sid, p in pending if s == split)
        total = sum(p.stat().st_size for _, p in items)
        target = max(1, min(target_bytes, total // max(min_shards, 1)))
        existing = list_shards(shard_dir, split)
        next_index = 1 + max((shard_index(p) for p in existing), default=-1)
        group: list[tuple[str, Path]] = []
        size = 0
        for n, (sid, staged) in enumerate(items):
            group.append((sid, staged))
            size += staged.stat().st_size
            if size >= target or n == len(items) - 1:
                name = shard_name(split, next_index)
                _write_shard(shard_dir / name, [p for _, p in group])
                mapping.update({s: name for s, _ in group})
                next_index += 1
                group, size = [], 0
    return mapping
