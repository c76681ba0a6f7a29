"""lawm.storage against a real S3 API (moto_server on loopback, through pyarrow's S3 filesystem): the mirror's round
trip, what a rewrite, a deletion and a failure mid-transfer leave behind, and the no-op outside every mirror."""
from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest
from conftest import make_bucket

from lawm import storage


def _objects(bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    # pyarrow marks the folders it makes with empty "dir/" objects: not files
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []) if not o["Key"].endswith("/")]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_uris_map_to_one_mirror_path_and_back(s3_server, tmp_path):
    root = storage.working_root("s3://bkt/runs/x")
    assert root == storage.mirror_base() / "s3" / "bkt" / "runs" / "x"
    assert storage.remote_of(root / "train_lam" / "models" / "wm.pt") == "s3://bkt/runs/x/train_lam/models/wm.pt"
    assert storage.remote_of(tmp_path / "a") is None
    assert storage.working_root("runs/demo") == (Path.cwd() / "runs" / "demo")
    for bad in ("http://bkt/x", "file:///tmp/x", "s3://", "s3://bkt/../x", "s3://bkt//x"):
        with pytest.raises(ValueError):
            storage.working_root(bad)


def test_push_pull_round_trip_and_what_differs(s3_server):
    make_bucket("trip")
    root = storage.working_root("s3://trip/run")
    (root / "stage" / "sub").mkdir(parents=True)
    (root / "stage" / "a.bin").write_bytes(b"alpha")
    (root / "stage" / "sub" / "b.bin").write_bytes(b"beta" * 1000)
    (root / "stage" / ".c.bin.123.tmp").write_bytes(b"half")  # a writer's temporary file: never uploaded
    storage.push(root / "stage")
    assert _objects("trip") == {"run/stage/a.bin": b"alpha", "run/stage/sub/b.bin": b"beta" * 1000}

    # a fresh node: its mirror is empty; pulling gives the same bytes
    for p in sorted((root / "stage").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    storage.pull(root / "stage")
    assert (root / "stage" / "a.bin").read_bytes() == b"alpha"
    assert (root / "stage" / "sub" / "b.bin").read_bytes() == b"beta" * 1000
    inode = (root / "stage" / "a.bin").stat().st_ino
    storage.pull(root / "stage")  # in sync: nothing is downloaded again
    assert (root / "stage" / "a.bin").stat().st_ino == inode

    # rewritten locally with the same size: pushed again (the mtime differs); a pull elsewhere gets the new bytes
    (root / "stage" / "a.bin").write_bytes(b"gamma")
    storage.push(root / "stage")
    assert _objects("trip")["run/stage/a.bin"] == b"gamma"

    # the store is the record: a local file it does not hold goes on pull; the local temporary file stays
    (root / "stage" / "stray.bin").write_bytes(b"x")
    (root / "stage" / ".c.bin.123.tmp").write_bytes(b"half")  # as if a writer were at work
    storage.pull(root / "stage")
    assert not (root / "stage" / "stray.bin").exists() and (root / "stage" / ".c.bin.123.tmp").exists()

    # a single file, and an object missing from the store, pulled
    storage.remove(root / "stage" / "sub")
    assert not (root / "stage" / "sub").exists() and set(_objects("trip")) == {"run/stage/a.bin"}
    (root / "stage" / "a.bin").unlink()
    storage.pull(root / "stage" / "a.bin")
    assert (root / "stage" / "a.bin").read_bytes() == b"gamma"


class _FailsAfterOneRead:
    """A file or stream whose second read raises OSError(`message`): a transfer cut off mid-file."""

    def __init__(self, stream, message: str):
        self.stream, self.message, self.reads = stream, message, 0

    def read(self, n: int) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise OSError(self.message)
        return self.stream.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


def test_a_push_that_fails_mid_file_leaves_the_old_object(s3_server, monkeypatch):
    make_bucket("halfpush")
    root = storage.working_root("s3://halfpush/run")
    (root / "s").mkdir(parents=True)
    (root / "s" / "model.pt").write_bytes(b"old" * 10)
    storage.push(root / "s")
    (root / "s" / "model.pt").write_bytes(os.urandom(3 * 2**20))
    real_open = open
    monkeypatch.setattr(storage, "_CHUNK", 2**20)
    monkeypatch.setattr(storage, "open", lambda *a, **k: _FailsAfterOneRead(real_open(*a, **k), "disk read error"),
                        raising=False)
    with pytest.raises(OSError, match="disk read error"):
        storage.push(root / "s" / "model.pt")
    monkeypatch.undo()
    objects = _objects("halfpush")
    assert objects["run/s/model.pt"] == b"old" * 10  # the key never showed the part
    # what the failed upload left is a temporary key, which no pull brings down
    (root / "s" / "model.pt").unlink()
    storage.pull(root / "s")
    assert sorted(p.name for p in (root / "s").iterdir()) == ["model.pt"]
    assert (root / "s" / "model.pt").read_bytes() == b"old" * 10


def test_a_pull_that_fails_mid_file_leaves_no_part(s3_server, monkeypatch):
    make_bucket("halfpull")
    root = storage.working_root("s3://halfpull/run")
    (root / "s").mkdir(parents=True)
    (root / "s" / "feat.tar").write_bytes(os.urandom(3 * 2**20))
    storage.push(root / "s")
    (root / "s" / "feat.tar").unlink()
    fs, _ = storage._filesystem("s3://halfpull")

    class Flaky:
        def __getattr__(self, name):
            return getattr(fs, name)

        def open_input_stream(self, key):
            return _FailsAfterOneRead(fs.open_input_stream(key), "connection reset")

    monkeypatch.setattr(storage, "_CHUNK", 2**20)
    monkeypatch.setattr(storage, "_filesystem", lambda uri: (Flaky(), storage.split_uri(uri)[1]))
    with pytest.raises(OSError, match="connection reset"):
        storage.pull(root / "s")
    assert list((root / "s").iterdir()) == []  # neither the file nor its temporary part


def test_check_root_names_a_missing_bucket_and_paths_outside_a_mirror_are_local(s3_server, tmp_path):
    make_bucket("there")
    storage.check_root("s3://there/run")
    assert _objects("there") == {}  # the probe object is gone
    with pytest.raises(OSError):
        storage.check_root("s3://no-such-bucket-lawm/run")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"1")
    storage.push(tmp_path / "d")  # no-ops outside every mirror
    storage.pull(tmp_path / "d")
    assert (tmp_path / "d" / "f").read_bytes() == b"1"
    storage.remove(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_tasks_pull_what_they_read_and_push_what_they_write(s3_server):
    """What runs in Ray tasks on other nodes, called here as a task calls it, with the files only in the store: a
    simulator episode is pushed; ingest's task pulls its source and pushes its staged clips and then its marker;
    encode's read task pulls the shard it reads."""
    import json
    import shutil

    import numpy as np

    from lawm_datasets.simcommon import write_episode
    from pipelines.clipper import process_source
    from pipelines.encode import _read_chunk, _scan
    from pipelines.ingest import IngestConfig
    from pipelines.sources import Source

    make_bucket("tasks")
    root = storage.working_root("s3://tasks/r")
    video = root / "simulate" / "nav" / "ep0.mp4"
    video.parent.mkdir(parents=True)
    frames = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(20)]
    write_episode(video, frames, {"action": np.zeros((20, 2))}, fps=4.0)
    assert {"r/simulate/nav/ep0.mp4", "r/simulate/nav/ep0.labels.npz"} <= set(_objects("tasks"))

    shutil.rmtree(storage.mirror_base())  # another node: nothing local; the store keeps the objects
    assert not video.exists()
    work = root / "ingest" / "_work"
    row = process_source(Source(path=str(video)), IngestConfig(size=32, clip_frames=8, stride=8), work)
    assert row["status"] == "ok", row
    objects = _objects("tasks")
    staged = f"r/ingest/_work/staging/{row['sid']}.tar"
    assert staged in objects and json.loads(objects[f"r/ingest/_work/done/{row['sid']}.json"])["clips"]
    assert video.with_name("ep0.labels.npz").exists()  # the task pulled the sidecar with the video

    shard = work / "staging" / f"{row['sid']}.tar"
    members = _scan(shard)
    key = sorted(members)[0]
    expected = shard.read_bytes()[members[key]["mp4"][1]:][:members[key]["mp4"][2]]
    shard.unlink()
    out = _read_chunk({"items": json.dumps([(key, members[key])]), "split": "train", "shard": 0}, decode=False)
    assert out[0]["mp4"] == expected and len(expected) > 0 and shard.exists()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """One MLflow tracking server (what `make mlflow-server` runs) for this module's pipelines: an object-store root
    needs one, and each start costs ~10 s here."""
    from conftest import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def test_a_stage_that_fails_in_a_bucket_resumes_from_it_on_another_node(s3_server, tracking_server, monkeypatch):
    """The runner pushes what a failed resumable stage wrote (no marker); a node with an empty mirror pulls that, and
    the upstream outputs, and finishes the stage; the marker reaches the store and `_pending.json` leaves it."""
    import shutil

    from jobs.config import PipelineConfig, RunConfig
    from jobs.runner import Stage, run_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    uri = make_bucket("resume") + "/run"
    seen = []

    def upstream(section, ctx) -> dict:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        (ctx.out_dir / "data.txt").write_text("from upstream")
        return {"data": str(ctx.out_dir / "data.txt")}

    def two_parts(section, ctx) -> dict:
        data = Path(ctx.upstream("generate", "data")).read_text()  # pulled by the runner
        first = ctx.out_dir / "part-0.txt"
        seen.append(first.exists())
        if not first.exists():
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            first.write_text(data)
            raise RuntimeError("the node died after the first part")
        (ctx.out_dir / "part-1.txt").write_text(data)
        return {}

    stages = [Stage("generate", upstream), Stage("train_lam", two_parts, inputs=lambda c: ["generate"], resumable=True)]
    cfg = PipelineConfig(run=RunConfig(root=uri, name="r", experiment="resume"))
    with pytest.raises(RuntimeError, match="after the first part"):
        run_pipeline(cfg, stages, ["generate", "train_lam"], echo=lambda m: None)
    objects = _objects("resume")
    assert objects["run/train_lam/part-0.txt"] == b"from upstream" and "run/train_lam/_pending.json" in objects
    assert "run/train_lam/_stage.json" not in objects and "run/generate/_stage.json" in objects

    shutil.rmtree(storage.mirror_base())
    results = run_pipeline(cfg, stages, ["generate", "train_lam"], echo=lambda m: None)
    assert [r.status for r in results] == ["skipped", "ran"] and seen == [False, True]
    objects = _objects("resume")
    assert objects["run/train_lam/part-1.txt"] == b"from upstream" and "run/train_lam/_stage.json" in objects
    assert "run/train_lam/_pending.json" not in objects


