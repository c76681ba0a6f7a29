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

    # forcing an upstream stage makes its dependants stale: the next plain run redoes ingest, not skips it
    assert main([*args[:2], "--stages", "generate", "--force", *args[4:], "ingest.stride=4"]) == 0
    assert main([*args, "ingest.stride=4"]) == 0
    _, _, children4 = _runs(root)
    stages = [c.data.tags["lawm.stage"] for c in children4]
    assert stages.count("generate") == 2 and stages.count("ingest") == 4

    # a marker cut short by a power loss means "not done": the stage is redone, the run does not crash
    (root / "ingest" / "_stage.json").write_text('{"hash": "12')
    assert main([*args, "ingest.stride=4"]) == 0
    _, _, children5 = _runs(root)
    assert [c.data.tags["lawm.stage"] for c in children5].count("ingest") == 5


def test_a_stage_whose_outputs_changed_meaning_reruns_with_what_follows_it(tmp_path):
    """Raising a stage's `version` makes its old outputs untrusted: it reruns, and so does its dependant; an
    unversioned stage before it stays skipped."""
    from jobs.config import PipelineConfig, RunConfig
    from jobs.runner import Stage, run_pipeline

    calls = []

    def fake(name):
        def run(section, ctx):
            calls.append(name)
            return {"made_by": name}
        return run

    def stages(version):
        return [Stage("generate", fake("generate")),
                Stage("ingest", fake("ingest"), inputs=lambda c: ["generate"], version=version),
                Stage("simulate", fake("simulate"), inputs=lambda c: ["ingest"])]

    cfg = PipelineConfig(run=RunConfig(root=str(tmp_path / "run"), name="t", experiment="versions"))
    names = ["generate", "ingest", "simulate"]
    assert [r.status for r in run_pipeline(cfg, stages(0), names, echo=lambda m: None)] == ["ran"] * 3
    assert [r.status for r in run_pipeline(cfg, stages(0), names, echo=lambda m: None)] == ["skipped"] * 3
    again = run_pipeline(cfg, stages(1), names, echo=lambda m: None)
    assert [r.status for r in again] == ["skipped", "ran", "ran"]
    assert [r.status for r in run_pipeline(cfg, stages(1), names, echo=lambda m: None)] == ["skipped"] * 3
    assert calls == names + ["ingest", "simulate"]


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


TINY = [*SMALL, "generate.synthetic.n_videos=6", "generate.synthetic.val_fraction=0.3",  # two held-out videos
        "simulate.nav.episodes=4", "simulate.nav.val_fraction=0.5", "simulate.manip.episodes=4",
        "simulate.manip.val_fraction=0.5",
        "simulate.nav.steps=24", "simulate.manip.steps=24", "simulate.nav.width=64", "simulate.nav.height=64",
        "simulate.manip.width=64", "simulate.manip.height=64", "ingest_sim.size=32", "ingest_sim.min_shards=1",
        "encode.encoder.patch_size=8", "train_lam.scaling.num_workers=1"]
TINY += [f"{stage}.train.{k}={v}" for stage in ("train_lam", "train_decoder", "train_controller", "train_wm_action")
         for k, v in (("steps", 6), ("log_every", 3), ("ckpt_every", 6), ("batch_size", 4), ("loader_workers", 0))]
TINY += ["train_lam.train.steps=40", "train_lam.train.log_every=5", "train_lam.train.ckpt_every=40",  # enough to learn
         "eval_transfer.max_clips=4", "eval_transfer.max_counterfactuals=2",
         "eval_planning.manip.episodes=1", "eval_planning.nav.episodes=1", "eval_planning.closed_loop.episodes=1",
         "eval_planning.manip.cem={samples: 8, elites: 2, iterations: 2, horizon: 3}",
         "eval_planning.nav.cem={samples: 8, elites: 2, iterations: 1, horizon: 8, hold: true}",
         "eval_planning.closed_loop.nav_max_steps=2", "eval_planning.closed_loop.manip_max_steps=2",
         "eval_planning.closed_loop.nav_cem={samples: 4, elites: 2, iterations: 1, horizon: 8, hold: true}",
         "eval_planning.closed_loop.manip_cem={samples: 4, elites: 2, iterations: 1, horizon: 3}",
         "eval_planning.frame_size=32", "eval_planning.nav_env.width=64", "eval_planning.nav_env.height=64",
         "eval_planning.manip_env.width=64", "eval_planning.manip_env.height=64"]


def _finite_model(path: str) -> bool:
    import torch

    from lawm.checkpoint import load_checkpoint

    return all(torch.isfinite(t).all() for t in load_checkpoint(path)["state_dict"].values() if t.is_floating_point())


