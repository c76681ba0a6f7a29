"""Ray Train wiring for every training stage: a TorchTrainer (Train V2) running `lawm.training.loop.Trainer` in
each worker, with DDP, checkpoints through `ray.train.report`, restarts from the last checkpoint after a lost
worker, and step metrics written to MLflow by rank 0.

The objective is built inside each worker from a picklable `build(**kwargs)`; its `exports()` are saved as lawm
checkpoints in `<stage>/models/` by rank 0 at the end (so `run.root` must be shared storage on a cluster, or an
object store: then rank 0 pushes them there, and Ray Train persists its checkpoints to the store itself).

Checkpoints hold every rank's RNG state (gathered at each checkpoint); a resumed rank continues its own stream,
exactly where an uninterrupted run would be. Validation scores a fixed, seeded sample of clips spread over all
held-out videos (`validation_sample`), averaging over clips.
"""
from __future__ import annotations

import functools
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lawm import storage
from lawm.config import require
from lawm.files import atomic_write_json
from lawm.training.loop import Trainer, TrainConfig, set_rng_state, to_device


@dataclass(kw_only=True)
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the stage fails

    def validate(self) -> None:
        require(self.num_workers >= 1, "num_workers", "must be at least 1")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")


@dataclass(kw_only=True)
class TrainJob:
    """Everything a worker needs, all picklable."""
    stage: str
    build: Callable[..., torch.nn.Module]
    build_kwargs: dict
    train: TrainConfig
    scaling: ScalingSection
    train_urls: list[str]
    val_urls: list[str]
    data_kind: str  # "features" or "clips"
    # decode each clip's labels.npz: the action objectives read them; LAM and decoder training never do, and on the
    # science run's feature shards the labels were 60 % of a batch's decode time (24 of 40 ms at batch 40)
    labels: bool = True
    out_dir: str
    seed: int = 0
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    val_batches: int = 4  # the validation sample: val_batches x batch_size clips over all held-out videos
    audit_keys: bool = False  # each rank appends the clip keys it trained on to keys-rank<r>.txt (a test's aid: on
    #                           the rank's own disk, never pushed to an object-store root)
    run_dir: str = ""  # <storage>/<run name>, set by fit()
    metric_prefix: str = ""  # the per-domain fits of one stage log into its run as <prefix><metric> (e.g. nav/)


def _decode_fn(kind: str, labels: bool = True):
    from lawm.data.clips import decode_sample
    from lawm.data.features import decode_features

    decode = decode_sample if kind == "clips" else decode_features
    # a partial of module-level functions: picklable, so DataLoader worker processes can take it
    return decode if labels else functools.partial(_without_labels, decode)


def _without_labels(decode, sample: dict) -> dict:
    return decode({k: v for k, v in sample.items() if k != "labels.npz"})


def _loader(job: TrainJob, urls: list[str], shuffle: int, rank=None, world_size=None, repeat=False, drop_last=True):
    from lawm.data.clips import ShardDataset, collate

    ds = ShardDataset(urls, _decode_fn(job.data_kind, job.labels), shuffle=shuffle, seed=job.seed, rank=rank,
                      world_size=world_size, epoch_shuffle=shuffle > 0, repeat=repeat)
    # Its own generator: starting an iterator otherwise draws from the global torch RNG, so a resumed run (which
    # starts its iterator after restoring the RNG) would draw a different stream from an uninterrupted one.
    generator = torch.Generator().manual_seed(job.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=job.train.batch_size, num_workers=job.train.loader_workers,
                                         collate_fn=collate, drop_last=drop_last, persistent_workers=False,
                                         generator=generator)
    return ds, loader


# MLflow answers a value it will never take (a bad name, a deleted run) with one of these: dropped, not retried
_REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
             "PERMISSION_DENIED", "UNAUTHENTICATED"}