# ---------------------------------------------------------------------------------------------------------------
# A pipeline whose run.root is a bucket


REPO = Path(__file__).resolve().parents[1]
S3_STAGES = "generate,ingest,simulate,ingest_sim,encode,train_lam,eval_probe"  # simulators off: see the task test
S3_RUN = ["generate.synthetic.n_videos=6", "generate.synthetic.val_fraction=0.3", "generate.synthetic.seconds=5", "generate.synthetic.size=[64,64]",
          "generate.real_samples=false", "ingest.size=32", "ingest.min_shards=1", "simulate.manip.enabled=false",
          "simulate.nav.enabled=false", "encode.encoder.patch_size=8", "train_lam.scaling.num_workers=1", "train_lam.train.steps=6",
          "train_lam.train.log_every=3", "train_lam.train.ckpt_every=3", "train_lam.train.batch_size=4",
          "train_lam.train.loader_workers=0"]


def _pipeline(capsys, *args: str) -> str:
    """jobs/full_pipeline.py's main on the session's Ray (its workers have the store's environment: conftest.S3_ENV);
    what it printed, after asserting it returned 0."""
    from jobs.full_pipeline import main

    rc = main(["--config", str(REPO / "jobs" / "configs" / "demo.yaml"), *args])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-5000:]
    return out.out + out.err


