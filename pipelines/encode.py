"""Stage `encode`: the frozen encoder over every ingested clip, once, into fp16 feature shards.

    python -m pipelines.encode --input INGEST_DIR --output DIR [key=value ...]   (e.g. encoder.kind=timm)

Input: ingest's output folder (or its `shards/` folder): `{split}-NNNNNN.tar` with `<key>.mp4`, `<key>.json` and an
optional `<key>.labels.npz`. Output:
- `features/{split}-NNNNNN.tar`: `<key>.feat.npy` (T', N, D) in `dtype` (bfloat16 is stored as its uint16 bits),
  the clip's `<key>.json` with an `encoder` entry added (dim, grid, tubelet, dtype, ...), `<key>.labels.npz`
  unchanged. Keys are sorted within a split and cut into contiguous runs, one per shard, of about `shard_mb` and
  never fewer shards than the split had clip shards (one per data-parallel worker). Shard bytes are deterministic
  for the same features (member mtimes are 0); each shard is written to a temp file and renamed into place.
- `features/.{split}-NNNNNN.tar.failures.json`: the clips of that shard that could not be encoded, written before
  the shard is renamed into place, so a resumed run reports the failures of the shards it keeps.
- `features.json`: encoder config, dim, grid, tubelet, dtype, counts per split, metrics; written last, so it marks a
  finished run. A rerun with the same inputs and settings is skipped; a killed run resumes, re-encoding only the
  shards it had not renamed into place; other settings (or changed inputs) start `features/` afresh. `counts` and
  `failures` describe all the shards (read back from them and their failure files), so a resumed run reports what
  a fresh one would; `metrics` (clips_encoded, shards_written, ...) describe this run's work only.

Ray Data: tasks read clip members straight out of the tars (by offset), an actor pool (`actors`, the encoder built
once per actor from the driver's weights, on a GPU with `num_gpus_per_actor` > 0) encodes batches, and the driver writes the shards as the
(ordered) results stream in. On GPUs the mp4 decode runs in the CPU read tasks so that the GPU actors only encode;
on CPUs it runs inside the actors (which then hold all CPUs).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lawm.config import ConfigError, from_dict, require, to_dict
from lawm.models.encoders import EncoderConfig
from lawm import provenance, storage
from lawm.files import atomic_file, atomic_write_json, read_json_object, sweep_temporaries
from pipelines.progress import progress_bar
from pipelines.shards import add_member, list_shards, shard_name, shard_split

FEATURE_EXT = "feat.npy"
PASS_THROUGH = ("json", "labels.npz")
READ_CHUNK = 32  # clips per read task at most


@dataclass(kw_only=True)
class EncodeConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    batch_size: int = 16  # clips per encoder forward
    actors: int = 0  # encoder actors; 0 = as many as the cluster's CPUs (or GPUs, with num_gpus_per_actor) allow
    num_gpus_per_actor: float = 0.0  # > 0: actors run the encoder on a GPU (never switched on by itself)
    cpus_per_actor: float = 1.0
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_mb: float = 256.0

    def validate(self) -> None:
        self.encoder.validate()
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.actors >= 0, "actors", "must be >= 0 (0 = automatic)")
        require(self.num_gpus_per_actor >= 0, "num_gpus_per_actor", "must be >= 0")
        require(self.cpus_per_actor > 0, "cpus_per_actor", "must be positive")
        require(self.shard_mb > 0, "shard_mb", "must be positive")


# ----------------------------------------------------------------------------------------------------- encoder


def make_encoder(cfg: EncoderConfig):
    """The frozen encoder, its random init (timm without a checkpoint) seeded by `cfg.seed`, so that a reader can
    rebuild the encoder that made a cache. The actors get the driver's weights through the object store."""
    import torch

    from lawm.models.encoders import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_encoder(cfg)


def encoder_digest(encoder, per_tensor: bool = False):
    """A hash of the encoder's weights and buffers: every actor must hold the same encoder as the driver.
    `per_tensor`: {name: hash} instead, to say which tensors differ."""
    import torch

    parts = {}
    for name, t in sorted(encoder.state_dict().items()):
        parts[name] = hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if per_tensor:
        return {k: v.hexdigest()[:12] for k, v in parts.items()}
    h = hashlib.sha256()
    for name, part in parts.items():
        h.update(name.encode() + part.digest())
    return h.hexdigest()[:16]


