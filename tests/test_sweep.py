"""jobs/sweep.py: a grid of trials sharing the data stages, run concurrently as Ray tasks, one table across them."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from jobs.config import PipelineConfig
from jobs.stages import STAGES
from jobs.sweep import main, parse_axes, shared_stages, trial_name
from lawm.config import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
DATA = ["generate", "ingest", "simulate", "ingest_sim", "encode"]


def test_axes_and_which_stages_are_shared():
    axes = parse_axes(["train_lam.model.reg.beta=1e-4,1e-3", "run.seed=0,1"])
    assert axes == {"train_lam.model.reg.beta": ["1e-4", "1e-3"], "run.seed": ["0", "1"]}
    assert trial_name({"train_lam.model.reg.beta": "1e-4", "run.seed": "1"}) == "beta=1e-4_seed=1"
    for bad in (["beta=1"], ["train_lam.window="], ["a.b=1", "a.b=2"], ["a.b=1,,2"]):
        with pytest.raises(ConfigError):
            parse_axes(bad)
    cfg = PipelineConfig()
    # a regulariser axis: the data stages and the action-conditioned model (reads only encode) are shared
    reg = shared_stages(cfg, {"train_lam.model.reg.beta": [1]}, STAGES)
    assert reg == DATA + ["train_wm_action"]
    # a seed axis changes every training stage, not the data
    assert shared_stages(cfg, {"train_lam.model.reg.beta": [1], "run.seed": [0]}, STAGES) == DATA
    with pytest.raises(ConfigError, match="data stage"):
        shared_stages(cfg, {"ingest.size": [32, 64]}, STAGES)


def test_a_bad_trial_config_fails_before_any_work(tmp_path, capsys):
    assert main(["--config", str(CONFIG), "--name", "x", "--axis", "train_lam.model.reg.beta=1e-4,oops",
                 f"run.root={tmp_path / 's'}"]) == 2
    assert "beta" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_small_sweep_shares_data_and_tabulates_every_trial(tmp_path, monkeypatch):
    from tests.test_pipeline import TINY

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "sweep"
    args = ["--config", str(CONFIG), "--name", "beta", "--axis", "train_lam.model.reg.beta=1e-4,1e-2",
            "--stages", ",".join(DATA + ["train_lam"]), f"run.root={root}", *TINY, "train_lam.train.steps=10",
            "run.num_cpus=2", "simulate.nav.enabled=false", "simulate.manip.enabled=false"]  # train_lam reads wild
    assert main(args) == 0
    trials = sorted(p.name for p in (root / "trials").iterdir())
    assert trials == ["beta=1e-2", "beta=1e-4"]
    for t in trials:
        for stage in DATA:  # the data stages ran once and every trial reads them from shared/
            assert (root / "trials" / t / stage).is_symlink()
            assert os.path.realpath(root / "trials" / t / stage) == str((root / "shared" / stage).resolve())
        assert (root / "trials" / t / "train_lam" / "_stage.json").exists()
    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert [r["trial"] for r in rows] == ["beta=1e-4", "beta=1e-2"] and all(r["status"] == "ok" for r in rows)
    assert all(float(r["train_lam:val_one_step_error"]) > 0 for r in rows)
    page = (root / "sweep.md").read_text()
    assert "| beta=1e-2 |" in page and "Mean ± sd over seeds" not in page  # no seed axis: no seed table
    assert "<td>beta=1e-2</td>" in (root / "sweep.html").read_text()
    # one store: the shared run and both trials' parent runs, the trials tagged with the sweep
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`lawm.sweep` = 'beta'")
    assert sorted(r.info.run_name.rsplit("-", 2)[0] for r in runs) == ["beta-beta=1e-2", "beta-beta=1e-4"]
    # two trials at once on 2 CPUs: each driver evaluates on one torch thread, not on every core
    assert [r.data.tags["lawm.torch_threads"] for r in runs] == ["1", "1"]
    table = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               "tags.`lawm.sweep_table` = 'beta'")
    assert [f.path for f in client.list_artifacts(table[0].info.run_id)] == ["sweep.csv", "sweep.html", "sweep.md"]
    assert table[0].data.tags["lawm.stage"] == "report" and table[0].data.metrics["sweep/trials_ok"] == 2
    # the figures are the trials' MLflow metrics (the report stage's source), not copies kept elsewhere
    from jobs.runner import marker

    for r in rows:
        run = client.get_run(marker(root / "trials" / r["trial"], "train_lam")["mlflow_run_id"])
        assert float(r["train_lam:val_one_step_error"]) == run.data.metrics["val_one_step_error"]

    # a rerun redoes nothing (every stage of the shared run and of each trial is skipped), and a trial whose marker
    # was cut short is redone instead of read

    before = {t: marker(root / "trials" / t, "train_lam")["mlflow_run_id"] for t in trials}
    (root / "trials" / "beta=1e-2" / "train_lam" / "_stage.json").write_text('{"hash": ')
    assert main(args) == 0
    after = {t: marker(root / "trials" / t, "train_lam")["mlflow_run_id"] for t in trials}
    assert after["beta=1e-4"] == before["beta=1e-4"] and after["beta=1e-2"] != before["beta=1e-2"]
    assert [r["status"] for r in csv.DictReader((root / "sweep.csv").open())] == ["ok", "ok"]


def test_a_run_missing_from_the_store_costs_its_cells_not_the_table(tmp_path):
    import mlflow

    from jobs.report import trial_figures
    from lawm.files import atomic_write_json

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "val_one_step_error", 0.25)
    atomic_write_json(tmp_path / "t" / "train_lam" / "_stage.json", {"stage": "train_lam",
                                                                     "mlflow_run_id": run.info.run_id})
    atomic_write_json(tmp_path / "t" / "eval_leakage" / "_stage.json", {"stage": "eval_leakage",
                                                                        "mlflow_run_id": "0" * 32})
    row = trial_figures(client, tmp_path / "t")
    assert row["train_lam:val_one_step_error"] == 0.25 and row["train_lam:val_copy_error"] is None
    assert row["eval_leakage:leakage/ratio"] is None and row["unreadable"] == "eval_leakage"
    assert row["eval_probe:probe/r2"] is None  # never ran: no marker, not unreadable


def test_seed_means_leave_out_failed_trials_and_missing_numbers():
    from jobs.report import seed_means

    fig = "train_lam:val_one_step_error"
    rows = [{"reg": "a", "run.seed": 0, "status": "ok", fig: 1.0},
            {"reg": "a", "run.seed": 1, "status": "ok", fig: 3.0},
            {"reg": "a", "run.seed": 2, "status": "exit 1", fig: 100.0},  # a failed trial adds no number
            {"reg": "b", "run.seed": 0, "status": "ok", fig: None},
            {"reg": "b", "run.seed": 1, "status": "ok", fig: float("nan")}]
    a, b = seed_means(rows, ["reg", "run.seed"], [fig])
    assert (a["reg"], a["seeds ok"], a[fig]) == ("a", "2/3", (2.0, 2 ** 0.5, 2))
    assert (b["reg"], b["seeds ok"], b[fig]) == ("b", "2/2", (None, None, 0))


def test_trial_drivers_share_the_node_threads():
    from jobs.sweep import trial_env

    assert trial_env({"A": "x"}, node_cpus=2.0, max_concurrent=2) == {"A": "x", "OMP_NUM_THREADS": "1"}
    assert trial_env({}, node_cpus=16.0, max_concurrent=3)["OMP_NUM_THREADS"] == "5"
    assert trial_env({}, node_cpus=2.0, max_concurrent=4)["OMP_NUM_THREADS"] == "1"  # never 0
    assert trial_env({"OMP_NUM_THREADS": "4"}, node_cpus=2.0, max_concurrent=2)["OMP_NUM_THREADS"] == "4"  # theirs