@pytest.mark.slow
def test_a_pipeline_in_a_bucket_runs_skips_and_resumes_from_the_store_alone(s3_server, tracking_server, ray_local,
                                                                            capsys, monkeypatch):
    """Every stage's outputs land in the bucket; a node with an empty mirror finds every unchanged stage done (pulling
    its marker only) and runs a changed one from the upstream outputs it pulls; MLflow (a tracking server) records
    the bucket as the runs' root."""
    import json
    import shutil

    import mlflow

    uri = make_bucket("lawm-run") + "/runs/a"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    _pipeline(capsys, "--stages", S3_STAGES, f"run.root={uri}", *S3_RUN)
    objects = {k[len("runs/a/"):] for k in _objects("lawm-run")}
    stages = S3_STAGES.split(",")
    assert {f"{s}/_stage.json" for s in stages} <= objects
    assert not any(k.endswith("_pending.json") or k.endswith(".tmp") for k in objects), objects
    marker = {s: json.loads(_objects("lawm-run")[f"runs/a/{s}/_stage.json"]) for s in ("ingest", "train_lam")}
    # what the markers name is in the store: shards, features, the model, Ray Train's checkpoints
    assert any(k.startswith("ingest/shards/") and k.endswith(".tar") for k in objects)
    assert any(k.startswith("encode/wild/features/") and k.endswith(".tar") for k in objects)
    assert "train_lam/models/lam.pt" in objects and "train_lam/progress.jsonl" in objects
    assert any("/checkpoint_" in k and k.endswith("state.pt") for k in objects), sorted(objects)
    mirror = storage.working_root(uri)
    lam = marker["train_lam"]["outputs"]["model"]
    assert Path(lam).is_relative_to(mirror)  # a path that means the same object on every node

    # a fresh node (an empty mirror) with eval_probe changed: every other stage is found done in the store, and
    # eval_probe runs on the features and model it pulls
    first_probe = json.loads(_objects("lawm-run")["runs/a/eval_probe/_stage.json"])
    shutil.rmtree(storage.mirror_base())
    out = _pipeline(capsys, "--stages", S3_STAGES, f"run.root={uri}", *S3_RUN, "eval_probe.max_clips=100")
    assert all(f"[{s}] skipped" in out for s in stages if s != "eval_probe") and "[eval_probe] done" in out, out
    probe = json.loads(_objects("lawm-run")["runs/a/eval_probe/_stage.json"])
    assert probe["config_hash"] != first_probe["config_hash"]
    assert probe == json.loads((mirror / "eval_probe" / "_stage.json").read_text())
    assert Path(lam).exists() and any((mirror / "encode" / "wild" / "features").glob("*.tar"))
    assert not (mirror / "ingest" / "shards").exists()  # a skipped stage's outputs stay in the store

    client = mlflow.MlflowClient(tracking_server.url)
    runs = client.search_runs([client.get_experiment_by_name("lawm-demo").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and {r.data.tags["lawm.root"] for r in parents} == {uri}
    lam_run = client.get_run(marker["train_lam"]["mlflow_run_id"])
    assert lam_run.data.params["lawm.root"] == uri and lam_run.info.status == "FINISHED"
    assert marker["train_lam"]["outputs"]["checkpoint"].startswith(f"{uri}/train_lam/ray/")
    assert [f.path for f in client.list_artifacts(lam_run.info.run_id, "models")] == ["models/lam.pt"]
    # the Dataset column: the rerun eval_probe (which does not read ingest's folder) names the clip table in the store
    inputs = client.get_run(probe["mlflow_run_id"]).inputs.dataset_inputs
    assert [(d.dataset.name, f"{uri}/ingest/clips.parquet" in d.dataset.source) for d in inputs] == \
        [("clips/wild", True)]
