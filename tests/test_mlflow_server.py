"""MLflow: what lawm records for the UI (sqlite store), and a real tracking server that a pipeline logs through.

Fast: `jobs.tracking` marks the experiment as model training (MLflow 3's UI then opens on the runs table) and gives
every child run the tags and params that the compare view needs. Slow: `infra/mlflow/serve.sh` (what `make
mlflow-server` runs) is started on a free loopback port, the `generate,ingest` stages run against it through the
MLFLOW_TRACKING_URI it prints, the runs are read back over the REST API, and the server stops on SIGTERM.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import typing
import urllib.parse
from pathlib import Path

import mlflow
import pytest
from conftest import MlflowServer, rest

from jobs import tracking
from jobs.config import PipelineConfig
from lawm.config import load
from lawm.models.regularizers import RegConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
# the small overrides of tests/test_pipeline.py
SMALL = ["generate.synthetic.n_videos=4", "generate.synthetic.seconds=5", "generate.synthetic.size=[64,64]",
         "generate.real_samples=false", "ingest.size=32", "ingest.min_shards=1"]


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """One sqlite store for the fast tests (each new store spends ~10 s creating its schema on these cores)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def sqlite_root(sqlite_store):
    yield sqlite_store
    while mlflow.active_run() is not None:  # a failed assertion inside a run must not leak it into other tests
        mlflow.end_run("FAILED")


# ---------------------------------------------------------------------------------------------------------------
# The experiment opens on the runs table


