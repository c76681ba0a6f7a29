"""Input discovery for ingest: a folder searched recursively, or a manifest (CSV, parquet, JSONL).

Each listed input becomes a `Source`. `discover` only lists and stats, it never opens a video, so a FIFO, a
device or a broken symlink cannot block it: such inputs are listed too and each ends in a failure row. Folders
are walked following symlinked folders (each real folder once, so a symlink loop ends).

`fingerprint` is the SHA-256 of the whole content: clip keys follow the video's identity, not its path (moving a
folder does not change keys), and only byte-identical files share one.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lawm import storage
from lawm.config import ConfigError
from lawm.data.video import VideoError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
SPLITS = ("train", "val", "test")  # shard name prefixes; the readers ask for these names
# SHA-256 over 4 MiB reads: with the CPU's SHA extensions it hashed 670 MB/s on the 2-core bench machine while
# other jobs ran (blake2b 180 MB/s, sha1 200 MB/s there), a small fraction of the time decoding takes.
_BLOCK = 4 << 20


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
    """SHA-256 (hex) of the file's whole content, streamed. Raises VideoError (missing, broken_symlink,
    not_a_file) for what is not a regular file, checked on the open descriptor before the first read, and
    OSError when reading fails."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; it changes nothing for files
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if path.is_symlink():
            raise VideoError("broken_symlink", f"{path} points to {os.readlink(path)}, which does not exist",
                             stage="list") from None
        raise VideoError("missing", f"{path} does not exist", stage="list") from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VideoError("not_a_file", f"{path} is not a regular file (a FIFO, device, socket or folder)",
                             stage="list")
        digest = hashlib.sha256()
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def source_id(src: Source, fp: str) -> str:
    """Identity of one source segment. Hex only: WebDataset cuts keys at the first dot."""
    seg = f"{fp}|{src.start}|{src.end}" if (src.start is not None or src.end is not None) else fp
    return hashlib.sha1(seg.encode()).hexdigest()[:20]


def split_of(sid: str, val_fraction: float) -> str:
    """Deterministic train/val split per source: every clip of a video lands on the same side."""
    return "val" if int(sid[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def check_split(split) -> None:
    """A manifest's split becomes a shard name prefix: only the names readers ask for are allowed."""
    if split is not None and split not in SPLITS:
        raise VideoError("bad_split", f"split {split!r} is not one of {list(SPLITS)}", stage="list")


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


def _walk(root: Path, exts: set[str]) -> list[Path]:
    """Every entry with a video extension under `root`, whatever its type (stat only); symlinked folders are
    followed, each real folder visited once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # a folder reached twice (a symlink loop, or two links to one folder)
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        found += [Path(folder) / f for f in files if Path(f).suffix.lower() in exts]
    return sorted(found)


def discover(input_path: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> list[Source]:
    """List the sources of an input folder or manifest. Raises ConfigError when the input itself is unusable.
    Never opens a listed file: what is not a usable video is found (and recorded) by the caller."""
    root = Path(input_path)
    if not root.exists():
        raise ConfigError(f"ingest.input: {root} does not exist")
    if root.is_dir():
        files = _walk(root, {e.lower() for e in extensions})
        return [Source(path=str(p.absolute())) for p in files]
    if not stat.S_ISREG(os.stat(root).st_mode):
        raise ConfigError(f"ingest.input: {root} is neither a folder nor a regular manifest file")
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
                              None if end is None else float(end), None if split is None else str(split), meta))
    return sources


def fetch_source(video_path: str | Path) -> None:
    """Bring a video the pipeline made (and its sidecar) into this node's mirror of an object-store root; nothing
    for any other path (lawm/storage.py)."""
    path = Path(video_path)
    if storage.remote_of(path) is not None:
        storage.pull(path)
        storage.pull(sidecar_path(path))


def sidecar_path(video_path: str | Path) -> Path:
    """Where `X.mp4`'s labels go: `X.labels.npz` beside it."""
    path = Path(video_path)
    return path.with_name(path.stem + ".labels.npz")


def labels_sidecar(video_path: str | Path) -> Path | None:
    """`X.labels.npz` beside `X.mp4`: per-frame actions/poses written by lawm's generators and readers."""
    candidate = sidecar_path(video_path)
    return candidate if candidate.exists() else None