def test_every_stage_end_to_end_through_declared_outputs(tmp_path, ray_local):
    import math

    root = tmp_path / "all"
    assert main(["--config", str(CONFIG), f"run.root={root}", *TINY]) == 0
    from jobs.runner import marker
    from jobs.stages import STAGE_NAMES

    records = {name: marker(root, name) for name in STAGE_NAMES}
    assert all(records.values()), [n for n, r in records.items() if r is None]
    wm = records["train_lam"]["outputs"]
    ctrl = records["train_controller"]["outputs"]
    # the controller was trained on the world model that train_lam declared, and its inputs hash says so
    assert ctrl["lam"] == wm["model"] and Path(ctrl["nav_controller_mlp"]).exists()
    # each action model's checkpoint records the action scale it was trained with (planning drives it with that)
    from lawm.checkpoint import load_model_with_extra
    from lawm.training.objectives import trained_action_scale

    for path, scale in ((ctrl["manip_controller_cross_attention"], 25.0),
                        (records["train_wm_action"]["outputs"]["nav_action_wm"], 1.0)):
        assert trained_action_scale(load_model_with_extra(path)[1], path) == scale
    assert {"nav_action_wm", "manip_action_wm"} <= set(records["train_wm_action"]["outputs"])
    assert Path(records["train_decoder"]["outputs"]["predictions"]).stat().st_size > 0
    assert (root / "simulate" / "trajectories.png").stat().st_size > 0

    # training learned: the world model's prediction loss fell, and every exported model is finite
    logs = [json.loads(line) for line in (root / "train_lam" / "progress.jsonl").read_text().splitlines()]
    losses = [e["pred_loss"] for e in logs if e.get("event") == "log"]
    assert len(losses) >= 4 and losses[-1] < 0.9 * losses[0], losses
    models = [v for r in records.values() for k, v in r["outputs"].items()
              if isinstance(v, str) and v.endswith(".pt")]
    assert len(models) >= 7 and all(_finite_model(m) for m in models), models

    # MLflow: the trained models and pictures are artifacts of their runs, training runs carry system metrics, and
    # every run that read clips names its clip tables as input datasets (the UI's Dataset column)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    lam_run = client.get_run(records["train_lam"]["mlflow_run_id"])
    assert [f.path for f in client.list_artifacts(lam_run.info.run_id, "models")] == ["models/lam.pt"]
    assert "plots/training_curves.png" in {f.path for f in client.list_artifacts(lam_run.info.run_id, "plots")}
    assert any(k.startswith("system/cpu") for k in lam_run.data.metrics), sorted(lam_run.data.metrics)
    names = sorted(d.dataset.name for d in lam_run.inputs.dataset_inputs)
    assert names == ["clips/manip", "clips/nav", "clips/wild"], names
    assert not client.get_run(records["ingest"]["mlflow_run_id"]).inputs.dataset_inputs
    wm_action = records["train_wm_action"]["mlflow_run_id"]
    assert [f.path for d in ("nav", "manip") for f in client.list_artifacts(wm_action, f"{d}/models")] == \
        ["nav/models/action_wm.pt", "manip/models/action_wm.pt"]
    # the per-domain fits of a stage ran side by side (2 CPUs, one 1-CPU worker each): the stage took less than its
    # fits one after the other; each logged its own curves into the stage's run under its domain (before, both
    # wrote `lr`, `loss`, ... at the same steps of the same run)
    for stage in ("train_controller", "train_wm_action"):
        run_id, fits = records[stage]["mlflow_run_id"], records[stage]["outputs"]["metrics"]
        assert records[stage]["seconds"] < 0.8 * (fits["nav_fit_seconds"] + fits["manip_fit_seconds"]), fits
        for d in ("nav", "manip"):
            assert [m.step for m in client.get_metric_history(run_id, f"{d}/lr")] == [3, 6], (stage, d)
        assert "lr" not in client.get_run(run_id).data.metrics

    # evaluation numbers exist and are finite, under the keys the issue names
    metrics = {k: v for name in STAGE_NAMES if name.startswith("eval_")
               for k, v in records[name]["outputs"]["metrics"].items()}
    for key in ("leakage/error_nocut", "leakage/error_cut", "leakage/ratio", "leakage/vs_copy", "transfer/error",
                "transfer/cycle_increase", "probe/r2", "planning/manip/delta_xyz", "planning/nav/ate",
                "planning/nav/rpe", "planning/nav/closed_loop_success"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    report = Path(records["report"]["outputs"]["report_html"])
    assert report.stat().st_size > 0 and "leakage" in report.read_text()

    # a stage without its inputs refuses to run instead of reading something else
    empty = tmp_path / "empty"
    assert main(["--config", str(CONFIG), f"run.root={empty}", "--stages", "train_lam"]) == 2
    assert not empty.exists()


def test_print_config_shows_every_default_and_loads_back(tmp_path, capsys):
    import yaml

    from jobs.config import PipelineConfig
    from lawm.config import load, to_dict

    # overrides before and after an option (argparse's plain parse_args refused the second group)
    # (and `1e-2`, which YAML 1.1 reads as a string, is the number it spells in a float field)
    assert main(["--config", str(CONFIG), "run.seed=5", "--print-config", "train_lam.train.steps=7",
                 "train_lam.model.reg.beta=1e-2"]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    # defaults that demo.yaml never names are there, the override too, and ingest_sim's own defaults are visible
    assert resolved["generate"]["synthetic"]["n_agents"] == PipelineConfig().generate.synthetic.n_agents
    assert resolved["train_lam"]["train"]["steps"] == 7 and resolved["run"]["seed"] == 5
    assert resolved["train_lam"]["model"]["reg"]["beta"] == 0.01
    assert resolved["ingest_sim"]["clip_frames"] == 8 and resolved["ingest"]["clip_frames"] == 16
    # the printed YAML is itself a complete config: loading it gives the same configuration
    (tmp_path / "resolved.yaml").write_text(printed)
    assert to_dict(load(PipelineConfig, tmp_path / "resolved.yaml")) == resolved


def test_the_old_stage_name_train_wm_still_works(tmp_path, capsys):
    """`train_wm` was renamed `train_lam`: the old name is accepted as a section, in overrides and in the stage list,
    and giving both names is refused instead of silently preferring one."""
    import yaml

    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"stages": ["encode", "train_wm"], "train_wm": {"window": 3}}))
    assert main(["--config", str(old), "--print-config", "train_wm.train.steps=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert "train_wm" not in resolved
    assert resolved["train_lam"]["window"] == 3 and resolved["train_lam"]["train"]["steps"] == 7
    # `stages: [.., train_wm]` selects train_lam: without encode's outputs it is refused before any work
    empty = tmp_path / "empty"
    assert main(["--config", str(old), f"run.root={empty}", "--stages", "train_wm"]) == 2
    assert "train_lam" in capsys.readouterr().err and not empty.exists()
    # an override under the new name applies on top of a file that uses the old one
    assert main(["--config", str(old), "--print-config", "train_lam.window=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train_lam"]["window"] == 2
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"train_wm": {"window": 3}, "train_lam": {"window": 2}}))
    assert main(["--config", str(both), "--print-config"]) == 2
    assert "both `train_wm` and `train_lam`" in capsys.readouterr().err