def _to_bytes(feat, dtype: str) -> bytes:
    """One clip's features (T', N, D) -> .npy bytes; bfloat16 as its uint16 bit pattern (numpy has no bf16)."""
    import torch

    if dtype == "bfloat16":
        arr = feat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        arr = feat.to(getattr(torch, dtype)).numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class EncodeActor:
    """Ray Data callable class: builds the encoder once, then encodes batches of clip rows."""

    def __init__(self, cfg_dict: dict, digest: str, tensors: dict, state_ref):
        import dataclasses

        import ray
        import torch

        cfg = from_dict(EncodeConfig, cfg_dict)
        self.cfg = cfg
        if cfg.num_gpus_per_actor > 0 and torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        # The driver's weights, not a rebuild: a checkpoint need not exist on this node, and a rebuild need not be
        # bit-identical (random inits, a QR on another thread count).
        arch = cfg.encoder if cfg.encoder.kind == "vjepa2" else dataclasses.replace(cfg.encoder, weights=None)
        encoder = make_encoder(arch)
        encoder.load_state_dict(ray.get(state_ref), strict=True)
        got = encoder_digest(encoder)
        if got != digest:
            mine = encoder_digest(encoder, per_tensor=True)
            differ = sorted(k for k in set(mine) | set(tensors) if mine.get(k) != tensors.get(k))
            raise RuntimeError(f"encode: this actor's encoder ({got}) differs from the driver's ({digest}) in "
                               f"{len(differ)} tensors, e.g. {differ[:5]}; state_dict does not hold all of it?")
        self.encoder = encoder.to(self.device)
        self.info = encoder_info(encoder, cfg, digest)

    def __call__(self, batch: dict) -> dict:
        import torch

        from lawm.data.video import decode_clip

        n = len(batch["key"])
        t0 = time.perf_counter()
        frames, errors = [None] * n, [""] * n
        for i in range(n):
            try:
                if "frames" in batch:  # decoded by a CPU read task
                    if batch["decode_error"][i]:
                        raise RuntimeError(batch["decode_error"][i])
                    shape = tuple(int(s) for s in json.loads(batch["frames_shape"][i]))
                    frames[i] = np.frombuffer(batch["frames"][i], np.uint8).reshape(shape)
                else:
                    frames[i] = decode_clip(batch["mp4"][i])
            except Exception as err:  # noqa: BLE001 - one bad clip must not sink the run
                errors[i] = f"{type(err).__name__}: {err}"
        t1 = time.perf_counter()
        feats: list[bytes] = [b""] * n
        by_shape = defaultdict(list)  # clips of one shape are encoded together
        for i, f in enumerate(frames):
            if f is not None:
                by_shape[f.shape].append(i)
        for idx in by_shape.values():
            x = torch.from_numpy(np.stack([frames[i] for i in idx])).to(self.device, non_blocking=True)
            x = x.permute(0, 1, 4, 2, 3).float().div_(255.0)  # (B, T, C, H, W) in [0, 1], as clips.decode_sample
            out = self.encoder(x).float().cpu()
            for j, i in enumerate(idx):
                feats[i] = _to_bytes(out[j], self.cfg.dtype)
        t2 = time.perf_counter()
        metas = []
        for i in range(n):
            meta = json.loads(batch["json"][i]) if batch["json"][i] else {}
            meta["encoder"] = self.info
            metas.append(json.dumps(meta, default=str).encode())
        per = 1.0 / max(n, 1)
        return {"key": batch["key"], "split": batch["split"], "shard": batch["shard"],
                "feat": np.array(feats, dtype=object), "json": np.array(metas, dtype=object),
                "labels": batch["labels"], "error": np.array(errors, dtype=object),
                "decode_s": np.full(n, (t1 - t0) * per), "encode_s": np.full(n, (t2 - t1) * per)}


def encoder_info(encoder, cfg: EncodeConfig, digest: str) -> dict:
    e = cfg.encoder
    name = {"patch": f"patch{e.patch_size}", "timm": e.timm_name, "vjepa2": str(e.weights)}[e.kind]
    return {"kind": e.kind, "name": name, "image_size": e.image_size, "dim": int(encoder.dim),
            "grid": [int(g) for g in encoder.grid], "tubelet": int(encoder.tubelet), "dtype": cfg.dtype,
            "weights_hash": digest}