def _refused(err: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in _REFUSALS


class _MlflowLogger:
    """Rank 0 logs step metrics into the stage's child run, every rank tags its node (the library itself never
    imports MLflow).

    Calls only queue: one background thread sends, so training never waits on the tracking server, and a server that
    is down or restarting costs no training. What could not be sent stays queued, in order, and is tried again after
    1 s, doubling to 60 s (new values do not shorten the wait; while closing, every second). A value MLflow refuses
    (`_REFUSALS`) is found by sending the batch one value at a time, dropped, counted in `dropped` and named once on
    the console; the rest go on. `close` waits up to `flush_s` for the queue to empty and returns how many values
    MLflow has not confirmed, dropped ones included. The sender's HTTP requests should fail fast (`train_worker` sets
    MLflow's own retries to 0 and its timeout to 10 s unless the user set them): this loop does the retrying."""

    BATCH = 100  # entries per request: MLflow takes up to 1000 metrics but only 100 tags in one log_batch

    def __init__(self, uri: str, run_id: str, prefix: str = ""):
        self.client, self.prefix = None, prefix
        self.failed_tries, self.dropped, self.last_error = 0, 0, ""
        self._queue: list[tuple] = []  # ("metric", Metric) or ("tag", key, value), in call order
        self._cond = threading.Condition()
        self._closing = self._abandoned = False
        self._thread: threading.Thread | None = None
        if uri and run_id:
            import mlflow

            self.client, self.run_id = mlflow.MlflowClient(uri), run_id
            self._thread = threading.Thread(target=self._send_loop, name="lawm-mlflow-logger", daemon=True)
            self._thread.start()

    def tag_node(self, rank: int, step: int) -> None:
        """Tag the run with the Ray node this rank runs on, at each (re)start of the worker group: the tag
        `lawm.worker_node/<prefix>rank<r>/step<s>` says where the model was trained, and that every node reached the
        store."""
        if self.client is None:
            return
        import ray

        self._put([("tag", f"lawm.worker_node/{self.prefix}rank{rank}/step{step}",
                    ray.get_runtime_context().get_node_id())])

    def __call__(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._put([("metric", Metric(self.prefix + k, float(v), ts, step)) for k, v in metrics.items()])

    def close(self, flush_s: float) -> int:
        """Send what is queued, waiting at most `flush_s`; the number of values MLflow has not confirmed."""
        if self._thread is None:
            return 0
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(flush_s)
        with self._cond:
            self._abandoned = True  # a thread still retrying stops at its next wake-up
            self._cond.notify_all()
            return len(self._queue) + self.dropped

    def _put(self, items: list[tuple]) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the MLflow logger is closed")
            self._queue += items
            self._cond.notify_all()

    def _send(self, batch: list[tuple]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, metrics=[e[1] for e in batch if e[0] == "metric"],
                              tags=[RunTag(e[1], e[2]) for e in batch if e[0] == "tag"])

    def _note(self, err: Exception, what: str) -> None:
        self.last_error = f"{err.__class__.__name__}: {err}"[:300]
        sys.stdout.write(f"[mlflow] {what} ({self.last_error})\n")
        sys.stdout.flush()

    def _send_loop(self) -> None:
        delay, limit = 1.0, self.BATCH
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._abandoned:
                    return
                batch = self._queue[:limit]
            try:
                self._send(batch)
            except Exception as err:  # noqa: BLE001 - down, restarting or refusing: see the class docstring
                if _refused(err):
                    if len(batch) > 1:
                        limit = 1  # find the value it refuses
                        continue
                    self.dropped += 1
                    if self.dropped == 1:
                        self._note(err, "a value was refused and dropped; the others go on")
                    with self._cond:
                        del self._queue[:1]
                    limit = self.BATCH
                    continue
                self.failed_tries += 1
                if self.failed_tries == 1:
                    self._note(err, "cannot log to the tracking server; training goes on and the values are sent "
                                    "when it answers")
                deadline = time.monotonic() + delay
                with self._cond:  # new values do not end the wait; closing does, and then retries every second
                    while not self._abandoned and time.monotonic() < deadline:
                        if self._closing:
                            deadline = min(deadline, time.monotonic() + 1.0)
                        self._cond.wait(max(0.0, min(deadline - time.monotonic(), 1.0)))
                delay = min(2 * delay, 60.0)
                continue
            delay = 1.0
            with self._cond:
                del self._queue[: len(batch)]


MLFLOW_FLUSH_S = 60.0  # how long a finished worker waits for its queued MLflow values before going on without them


def _close_logger(job: TrainJob, log: _MlflowLogger, flush_s: float) -> None:
    left = log.close(flush_s)
    if left:
        out = Path(job.out_dir)
        where = f"the step metrics are in {out / 'progress.jsonl'}"
        if (out / "result.json").exists():  # written by _finish: not there after a crash
            where += f", the validation metrics in {out / 'result.json'}"
        sys.stdout.write(f"[{job.stage}] {left} values not confirmed by MLflow ({log.last_error or 'no answer'}); "
                         f"{where}\n")
        sys.stdout.flush()


def _progress(job: TrainJob, event: dict) -> None:
    """A JSON line per event in <stage>/progress.jsonl (start, log, end): what a person or test can follow."""
    path = Path(job.out_dir) / "progress.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)  # rank 0 may run on a node without the stage's folder
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": time.time(), "pid": os.getpid(), **event}) + "\n")
    storage.push(path)


def train_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_all(job.seed + rank)  # every rank its own streams: torch, numpy and python (a checkpoint holds all three)
    device = ray.train.torch.get_device()
    for url in (*job.train_urls, *job.val_urls):
        storage.pull(url)  # an object-store root: the feature shards may not be on this node yet
    objective = job.build(**job.build_kwargs).to(device)
    module = ray.train.torch.prepare_model(objective, move_to_device=False) if world > 1 else objective
    trainer = Trainer(objective, job.train, module, device)
    state = _latest_state(job, ray.train.get_checkpoint(), device)
    if state is not None:
        trainer.load_state_dict(state)
        _restore_rank_rng(state, rank, world, job.seed)
    # every rank tags its node (a client per rank: 2.0 s of CPU, measured with a sqlite store); rank 0 logs metrics.
    # The logger retries by itself: MLflow's own retries (7, ~4 min) and 120 s timeout would only hide the failure
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    log = _MlflowLogger(job.tracking_uri, job.mlflow_run_id, job.metric_prefix)
    finished = False
    try:
        log.tag_node(rank, trainer.step)
        if rank == 0:
            _progress(job, {"event": "start", "step": trainer.step, "world_size": world})
        ds, loader = _loader(job, job.train_urls, job.train.shuffle, repeat=True)

        def make_batches(consumed: int):
            ds.set_position(consumed, job.train.batch_size)
            if job.audit_keys:
                return _audited(iter(loader), Path(job.out_dir) / f"keys-rank{rank}.txt")
            return iter(loader)

        def on_log(metrics: dict, step: int) -> None:
            if rank == 0:
                log(metrics, step)
                _progress(job, {"event": "log", "step": step, **{k: round(v, 6) for k, v in metrics.items()}})
                shown = " ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "pred_loss", "samples_per_s")
                                 if k in metrics)
                # not print(): Ray Train patches it to log *and* echo, which showed every line twice in the driver
                sys.stdout.write(f"[{job.stage}] step {step}/{job.train.steps} {shown}\n")
                sys.stdout.flush()

        def on_checkpoint(state: dict, step: int, metrics: dict) -> None:
            state = {**state, "rng_ranks": _gather_rng(state["rng"], world)}
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    torch.save(state, Path(d) / "state.pt")
                    (Path(d) / "step.json").write_text(json.dumps({"step": step}))
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"step": step, **metrics}, checkpoint=ckpt)

        trainer.fit(make_batches, on_log, on_checkpoint)
        if rank == 0:
            _finish(job, objective, log)
        finished = True
    finally:  # a crash waits briefly: its own error is the one to see
        _close_logger(job, log, flush_s=MLFLOW_FLUSH_S if finished else 5.0)