def test_two_pipelines_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    """MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI; lawm must not take that for the user's choice."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.setup(tmp_path / "a", "x") == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.setup(tmp_path / "b", "x") == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'c.db'}")  # the user's own: it wins, and stays
    assert tracking.setup(tmp_path / "d", "x") == f"sqlite:///{tmp_path / 'c.db'}"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'c.db'}"


def test_a_new_store_is_a_copy_of_an_empty_one_and_a_damaged_copy_is_not_used(tmp_path, monkeypatch):
    """New sqlite stores start as copies of a template made once (MLflow's migrations take seconds); a template that
    does not read as a store is dropped, and so is a cache that cannot be written: MLflow makes the store itself."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = tracking._template_path()
    assert template.is_relative_to(tmp_path / "cache") and not template.exists()

    def works(root: Path, seeded: bool = True) -> None:
        uri = tracking.setup(root, "seeded")
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("seeded")
        run = client.create_run(exp.experiment_id)
        client.log_metric(run.info.run_id, "m", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
        if seeded:  # MLflow's Default experiment keeps its artifacts beside the store (MLflow's own: under the cwd)
            assert client.get_experiment("0").artifact_location == (root / "mlartifacts" / "0").absolute().as_uri()

    works(tmp_path / "a")
    assert template.stat().st_size > 0
    works(tmp_path / "b")  # from the template
    assert not list(template.parent.glob(".build-*"))
    template.write_bytes(b"not a database" * 100)
    works(tmp_path / "c", seeded=False)  # made by MLflow; the damaged template is gone
    assert not template.exists()
    works(tmp_path / "d")  # and made again
    assert template.exists()
    (tmp_path / "not-a-folder").write_text("x")  # a cache that cannot be made: passed over
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    works(tmp_path / "e", seeded=False)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["mlflow.db"]  # no temporary copy left


def test_experiment_is_marked_as_model_training(sqlite_root):
    client = mlflow.MlflowClient(tracking.tracking_uri(sqlite_root))
    tracking.setup(sqlite_root, "fresh")
    assert client.get_experiment_by_name("fresh").tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    # made before lawm set the tag, and one switched to GenAI in the UI: both are set back on the next pipeline
    old = client.create_experiment("old", artifact_location=(sqlite_root / "a").as_uri())
    genai = client.create_experiment("genai", artifact_location=(sqlite_root / "b").as_uri(),
                                     tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    for name, exp_id in (("old", old), ("genai", genai)):
        tracking.setup(sqlite_root, name)
        assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING


def test_the_tag_and_the_link_are_what_the_installed_ui_reads():
    """Key, value and URL query come from MLflow's UI bundle, not its Python API: checked against the installed one."""
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundle = "".join(p.read_text(errors="ignore") for p in js.glob("*.js"))
    assert f'key:"{tracking.EXPERIMENT_KIND_TAG}"' in bundle
    assert f'CUSTOM_MODEL_DEVELOPMENT="{tracking.MODEL_TRAINING}"' in bundle
    key, value = tracking.MODEL_TRAINING_VIEW.split("=")
    assert f'get("{key}")' in bundle and f'MACHINE_LEARNING="{value}"' in bundle
    assert tracking.ui_url("http://127.0.0.1:5000/", "7") == \
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert tracking.ui_url("http://h:1").endswith("/#/experiments?workflowType=machine_learning")


# ---------------------------------------------------------------------------------------------------------------
# Child runs carry what the compare view compares


def test_every_regulariser_has_a_capacity_knob_that_exists():
    kinds = typing.get_args(typing.get_type_hints(RegConfig)["kind"])
    assert set(tracking.CAPACITY_KNOB) == set(kinds)
    for kind, knob in tracking.CAPACITY_KNOB.items():
        assert knob is None or hasattr(RegConfig(), knob), f"{kind}: RegConfig has no field {knob}"


def test_stage_fields_follow_the_stage_and_what_it_reads():
    cfg = load(PipelineConfig, CONFIG, [])
    tags, params = tracking.stage_fields(cfg, stage="train_lam", upstream=["encode"])
    assert tags == {"lawm.pipeline": "demo"}
    assert params["lawm.regulariser"] == "noisy" and params["lawm.capacity_knob"] == "beta"
    assert float(params["lawm.capacity"]) == 1.0e-4  # demo.yaml's beta, not RegConfig's default
    assert params["lawm.encoder"] == "patch:patch4@32" and params["lawm.seed"] == "0"
    assert params["lawm.data"] == "generate" and Path(params["lawm.root"]).is_absolute()

    # the controller is described by the latent action model it was trained on
    _, ctrl = tracking.stage_fields(cfg, stage="train_controller", upstream=["encode", "train_lam"])
    assert {k: ctrl[k] for k in ("lawm.regulariser", "lawm.capacity", "lawm.encoder")} == \
           {k: params[k] for k in ("lawm.regulariser", "lawm.capacity", "lawm.encoder")}
    # stages before the encoder have neither
    _, ingest = tracking.stage_fields(cfg, stage="ingest", upstream=["generate"])
    assert not {"lawm.encoder", "lawm.regulariser", "lawm.capacity"} & set(ingest)

    for overrides, knob, value in ((["train_lam.model.reg.kind=sparse", "train_lam.model.reg.l1=0.03"], "l1", "0.03"),
                                   (["train_lam.model.reg.kind=discrete", "train_lam.model.reg.codebook_size=16"],
                                    "codebook_size", "16"),
                                   (["train_lam.model.reg.kind=none"], "none", "none")):
        other = load(PipelineConfig, CONFIG, [*overrides, "run.seed=3", "ingest.input=/data/clips"])
        _, p = tracking.stage_fields(other, stage="train_lam", upstream=["encode"])
        assert (p["lawm.capacity_knob"], p["lawm.capacity"], p["lawm.seed"]) == (knob, value, "3")
        assert p["lawm.data"] == "/data/clips"


def test_child_runs_in_a_sqlite_store_can_be_told_apart(sqlite_root):
    """Two pipelines that differ in regulariser and seed: their train_lam runs are found and split by these fields."""
    tracking.setup(sqlite_root, "compare")
    for name, overrides in (("a", ["train_lam.model.reg.kind=sparse", "run.seed=1"]),
                            ("b", ["train_lam.model.reg.kind=discrete", "run.seed=2"])):
        cfg = load(PipelineConfig, CONFIG, [*overrides, f"run.name={name}", f"run.root={sqlite_root}"])
        with tracking.start_parent(f"{name}-parent", {}):
            tracking.start_stage("train_lam", {"steps": 5}, {})
            logged = tracking.log_stage_fields(cfg, stage="train_lam", upstream=["encode"])
            tracking.end_run()
        assert logged["lawm.pipeline"] == name

    client = mlflow.MlflowClient(tracking.tracking_uri(sqlite_root))
    exp = client.get_experiment_by_name("compare").experiment_id
    children = client.search_runs([exp], "tags.`lawm.stage` = 'train_lam'")
    assert len(children) == 2
    sparse = client.search_runs([exp], "params.`lawm.regulariser` = 'sparse'")
    assert len(sparse) == 1
    run = sparse[0].data
    assert run.tags["lawm.parent_run_name"] == "a-parent" and run.tags["lawm.pipeline"] == "a"
    assert run.params["lawm.seed"] == "1" and run.params["lawm.capacity_knob"] == "l1"
    assert run.params["steps"] == "5"  # the stage's own config is still there beside the fields
    other = client.search_runs([exp], "params.`lawm.capacity_knob` = 'codebook_size'")
    assert [r.data.params["lawm.seed"] for r in other] == ["2"]


# ---------------------------------------------------------------------------------------------------------------
# A real tracking server, as `make mlflow-server` starts it


def test_make_target_runs_the_script_this_test_starts():
    # --no-print-directory: under `make test` this make is a sub-make, which would add "Leaving directory" lines
    out = subprocess.run(["make", "--no-print-directory", "-n", "mlflow-server"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].strip().startswith("infra/mlflow/serve.sh"), out.stdout


def kv(items: list[dict]) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items}


@pytest.mark.slow
def test_pipeline_logs_through_a_real_server(tmp_path, ray_local, monkeypatch):
    from jobs.full_pipeline import main

    server = MlflowServer(tmp_path)
    with server:
        port, data = server.port, server.data
        # the URI the script tells the user to export is the one that works
        exports = re.findall(r"^export MLFLOW_TRACKING_URI=(\S+)$", server.stdout.read_text(), re.M)
        assert exports == [f"http://127.0.0.1:{port}"], exports
        runs_link = f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning"
        assert runs_link in server.stderr.read_text()
        url = exports[0]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        root = tmp_path / "run"
        assert main(["--config", str(CONFIG), "--stages", "generate,ingest", f"run.root={root}", *SMALL]) == 0
        assert not (root / "mlflow.db").exists(), "the pipeline used a local store, not the server"

        # read everything back through the REST API, as another tool would
        q = urllib.parse.urlencode({"experiment_name": "lawm-demo"})
        exp = rest(f"{url}/api/2.0/mlflow/experiments/get-by-name?{q}")["experiment"]
        assert kv(exp["tags"])[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
        runs = rest(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                          "max_results": 100})["runs"]
        parents = [r for r in runs if "mlflow.parentRunId" not in kv(r["data"]["tags"])]
        children_runs = {kv(r["data"]["tags"])["lawm.stage"]: r for r in runs if r not in parents}
        assert len(parents) == 1 and sorted(children_runs) == ["generate", "ingest"]
        parent = parents[0]
        assert parent["info"]["status"] == "FINISHED"
        assert kv(parent["data"]["tags"])["lawm.stages"] == "generate,ingest"
        for stage, run in children_runs.items():
            tags = kv(run["data"]["tags"])
            assert run["info"]["status"] == "FINISHED", stage
            assert tags["mlflow.parentRunId"] == parent["info"]["run_id"]
            assert tags["lawm.parent_run_name"] == parent["info"]["run_name"]
            assert len(tags["lawm.config_hash"]) == 16 and tags["lawm.git_commit"]
            assert kv(run["data"]["metrics"])["stage_seconds"] > 0
        ingest = children_runs["ingest"]
        assert kv(ingest["data"]["params"])["size"] == "32"
        assert kv(ingest["data"]["metrics"])["clips"] > 0
        q = urllib.parse.urlencode({"run_id": ingest["info"]["run_id"]})
        files = {f["path"] for f in rest(f"{url}/api/2.0/mlflow/artifacts/list?{q}").get("files", [])}
        assert {"config.yaml", "_stage.json"} <= files
        # artifacts went through the server into its own folder (the ingest run's marker among them)
        stored = [p for p in (data / "artifacts").rglob("_stage.json") if ingest["info"]["run_id"] in str(p)]
        assert stored and json.loads(stored[0].read_text())["mlflow_run_id"] == ingest["info"]["run_id"]
    rc, alive = server.rc, server.alive
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), f"no clean stop on SIGTERM: {rc}"
    assert not alive, f"server processes left behind: {alive}"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(5)
        s.connect(("127.0.0.1", port))


def test_training_metrics_outlive_a_tracking_server_restart(tmp_path, monkeypatch):
    """Training's MLflow logger never waits on the server: values logged while it is down are kept and sent, in
    order, once it answers again (same port, same store); a server that never comes back leaves a count of what
    was not sent, after at most the flush time."""
    import time

    import mlflow

    from jobs.ray_train import _MlflowLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: the logger does its own retrying
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    first = MlflowServer(tmp_path)
    with first:
        client = mlflow.MlflowClient(first.url)
        run_id = client.create_run(client.create_experiment("restart")).info.run_id
        log = _MlflowLogger(first.url, run_id, prefix="nav/")
        log({"loss": 1.0}, 1)
        deadline = time.monotonic() + 30
        while not client.get_metric_history(run_id, "nav/loss"):
            assert time.monotonic() < deadline, "the first value never arrived"
            time.sleep(0.2)
    log({"loss": 0.5, "lr": 0.1}, 2)  # the server is gone: these only queue
    log({"loss": 0.25, "lr": 0.1}, 3)
    deadline = time.monotonic() + 30
    while not log.failed_tries:
        assert time.monotonic() < deadline, "the logger never tried the stopped server"
        time.sleep(0.2)
    assert log.last_error
    second = MlflowServer(tmp_path)
    second.port, second.url = first.port, first.url  # the same server back: same address, same store
    with second:
        assert log.close(flush_s=60) == 0
        history = mlflow.MlflowClient(second.url).get_metric_history(run_id, "nav/loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.25)]
        assert len(mlflow.MlflowClient(second.url).get_metric_history(run_id, "nav/lr")) == 2
    with pytest.raises(RuntimeError, match="closed"):
        log({"loss": 0.1}, 4)
    never = _MlflowLogger(first.url, run_id)  # nothing listens there any more
    never({"a": 1.0, "b": 2.0}, 1)
    assert never.close(flush_s=2) == 2 and never.last_error


def test_the_training_logger_drops_only_what_mlflow_refuses_and_waits_between_tries(tmp_path):
    """A value MLflow will never take (an invalid name) is dropped and counted, the values around it arrive; while
    the server is unreachable, new values do not make the logger try again before its wait is over."""
    import mlflow

    from jobs.ray_train import _MlflowLogger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("refused")).info.run_id
    log = _MlflowLogger(uri, run_id)
    log({"loss": 1.0}, 1)
    log({"../bad": 1.0, "loss": 0.5}, 2)
    log({"loss": 0.25}, 3)
    assert log.close(flush_s=30) == 1 and log.dropped == 1 and "bad" in log.last_error
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == \
        [(1, 1.0), (2, 0.5), (3, 0.25)]

    class Unreachable:
        tries = 0

        def log_batch(self, run_id, metrics, tags):
            Unreachable.tries += 1
            raise ConnectionError("nothing listens")

    down = _MlflowLogger(uri, run_id)
    down.client = Unreachable()
    for step in range(50):  # all within the first wait (1 s): none of them may start a try of its own
        down({"loss": 0.1}, step)
    assert down.close(flush_s=0.5) == 50
    assert Unreachable.tries <= 2, Unreachable.tries
