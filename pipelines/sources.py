"""Input discovery for ingest: a folder searched recursively, or a manifest (CSV, parquet, JSONL).

Each input becomes a `Source` with a content fingerprint, so clip keys follow the video's identity,
not its path: moving a folder does not change keys, and the same file listed twice is one source.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lawm.config import ConfigError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
_CHUNK = 1 << 20


@dataclass
class Source:
    path: str
    start: float | None = None
    end: float | None = None
    split: str | None = None  # a manifest may fix it; otherwise it follows from the fingerprint
    meta: dict = field(default_factory=dict)  # extra manifest columns, carried into every clip

    def to_dict(self) -> dict:
        return {"path": self.path, "start": self.start, "end": self.end, "split": self.split, "meta": self.meta}


def fingerprint(path: str | Path) -> str:
    """sha1 of size + first and last MiB: cheap on huge files, stable across copies and renames."""
    path = Path(path)
    digest = hashlib.sha1()
    try:
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_CHUNK))
            if size > 2 * _CHUNK:
                fh.seek(size - _CHUNK)
                digest.update(fh.read(_CHUNK))
    except OSError as err:
        digest.update(f"unreadable:{path}:{err.__class__.__name__}".encode())
    return digest.hexdigest()


def source_id(src: Source, fp: str) -> str:
    """Identity of one source segment. Hex only: WebDataset cuts keys at the first dot."""
    seg = f"{fp}|{src.start}|{src.end}" if (src.start is not None or src.end is not None) else fp
    return hashlib.sha1(seg.encode()).hexdigest()[:20]


def split_of(sid: str, val_fraction: float) -> str:
    """Deterministic train/val split per source: every clip of a video lands on the same side."""
    return "val" if int(sid[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def _read_manifest(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True)
    raise ConfigError(f"ingest.input: {path} is neither a folder nor a .csv/.parquet/.jsonl manifest")


def _clean(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def discover(input_path: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> list[Source]:
    """List the sources of an input folder or manifest. Raises ConfigError when the input itself is unusable."""
    root = Path(input_path)
    if not root.exists():
        raise ConfigError(f"ingest.input: {root} does not exist")
    if root.is_dir():
        exts = {e.lower() for e in extensions}
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        return [Source(path=str(p.absolute())) for p in files]
    table = _read_manifest(root)
    if "path" not in table.columns:
        raise ConfigError(f"ingest.input: manifest {root} has no `path` column")
    sources = []
    for row in table.to_dict("records"):
        path = Path(str(row.pop("path")))
        if not path.is_absolute():
            path = root.parent / path  # relative paths are relative to the manifest
        start, end, split = (_clean(row.pop(k, None)) for k in ("start", "end", "split"))
        meta = {k: _clean(v) for k, v in row.items()}
        sources.append(Source(str(path.absolute()), start and float(start),
                              None if end is None else float(end), split, meta))
    return sources


def labels_sidecar(video_path: str | Path) -> Path | None:
    """`X.labels.npz` beside `X.mp4`: per-frame actions/poses written by lawm's generators and readers."""
    path = Path(video_path)
    candidate = path.with_name(path.stem + ".labels.npz")
    return candidate if candidate.exists() else None
