"""`ray job submit` on a real two-node Ray cluster on this machine: a head and a second node, separate node processes
with their own temp dirs and ports, the second carrying a custom resource. The job runs the pipeline from generate
to train_lam, shipped as a working directory holding an edit to `datasets/` that was never installed.

It proves: the job succeeded and its outputs and MLflow runs exist; Ray Data's encode actors and Ray Train's workers
ran on both nodes; every process that imported `lawm_datasets` (the driver and workers on both nodes) imported the
uploaded copy, not the installed checkout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from infra.local_cluster import LocalCluster, working_dir

ROOT = Path(__file__).resolve().parents[1]
STAGES = "generate,ingest,simulate,ingest_sim,encode,train_lam"


@pytest.fixture
def two_nodes():
    with LocalCluster(nodes=[{"num_cpus": 1}, {"num_cpus": 1, "resources": {"second_node": 1}}]) as cluster:
        resources = cluster.wait_for_nodes(2)
        assert sum("second_node" in r for r in resources) == 1, resources
        yield cluster


def _working_dir(dest: Path) -> Path:
    """The checkout plus an edit to `datasets/` that was never installed: each process importing it appends its pid
    and file to a log."""
    working_dir(dest, ROOT)
    with (dest / "datasets" / "simcommon.py").open("a") as f:
        f.write("\nif os.environ.get('LAWM_TEST_IMPORT_LOG'):\n"
                "    with open(os.environ['LAWM_TEST_IMPORT_LOG'], 'a') as _log:\n"
                "        _log.write(f'{os.getpid()} {__file__}\\n')\n")
    return dest


def test_ray_job_submit_runs_on_both_nodes_with_the_uploaded_code(two_nodes):
    from tests.test_pipeline import TINY

    cluster = two_nodes
    wd = _working_dir(cluster.base / "wd")
    root, imports = cluster.base / "root", cluster.base / "imports.log"
    ok, log = cluster.submit(
        [sys.executable, "jobs/full_pipeline.py", "--config", "jobs/configs/demo.yaml", f"run.root={root}",
         "--stages", STAGES, *TINY, "train_lam.scaling.num_workers=2", "train_lam.train.steps=10",
         "train_lam.train.ckpt_every=5"],
        working_dir=wd, runtime_env={"env_vars": {"LAWM_TEST_IMPORT_LOG": str(imports)}}, timeout=900)
    assert ok, log[-6000:]

    # outputs and MLflow runs, on storage both nodes see (here: one machine's disk)
    for stage in STAGES.split(","):
        assert json.loads((root / stage / "_stage.json").read_text())["stage"] == stage
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    finished = {r.data.tags.get("lawm.stage") for r in runs if r.info.status == "FINISHED"}
    assert set(STAGES.split(",")) <= finished

    # both nodes worked: encode's actor pool and the two training workers were spread over them
    nodes = {n["node_id"] for n in cluster.list_state("nodes")}
    actors = cluster.list_state("actors")
    by_class = {}
    for a in actors:
        by_class.setdefault(a["class_name"], set()).add(a["node_id"])
    encode = set().union(*(v for k, v in by_class.items() if "EncodeActor" in k))
    assert len(nodes) == 2 and encode == nodes, by_class
    assert by_class.get("RayTrainWorker") == nodes, by_class

    # every import of lawm_datasets came from the uploaded working directory, in processes on both nodes
    lines = [line.split(" ", 1) for line in imports.read_text().splitlines()]
    paths = {p for _, p in lines}
    assert len({pid for pid, _ in lines}) >= 3, lines  # the driver and workers
    assert all(p.startswith(str(cluster.base)) and "runtime_resources" in p for p in paths), paths
    assert {p.split("/")[3] for p in paths} == {"head", "n2"}, paths  # /tmp/lawm-rc-x/<node>/...
    assert not any(p.startswith(str(ROOT)) for p in paths)
