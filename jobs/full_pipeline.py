"""Run the lawm pipeline, or some of its stages.

    python jobs/full_pipeline.py --config jobs/configs/demo.yaml [--stages a,b] [--force] [key=value ...]

Locally it starts Ray on this machine; under `ray job submit` (or with RAY_ADDRESS set) it uses the cluster.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable (e.g. a Ray job's working dir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from lawm import storage  # noqa: E402
from lawm.config import ConfigError, load, to_dict  # noqa: E402


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a pipeline YAML (see jobs/configs/)")
    parser.add_argument("--stages", default="", help="comma-separated stages to run (default: the config's, else all)")
    parser.add_argument("--force", action="store_true", help="redo the selected stages even when their outputs exist")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved configuration (every default included) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. ingest.fps=8 run.root=runs/x")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after --stages


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jobs.config import PipelineConfig
    from jobs.stages import RENAMED_STAGES, STAGE_NAMES, STAGES, canonical_stages

    try:
        cfg = load(PipelineConfig, args.config, args.overrides, renamed=RENAMED_STAGES)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        selected = canonical_stages([s for s in args.stages.split(",") if s] or cfg.stages) or STAGE_NAMES
        unknown = [s for s in selected if s not in STAGE_NAMES]
        if unknown:
            raise ConfigError(f"stages: unknown {unknown} (known: {', '.join(STAGE_NAMES)})")
        from jobs.console import quiet_ray_noise
        from jobs.runner import check_inputs, run_pipeline
        from pipelines.ray_env import ensure_ray

        try:  # a missing bucket or wrong credentials fail here, before any work
            storage.check_root(cfg.run.root)
        except OSError as err:
            raise ConfigError(f"run.root: {cfg.run.root} cannot be written: {err}") from None
        check_inputs(cfg, STAGES, selected)
        with quiet_ray_noise():
            ensure_ray(cfg.run.num_cpus)
            results = run_pipeline(cfg, STAGES, selected, force=args.force)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    root = storage.working_root(cfg.run.root)
    from jobs.tracking import tracking_uri, ui_url

    uri = tracking_uri(root)
    print("\nstages: " + ", ".join(f"{r.name} ({r.status})" for r in results))
    print(f"outputs: {cfg.run.root} (this node's mirror: {root})" if storage.is_uri(cfg.run.root) else
          f"outputs: {root}")
    print(f"MLflow store: {uri}")
    import mlflow

    experiment = mlflow.MlflowClient(uri).get_experiment_by_name(cfg.run.experiment)
    exp_id = experiment.experiment_id if experiment else None
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        print(f"then open {ui_url('http://127.0.0.1:5000', exp_id)}")
    elif uri.startswith("http"):
        print(f"MLflow UI: {ui_url(uri, exp_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