# ------------------------------------------------------------------------------------------------- reading


def _scan(shard: Path) -> dict[str, dict[str, tuple[str, int, int]]]:
    """key -> {ext: (path, data offset, size)} from tar headers only."""
    found: dict[str, dict[str, tuple[str, int, int]]] = {}
    with tarfile.open(shard, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            found.setdefault(key, {})[ext] = (str(shard), m.offset_data, m.size)
    return found


def _read_chunk(row: dict, decode: bool) -> list[dict]:
    """A read task: the members of a run of clips, read by offset; with `decode`, also the mp4 decode."""
    from lawm.data.video import decode_clip

    out = []
    handles: dict[str, object] = {}
    try:
        for key, members in json.loads(row["items"]):
            data = {}
            for ext, (path, offset, size) in members.items():
                if path not in handles:
                    storage.pull(path)  # an object-store root: the shard may not be on this node yet
                    handles[path] = open(path, "rb")
                f = handles[path]
                f.seek(offset)
                data[ext] = f.read(size)
            r = {"key": key, "split": row["split"], "shard": row["shard"], "json": data.get("json", b""),
                 "labels": data.get("labels.npz", b"")}
            if decode:
                r["frames"], r["frames_shape"], r["decode_error"] = b"", "[]", ""
                try:
                    frames = decode_clip(data["mp4"])
                    r["frames"], r["frames_shape"] = frames.tobytes(), json.dumps(list(frames.shape))
                except Exception as err:  # noqa: BLE001 - the actor reports it
                    r["decode_error"] = f"{type(err).__name__}: {err}"
            else:
                r["mp4"] = data.get("mp4", b"")
            out.append(r)
    finally:
        for f in handles.values():
            f.close()
    return out


def input_shards(shards_dir: Path) -> Path:
    """Ingest's output folder or its shards folder."""
    shards_dir = Path(shards_dir)
    return shards_dir / "shards" if (shards_dir / "shards").is_dir() else shards_dir


# -------------------------------------------------------------------------------------------------- plan


def _plan(inputs: dict[str, list[Path]], bytes_per_clip: int, shard_bytes: int) -> tuple[dict, int]:
    """split -> list of output shards (each a sorted list of (key, members)); plus duplicate keys dropped."""
    plan, dupes = {}, 0
    for split, shards in sorted(inputs.items()):
        clips: dict[str, dict] = {}
        for shard in shards:
            for key, members in _scan(shard).items():
                if key in clips:
                    dupes += 1
                    continue
                if "mp4" in members:
                    clips[key] = {ext: members[ext] for ext in ("mp4", *PASS_THROUGH) if ext in members}
        keys = sorted(clips)
        if not keys:
            plan[split] = []
            continue
        n_out = max(len(shards), math.ceil(len(keys) * bytes_per_clip / shard_bytes))
        n_out = min(n_out, len(keys))
        bounds = [round(i * len(keys) / n_out) for i in range(n_out + 1)]
        plan[split] = [[(k, clips[k]) for k in keys[bounds[i]:bounds[i + 1]]] for i in range(n_out)]
    return plan, dupes


def _failures_path(shard: Path) -> Path:
    return shard.with_name(f".{shard.name}.failures.json")


def _shard_report(shard: Path, planned: list[str]) -> tuple[int, list[dict]]:
    """(clips in a finished feature shard, its failures) from the shard's headers and its failure file. A shard
    without one (written before failure files existed) names its missing planned clips as failures."""
    keys = {k for k, members in _scan(shard).items() if FEATURE_EXT in members}
    try:
        failures = json.loads(_failures_path(shard).read_text())
    except (OSError, ValueError):
        failures = [{"key": k, "error": "not encoded by an earlier run (reason not recorded)"}
                    for k in planned if k not in keys]
    return len(keys), failures


def _write_shard(path: Path, rows: list[dict]) -> int:
    with atomic_file(path) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for r in sorted(rows, key=lambda r: r["key"]):
            add_member(tar, f"{r['key']}.{FEATURE_EXT}", r["feat"])
            add_member(tar, f"{r['key']}.json", r["json"])
            if r["labels"]:
                add_member(tar, f"{r['key']}.labels.npz", r["labels"])
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------- run


def _auto_actors(cfg: EncodeConfig, resources: dict, batches: int) -> int:
    if cfg.actors:
        return cfg.actors
    if cfg.num_gpus_per_actor > 0:
        gpus = resources.get("GPU", 0.0)
        if gpus < cfg.num_gpus_per_actor:
            raise ConfigError(f"encode.num_gpus_per_actor: {cfg.num_gpus_per_actor} but the cluster has {gpus} GPUs")
        n = int(gpus // cfg.num_gpus_per_actor)
        cpus = resources.get("CPU", 1.0)
        n = min(n, max(1, int((cpus - 1) // cfg.cpus_per_actor)))  # keep a CPU for the decode tasks
    else:
        n = int(resources.get("CPU", 1.0) // cfg.cpus_per_actor)
    return max(1, min(n, batches))


def run_encode(cfg: EncodeConfig, shards_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Encode every clip under `shards_dir` into `out_dir/features/`; returns the summary (see features.json)."""
    import ray

    from pipelines.ray_env import ensure_ray

    cfg.validate()
    src, out_dir = input_shards(Path(shards_dir)), Path(out_dir)
    all_inputs = list_shards(src)
    if not all_inputs:
        raise ConfigError(f"encode: no clip shards in {src}")
    inputs: dict[str, list[Path]] = defaultdict(list)
    for p in all_inputs:
        inputs[shard_split(p)].append(p)
    inputs.setdefault("train", [])
    inputs.setdefault("val", [])

    encoder = make_encoder(cfg.encoder)
    digest, tensors = encoder_digest(encoder), encoder_digest(encoder, per_tensor=True)
    info = encoder_info(encoder, cfg, digest)
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in all_inputs]
    settings = provenance.digest({k: v for k, v in to_dict(cfg).items() if k not in ("batch_size", "actors",
                                  "num_gpus_per_actor", "cpus_per_actor")}, digest, listing)
    feat_dir, summary_path = out_dir / "features", out_dir / "features.json"
    done = read_json_object(summary_path)  # written last: a finished run (an unreadable one is redone)
    if done is not None:
        names = [n for names in done.get("shards", {}).values() for n in names]
        if done.get("settings_hash") == settings and all((feat_dir / n).exists() for n in names):
            return {**done, "features": str(feat_dir), "skipped": True}
    marker = feat_dir / ".settings.json"
    if feat_dir.exists() and not provenance.matches(marker, settings):
        storage.remove(feat_dir)  # features of other settings or inputs must not mix with these
    storage.remove(summary_path)
    provenance.record(marker, settings, config=to_dict(cfg))
    sweep_temporaries(feat_dir)

    frames = 16
    first = next(iter(_scan(all_inputs[0]).values()), {})
    if "json" in first:  # clip length, for the shard size estimate
        path, offset, size = first["json"]
        with open(path, "rb") as f:
            f.seek(offset)
            frames = int(json.loads(f.read(size)).get("frames", frames))
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[cfg.dtype]
    per_clip = (frames // info["tubelet"]) * info["grid"][0] * info["grid"][1] * info["dim"] * itemsize + 2048
    plan, dupes = _plan(inputs, per_clip, int(cfg.shard_mb * 2**20))

    names = {split: [shard_name(split, i) for i in range(len(shards))] for split, shards in plan.items()}
    todo = [(split, i) for split, shards in plan.items() for i in range(len(shards))
            if not (feat_dir / shard_name(split, i)).exists()]
    expected = {(split, i): len(plan[split][i]) for split, i in todo}
    chunks = []
    for split, i in todo:
        items = plan[split][i]
        for j in range(0, len(items), READ_CHUNK):
            chunks.append({"split": split, "shard": i, "items": json.dumps(items[j:j + READ_CHUNK])})
    total = sum(expected.values())

    t0 = time.perf_counter()
    metrics = {"clips_encoded": 0, "failed": 0, "decode_s": 0.0, "encode_s": 0.0, "bytes_written": 0,
               "shards_written": 0, "shards_resumed": sum(len(v) for v in names.values()) - len(todo),
               "duplicate_keys": dupes}
    failures: list[dict] = []
    if chunks:
        ensure_ray()
        resources = ray.cluster_resources()
        gpu = cfg.num_gpus_per_actor > 0
        actors = _auto_actors(cfg, resources, math.ceil(total / cfg.batch_size))
        metrics.update(actors=actors, device="cuda" if gpu else "cpu")
        state_ref = ray.put({k: v.detach().cpu() for k, v in encoder.state_dict().items()})
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True  # rows arrive in plan order: a shard is written once complete
        ctx.enable_progress_bars = False
        bar = progress_bar(total, unit="clip", desc="encode") if progress else None
        pending: dict[tuple[str, int], list[dict]] = defaultdict(list)
        try:
            ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
            # GPU: decode on the CPUs here, the actors only encode. CPU: the actors decode, reads cost ~nothing --
            # but a task with num_cpus=0 is never held back, and uncapped Ray started a worker process per chunk
            # (8 on 2 CPUs, with the raylet's start-up warning): as many reads in flight as actors is enough to
            # keep each actor fed.
            reads = None if gpu else ray.data.TaskPoolStrategy(size=min(len(chunks), max(2, actors)))
            ds = ds.flat_map(_read_chunk, fn_kwargs={"decode": gpu}, num_cpus=1 if gpu else 0, compute=reads)
            ds = ds.map_batches(EncodeActor, fn_constructor_kwargs={"cfg_dict": to_dict(cfg), "digest": digest,
                                                                         "tensors": tensors, "state_ref": state_ref},
                                batch_size=cfg.batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=actors),
                                num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None)
            for r in ds.iter_rows():
                where = (r["split"], int(r["shard"]))
                if r["error"]:
                    failures.append({"key": r["key"], "split": r["split"], "shard": where[1], "error": r["error"]})
                    r = None
                else:
                    metrics["decode_s"] += float(r["decode_s"])
                    metrics["encode_s"] += float(r["encode_s"])
                pending[where].append(r)
                if len(pending[where]) == expected[where]:
                    rows = [x for x in pending.pop(where) if x is not None]
                    shard = feat_dir / shard_name(*where)
                    atomic_write_json(_failures_path(shard), [{"key": f["key"], "error": f["error"]} for f in failures
                                                               if (f["split"], f["shard"]) == where])
                    metrics["bytes_written"] += _write_shard(shard, rows)
                    storage.push(_failures_path(shard))  # an object-store root: a killed run resumes from here
                    storage.push(shard)
                    metrics["shards_written"] += 1
                    metrics["clips_encoded"] += len(rows)
                if bar:
                    bar.update()
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
            if bar:
                bar.close()
        if pending:
            raise RuntimeError(f"encode: shards left incomplete: {sorted(pending)}")
    wall = time.perf_counter() - t0
    metrics["failed"] = len(failures)  # in this run
    metrics.update(wall_s=wall, clips_per_s=metrics["clips_encoded"] / wall if wall > 0 else 0.0,
                   frames_per_s=metrics["clips_encoded"] * frames / wall if wall > 0 else 0.0)
    # Counts and failures of every shard, read back: a resumed run's own tallies cover only the shards it wrote.
    counts, failures = {}, []
    for split, shards in plan.items():
        counts[split] = 0
        for i, items in enumerate(shards):
            n, failed = _shard_report(feat_dir / shard_name(split, i), [k for k, _ in items])
            counts[split] += n
            failures += [{"key": f["key"], "split": split, "error": f["error"]} for f in failed]
    summary = {
        "features": str(feat_dir), "encoder": to_dict(cfg.encoder), "config": to_dict(cfg),
        "dim": info["dim"], "grid_h": info["grid"][0], "grid_w": info["grid"][1], "tubelet": info["tubelet"],
        "frames": frames // info["tubelet"], "dtype": cfg.dtype, "weights_hash": digest, "counts": counts,
        "shards": names, "input_shards": {split: [p.name for p in ps] for split, ps in sorted(inputs.items())},
        "failures": failures, "metrics": metrics, "settings_hash": settings, "skipped": False,
    }
    atomic_write_json(summary_path, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_cli

    return run_cli(argv, prog="python -m pipelines.encode", doc=__doc__, config_cls=EncodeConfig, section="encode",
                   input_help="ingest's output folder (or its shards/ folder)",
                   run=lambda cfg, inp, out, progress: run_encode(cfg, Path(inp), Path(out), progress=progress),
                   show=("counts", "dim", "grid_h", "grid_w", "tubelet", "skipped"),
                   wrote=lambda summary, out: summary["features"])


if __name__ == "__main__":
    # Re-import under the package name: Ray pickles functions of `__main__` by value, without their module.
    from pipelines.encode import main as package_main

    sys.exit(package_main())