def test_an_unusable_object_store_root_is_refused_before_any_work(tmp_path, capsys, monkeypatch, s3_server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mirror = Path(s3_server[1]["LAWM_MIRROR_DIR"])
    for root, message in (("s3://bucket/runs/x", "set MLFLOW_TRACKING_URI to a tracking server"),  # sqlite can't be there
                          ("http://host/runs/x", "only s3://, gs:// object stores"),
                          ("s3://bucket/../x", "no empty, '.' or '..' parts")):
        assert main(["--config", str(CONFIG), "--stages", "generate", f"run.root={root}"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
    # a bucket that is not there (or credentials that do not work): found before Ray starts or MLflow is touched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted
    assert main(["--config", str(CONFIG), "--stages", "generate", "run.root=s3://no-such-bucket-lawm/x"]) == 2
    assert "run.root: s3://no-such-bucket-lawm/x cannot be written" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()) and not (mirror / "s3" / "no-such-bucket-lawm").exists()  # no "s3:" folder


def test_relative_root_is_refused_under_a_ray_job(tmp_path, monkeypatch, capsys):
    # `ray job submit` runs the driver inside Ray's temporary copy of the working directory and says so in this
    # variable; a relative run.root would land there and vanish with the cluster
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(CONFIG), "--stages", "generate", "run.root=runs/demo"]) == 2
    err = capsys.readouterr().err
    assert "run.root" in err and "absolute" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "runs").exists()
    assert main(["--config", str(CONFIG), "--print-config", f"run.root={tmp_path / 'abs'}"]) == 0


def test_an_input_inside_the_stage_folder_is_refused_before_anything_is_deleted(tmp_path, capsys):
    # the runner replaces <root>/ingest on a rerun: videos kept there would be deleted with it
    videos = tmp_path / "run" / "ingest" / "my_videos"
    videos.mkdir(parents=True)
    (videos / "keep.mp4").write_bytes(b"not really a video, but the user's file")
    assert main(["--config", str(CONFIG), "--stages", "ingest", f"run.root={tmp_path / 'run'}",
                 f"ingest.input={videos}"]) == 2
    assert "ingest.input" in capsys.readouterr().err
    assert (videos / "keep.mp4").read_bytes().startswith(b"not really")