def _gather_rng(own: dict, world: int) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it at each checkpoint)."""
    if world == 1:
        return [own]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, own)
    return states


def _restore_rank_rng(state: dict, rank: int, world: int, seed: int) -> None:
    """Each rank continues its own random stream (Trainer.load_state_dict restored rank 0's on every rank). A
    checkpoint from another world size (or one without per-rank states) gives each rank a fresh stream, seeded
    by (seed, rank, step) so that ranks still differ."""
    saved = state.get("rng_ranks")
    if saved is not None and len(saved) == world:
        set_rng_state(saved[rank])
        return
    _seed_all(int(np.random.SeedSequence([seed, rank, state["step"]]).generate_state(1)[0]))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _latest_state(job: TrainJob, reported, device) -> dict | None:
    """The newest complete checkpoint: Ray's registered one, or a newer one already persisted in the run folder
    that the controller had not registered when a worker died (so a restart loses at most one interval)."""
    if job.run_dir:
        storage.pull(job.run_dir)  # an object-store root: Ray Train persisted the checkpoints there
    dirs = sorted(Path(job.run_dir).glob("checkpoint_*"), key=lambda p: p.name, reverse=True) if job.run_dir else []
    candidates = []
    for d in dirs:
        try:
            candidates.append((json.loads((d / "step.json").read_text())["step"], d))
        except (OSError, ValueError, KeyError):
            continue  # a copy the kill interrupted
    if reported is not None:
        with reported.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
        candidates = [c for c in candidates if c[0] > state["step"]]
    else:
        state = None
    for _, d in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            return torch.load(d / "state.pt", map_location=device, weights_only=True)
        except Exception:
            continue
    return state


def _audited(batches, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        with open(path, "a") as fh:
            fh.write("".join(k + "\n" for k in batch["key"]))
        yield batch


def validation_sample(urls: list[str], clips: int, seed: int) -> list[tuple[str, str]]:
    """A fixed sample of at most `clips` validation clips, as (shard url, key), the same for the same shards and
    seed. Every clip when there are no more; else a systematic sample of the clips grouped by source video
    (videos, and clips within each, in a seeded order), so that each held-out video contributes in proportion
    to its clip count and the sample's mean is a clip-weighted mean over all of them: never just the first
    shards in key order. Keys are `<source id>_<clip index>` (ingest), which gives the video.
    Returned in a seeded order, so that batches mix videos (the shuffled-latent control pairs clips in a batch)."""
    rng = np.random.default_rng(seed)
    by_video: dict[str, list[tuple[str, str]]] = {}
    for url in sorted(urls):
        for key in _shard_keys(url):
            by_video.setdefault(key.rsplit("_", 1)[0], []).append((url, key))
    order = [by_video[v] for v in rng.permutation(sorted(by_video))]
    every = [item for group in order for item in (group[i] for i in rng.permutation(len(group)))]
    if len(every) > clips:
        start = rng.random()
        every = [every[int((i + start) * len(every) / clips)] for i in range(clips)]
    return [every[i] for i in rng.permutation(len(every))]


def _shard_keys(url: str) -> list[str]:
    """The sample keys of a shard, in order, from its tar headers."""
    import tarfile

    with tarfile.open(url) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar if m.isfile()))


def validation_batches(urls: list[str], decode, clips: int, batch_size: int, seed: int):
    """The validation sample (`validation_sample`) decoded and collated in batches of nearly equal size (at most
    `batch_size`), reading only the sampled members of each shard."""
    import tarfile

    from lawm.data.clips import collate

    sample = validation_sample(urls, clips=clips, seed=seed)
    raw: dict[str, dict] = {}
    for url in sorted({u for u, _ in sample}):
        wanted = {k for u, k in sample if u == url}
        with tarfile.open(url) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if m.isfile() and key in wanted:
                    raw.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    n_batches = -(-len(sample) // batch_size)
    for part in np.array_split(np.arange(len(sample)), n_batches) if sample else []:
        yield collate([decode(raw[sample[i][1]]) for i in part])


def _finish(job: TrainJob, objective: torch.nn.Module, log: _MlflowLogger) -> None:
    """Rank 0: export the trained models and evaluate on validation clips."""
    from lawm.checkpoint import save_model
    from lawm.training.loop import nonfinite_tensors

    models_dir = Path(job.out_dir) / "models"
    exports = objective.exports()
    for name, m in exports.items():  # all checked before any is written: a NaN model is never exported as done
        bad = nonfinite_tensors(m.state_dict())
        if bad:
            raise RuntimeError(f"{job.stage}: refusing to export {name}: non-finite weights in {', '.join(bad[:5])}")
    extra = objective.export_extra() if hasattr(objective, "export_extra") else {}
    paths = {name: str(save_model(models_dir / f"{name}.pt", m, extra)) for name, m in exports.items()}
    evaluation: dict[str, float] = {}
    if hasattr(objective, "evaluate") and job.val_urls:
        objective.eval()
        device = next(objective.parameters()).device
        sums: dict[str, float] = {}
        n = 0
        for batch in validation_batches(job.val_urls, decode=_decode_fn(job.data_kind, job.labels),
                                        clips=job.val_batches * job.train.batch_size,
                                        batch_size=job.train.batch_size, seed=job.seed):
            clips = len(batch["key"])  # batch means weighted by their clip counts: a mean over clips
            for k, v in objective.evaluate(to_device(batch, device)).items():
                sums[k] = sums.get(k, 0.0) + v * clips
            n += clips
        evaluation = {f"val_{k}": v / n for k, v in sums.items()} if n else {}
        log(evaluation, job.train.steps)
    storage.push(models_dir)
    atomic_write_json(Path(job.out_dir) / "result.json", {"models": paths, "eval": evaluation})  # fit() reads it
    storage.push(Path(job.out_dir) / "result.json")
    _progress(job, {"event": "end", "step": job.train.steps})


def fit(job: TrainJob, run_name: str) -> dict:
    """Run the job on Ray Train. Rerunning with the same `run_name` (same stage folder) resumes from its last
    checkpoint. Returns {"models": {name: path}, "eval": {...}, "checkpoint": path, "seconds": the fit's wall time}."""
    import ray.train
    from ray.train.torch import TorchTrainer

    local = Path(job.out_dir) / "ray"
    local.mkdir(parents=True, exist_ok=True)
    # an object-store root: Ray Train persists checkpoints to the store itself (pyarrow), from every node
    remote = storage.remote_of(local)
    scaling = ray.train.ScalingConfig(
        num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
        resources_per_worker={"CPU": job.scaling.cpus_per_worker,
                              **({"GPU": job.scaling.gpus_per_worker} if job.scaling.use_gpu else {})})
    run_config = ray.train.RunConfig(
        name=run_name, storage_path=remote or str(local.absolute()),
        failure_config=ray.train.FailureConfig(max_failures=job.scaling.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    job.run_dir = str(local.absolute() / run_name)
    trainer = TorchTrainer(train_worker, train_loop_config={"job": job}, scaling_config=scaling, run_config=run_config,
                           torch_config=ray.train.torch.TorchConfig(backend="nccl" if job.scaling.use_gpu else "gloo"))
    start = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    for written in ("result.json", "models", "progress.jsonl"):  # by rank 0, maybe on another node
        storage.pull(Path(job.out_dir) / written)
    out = json.loads((Path(job.out_dir) / "result.json").read_text())
    checkpoint = result.checkpoint.path if result.checkpoint else None  # a store's key has no scheme: given one
    out["checkpoint"] = f"{remote.split('://')[0]}://{checkpoint}" if remote and checkpoint else checkpoint
    out["seconds"] = time.perf_counter() - start
    return out


def fits_at_once(jobs: int, scaling: ScalingSection) -> int:
    """How many of a stage's independent fits (one per domain) the cluster holds side by side: their worker groups
    must all fit in the resources free now, or the later ones would only wait for the earlier ones. The demo's
    per-domain fits have one 1-CPU worker each, so on 2 CPUs both run at once."""
    import ray

    free = ray.available_resources()
    room = free.get("CPU", 0.0) // (scaling.num_workers * scaling.cpus_per_worker)
    if scaling.use_gpu:
        room = min(room, free.get("GPU", 0.0) // (scaling.num_workers * scaling.gpus_per_worker))
    return int(max(1, min(jobs, room)))


def fit_all(jobs: dict[str, tuple[TrainJob, str]], *, at_once: int) -> dict[str, dict]:
    """`fit(job, run_name)` for every entry, `at_once` at a time; the results by key. Each fit's start-up (~10 s of
    controller and worker processes) overlaps the others'. Daemon threads, and the caller waits in short joins:
    Ctrl-C reaches it at once, and an interrupted driver exits without waiting for the fits (Ray's shutdown at exit
    ends them). Raises the first error in key order once every fit has ended: the others' checkpoints are on disk
    for the rerun."""
    if at_once <= 1:
        return {key: fit(job, name) for key, (job, name) in jobs.items()}
    gate = threading.Semaphore(at_once)
    results: dict[str, dict] = {}
    errors: dict[str, BaseException] = {}

    def one(key: str, job: TrainJob, name: str) -> None:
        with gate:
            try:
                results[key] = fit(job, name)
            except BaseException as err:  # handed to the caller's thread below
                errors[key] = err

    threads = [threading.Thread(target=one, args=(key, job, name), name=f"fit-{key}", daemon=True)
               for key, (job, name) in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)
    for key in jobs:
        if key in errors:
            raise errors[key]
    return results
