"""jobs/full_pipeline.py: stage skipping, --stages/--force, config errors, and what lands in MLflow."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from jobs.full_pipeline import main
from jobs.tracking import tracking_uri

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
SMALL = ["generate.synthetic.n_videos=4", "generate.synthetic.seconds=5", "generate.synthetic.size=[64,64]",
         "generate.real_samples=false", "ingest.size=32", "ingest.min_shards=1"]


def _runs(root: Path):
    client = mlflow.MlflowClient(tracking_uri(root))
    exp = client.get_experiment_by_name("lawm-demo")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_pipeline_runs_skips_and_forces(tmp_path, ray_local, capsys):
    root = tmp_path / "run"
    args = ["--config", str(CONFIG), "--stages", "generate,ingest", f"run.root={root}", *SMALL]
    assert main(args) == 0
    client, parents, children = _runs(root)
    assert len(parents) == 1 and sorted(c.data.tags["lawm.stage"] for c in children) == ["generate", "ingest"]
    ingest_run = next(c for c in children if c.data.tags["lawm.stage"] == "ingest")
    assert ingest_run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert len(ingest_run.data.tags["lawm.config_hash"]) == 16 and ingest_run.data.tags["lawm.git_commit"]
    assert ingest_run.data.params["size"] == "32" and ingest_run.data.metrics["clips"] > 0
    artifacts = {a.path for a in client.list_artifacts(ingest_run.info.run_id)}
    assert {"config.yaml", "summary.json", "_stage.json"} <= artifacts
    marker = json.loads((root / "ingest" / "_stage.json").read_text())
    assert marker["mlflow_run_id"] == ingest_run.info.run_id and Path(marker["outputs"]["shards"]).is_dir()

    # same config and inputs: everything is skipped, recorded as tags on a new parent, no new child run
    assert main(args) == 0
    assert "skipped" in capsys.readouterr().out
    _, parents, children2 = _runs(root)
    assert len(parents) == 2 and len(children2) == 2
    assert parents[1].data.tags["lawm.skipped.ingest"] == ingest_run.info.run_id

    # --force reruns only the selected stage; a changed setting reruns the stage it belongs to
    assert main([*args[:2], "--stages", "ingest", "--force", *args[4:]]) == 0
    assert main([*args, "ingest.stride=4"]) == 0
    _, parents, children3 = _runs(root)
    stages = [c.data.tags["lawm.stage"] for c in children3]
    assert stages.count("ingest") == 3 and stages.count("generate") == 1
    assert parents[-1].data.tags.get("lawm.skipped.generate")


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    root = tmp_path / "never"
    assert main(["--config", str(CONFIG), f"run.root={root}", "ingest.fsp=3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "ingest.fsp: unknown key" in err
    assert main(["--config", str(CONFIG), f"run.root={root}", "ingest.size=31"]) == 2
    assert "ingest.size: must be an even number" in capsys.readouterr().err
    assert main(["--config", str(CONFIG), f"run.root={root}", "--stages", "ingest,train_everything"]) == 2
    assert "unknown ['train_everything']" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert not root.exists()


@pytest.mark.parametrize("override,message", [("run.seed=abc", "run.seed: expected an integer"),
                                              ("generate.synthetic.size=[64]", "generate.synthetic.size")])
def test_typed_errors_name_the_key(override, message, capsys):
    assert main(["--config", str(CONFIG), override]) == 2
    assert message in capsys.readouterr().err
