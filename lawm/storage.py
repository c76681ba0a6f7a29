"""Run roots in an object store (`s3://bucket/prefix`, `gs://bucket/prefix`), through a local mirror on every node.

lawm's stages read and write files with local file APIs (ffmpeg, tarfile, torch.save, parquet). A run root given as
a URI is worked in through a mirror folder at the same path on every node, `MIRROR_BASE/<scheme>/<bucket>/<prefix>`
(LAWM_MIRROR_DIR, default /tmp/lawm-mirror; it must be the same on every node), so that a path recorded in a stage's
marker means the same object everywhere. The store is the record; a node's mirror is only a cache of it:

- `push(path)`: whoever writes a file under a mirror pushes it (a file or a whole folder). Each file is uploaded to a
  temporary key `.NAME.<pid>.tmp` beside its key and moved over it (a server-side copy), so the key shows the old
  object or the new one, never part of one: S3 and GCS complete an upload only on close, and a Python error inside
  a write would otherwise close, and so publish, a part. A killed pusher leaves at most a temporary key (never
  read; gone with the folder's `remove`) or an upload never completed (invisible).
- `pull(path)`: whoever reads a file that another node may have written pulls it first. It makes the local copy
  equal to the store's: objects missing or different locally are downloaded (atomically, lawm.files.atomic_file),
  local files the store does not hold are deleted. Temporary names (`.*.tmp`) are never moved either way.
- `remove(path)`: deletes locally and in the store.
"Different" means another size or modification time: after each transfer the local file's mtime is set to the
object's (whole seconds, as S3 lists it), so a file rewritten locally (a new mtime, to the nanosecond) or an object
rewritten elsewhere (a new LastModified) no longer matches.

For a path outside every mirror, `push` and `pull` do nothing and `remove` deletes the local file or folder: code
that calls them runs unchanged on a local or shared-disk root.
Credentials and endpoints come from the environment that pyarrow reads (AWS_*, AWS_ENDPOINT_URL, GOOGLE_*); they
must reach every node's workers (a Ray job's runtime_env `env_vars`, or the nodes' own environment).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from lawm.files import atomic_file, temporary_name

SCHEMES = ("s3", "gs")
_FILESYSTEMS: dict[str, object] = {}  # "scheme://bucket" → its pyarrow filesystem, one per process
_CHUNK = 8 * 2**20


def is_uri(root: str) -> bool:
    return "://" in str(root)


def mirror_base() -> Path:
    return Path(os.environ.get("LAWM_MIRROR_DIR") or "/tmp/lawm-mirror").absolute()


def split_uri(uri: str) -> tuple[str, str]:
    """("s3", "bucket/prefix") for "s3://bucket/prefix"; ValueError for any other form."""
    scheme, sep, rest = str(uri).partition("://")
    rest = rest.strip("/")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"{uri!r}: only {', '.join(s + '://' for s in SCHEMES)} object stores are supported")
    if not rest or any(part in ("", ".", "..") for part in rest.split("/")):
        raise ValueError(f"{uri!r}: needs a bucket (and an optional prefix) with no empty, '.' or '..' parts")
    return scheme, rest


def working_root(root: str) -> Path:
    """The local folder the pipeline works in: the mirror of an object-store URI, else the path made absolute."""
    if not is_uri(root):
        return Path(root).absolute()
    scheme, rest = split_uri(root)
    return mirror_base() / scheme / rest


def remote_of(path: str | Path) -> str | None:
    """The object-store URI a mirrored path stands for ("s3://bucket/prefix/..."), or None outside every mirror."""
    path, base = Path(path).absolute(), mirror_base()
    if base not in path.parents:
        return None
    parts = path.relative_to(base).parts
    if len(parts) < 2 or parts[0] not in SCHEMES:
        return None
    return f"{parts[0]}://{'/'.join(parts[1:])}"


def _filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; the filesystem is made once per bucket and process."""
    import pyarrow.fs as pafs

    scheme, rest = split_uri(uri)
    key = f"{scheme}://{rest.split('/', 1)[0]}"
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = pafs.FileSystem.from_uri(key)[0]
    return _FILESYSTEMS[key], rest


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _listing(fs, where: str) -> dict[str, tuple[int, int]]:
    """relative path → (size, mtime in ns) of every object under `where` (a file: its own entry under "")."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(where)
    if info.type == pafs.FileType.File:
        return {"": (info.size, info.mtime_ns)}
    if info.type != pafs.FileType.Directory:
        return {}
    found = {}
    for item in fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True)):
        rel = item.path[len(where):].lstrip("/")
        if item.type == pafs.FileType.File and not _is_temporary(rel.rsplit("/", 1)[-1]):
            found[rel] = (item.size, item.mtime_ns)
    return found


def _local_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"": path}
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): p for p in path.rglob("*")
            if p.is_file() and not _is_temporary(p.name)}


def _in_sync(local: Path, remote: tuple[int, int]) -> bool:
    st = local.stat()
    return st.st_size == remote[0] and st.st_mtime_ns == remote[1]


def _stamp(local: Path, mtime_ns: int) -> None:
    os.utime(local, ns=(mtime_ns, mtime_ns))


def _sides(path: str | Path):
    """(filesystem, key of `path`, the store's listing under it), or None for a path outside every mirror."""
    uri = remote_of(path)
    if uri is None:
        return None
    fs, where = _filesystem(uri)
    return fs, where, _listing(fs, where)


def push(path: str | Path) -> None:
    """Upload the file or folder `path` (under a mirror) where the store's copy differs. Never deletes objects."""
    sides = _sides(path)
    if sides is None:
        return
    fs, where, remote = sides
    for rel, local in sorted(_local_files(Path(path)).items()):
        if rel in remote and _in_sync(local, remote[rel]):
            continue
        key = f"{where}/{rel}" if rel else where
        tmp = str(temporary_name(Path(key)))
        with open(local, "rb") as src:  # opened first: a file that cannot be read never starts an upload
            stream = fs.open_output_stream(tmp)
            try:
                shutil.copyfileobj(src, stream, _CHUNK)
            finally:
                stream.close()  # an error above closes (and publishes) the temporary key only
        fs.move(tmp, key)
        _stamp(local, fs.get_file_info(key).mtime_ns)


def pull(path: str | Path) -> None:
    """Make the local file or folder `path` (under a mirror) equal to the store's copy."""
    sides = _sides(path)
    if sides is None:
        return
    fs, where, remote = sides
    path = Path(path)
    local = _local_files(path)
    for rel, file in local.items():
        if rel not in remote:
            file.unlink(missing_ok=True)
    for rel, (size, mtime_ns) in sorted(remote.items()):
        target = path / rel if rel else path
        if rel in local and _in_sync(target, (size, mtime_ns)):
            continue
        key = f"{where}/{rel}" if rel else where
        with fs.open_input_stream(key) as src, atomic_file(target) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        _stamp(target, mtime_ns)


def remove(path: str | Path) -> None:
    """Delete the file or folder `path` locally and, under a mirror, in the store."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    uri = remote_of(path)
    if uri is None:
        return
    import pyarrow.fs as pafs

    fs, where = _filesystem(uri)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(where)
    elif info.type == pafs.FileType.File:
        fs.delete_file(where)


def check_root(root: str) -> None:
    """For an object-store root: write, read back and delete a small object, so that a missing bucket or wrong
    credentials fail before any work starts. OSError with the store's reason."""
    if not is_uri(root):
        return
    fs, where = _filesystem(root)
    probe = f"{where}/.lawm-check.{os.getpid()}.tmp"
    with fs.open_output_stream(probe) as out:
        out.write(b"lawm")
    try:
        with fs.open_input_stream(probe) as src:
            if src.read() != b"lawm":
                raise OSError(f"{root}: an object written there read back different")
    finally:
        fs.delete_file(probe)
