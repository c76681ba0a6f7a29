"""Run a grid of pipelines (the axes of the paper's capacity tables: regulariser x capacity knob x seed) as
concurrent trials on the Ray cluster, sharing the data stages, and write one table across the sweep.

    python jobs/sweep.py --config jobs/configs/demo.yaml --name beta \\
        --axis train_lam.model.reg.beta=1e-4,1e-3 --axis run.seed=0,1 [--max-concurrent 2] [key=value ...]

Layout under run.root:
  shared/<stage>/           the stages no axis touches (generate ... encode, and more when the axes allow), run once
  trials/<trial>/<stage>/   one pipeline per grid point; the shared stages appear there as symlinks to shared/
  sweep.md, sweep.html, sweep.csv   the report stage's table across the trials (jobs/report.sweep_report):
                            one row per trial, and the mean ± sd over seeds when run.seed is an axis (written last)
MLflow: every trial logs into the sweep's store (run.root/mlflow.db unless MLFLOW_TRACKING_URI is set), its parent
run named `<name>-<trial>` and tagged `lawm.sweep`, so the compare view lines the trials up.

A stage is shared when no axis names its config section, every stage it reads is shared, and, if `run.seed` is an
axis, it is a data stage (the seed changes training, not the data). An axis on a data stage's section is refused:
it would make each trial's data different, which is a different experiment.

Why plain Ray tasks and not Ray Tune: a trial is a whole pipeline whose stages schedule their own Ray Data and Ray
Train work; a Tune trial would hold its CPUs while those ran (double booking) and bring checkpointing and searchers
that a fixed grid does not need. Each trial is one zero-CPU Ray task that runs `jobs/full_pipeline.py` in a
subprocess connected to the same cluster, at most `--max-concurrent` at a time. Every trial's configuration is built
and validated before anything runs.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable (e.g. a Ray job's working dir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lawm import storage  # noqa: E402
from lawm.config import ConfigError, load  # noqa: E402

DATA_STAGES = ("generate", "ingest", "simulate", "ingest_sim", "encode")
ROOT = Path(__file__).resolve().parents[1]


def parse_axes(pairs: list[str]) -> dict[str, list]:
    axes = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not raw or "." not in key:
            raise ConfigError(f"--axis {pair}: expected section.key=v1,v2,...")
        if key in axes:
            raise ConfigError(f"--axis {key}: given twice")
        axes[key] = [v.strip() for v in raw.split(",")]  # as typed: the config loader types them, names keep them
        if not all(axes[key]):
            raise ConfigError(f"--axis {pair}: an empty value")
    return axes


def trial_name(point: dict) -> str:
    return "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()).replace("/", "-")


def shared_stages(cfg, axes: dict[str, list], stages) -> list[str]:
    sections = {k.split(".", 1)[0] for k in axes}
    seeds = "run" in sections
    shared: list[str] = []
    for stage in stages:
        section = stage.section or stage.name
        if stage.name in DATA_STAGES and section in sections:
            raise ConfigError(f"--axis on {section}: a data stage; each trial would see different data (run one "
                              "sweep per dataset instead)")
        if (section not in sections and all(i in shared for i in stage.inputs(cfg))
                and (stage.name in DATA_STAGES or not seeds)):
            shared.append(stage.name)
    return shared


def trial_env(env: dict, *, node_cpus: float, max_concurrent: int) -> dict:
    """The trials' drivers share this node's CPUs, and each evaluates in its own process: each gets its share of
    torch threads (OMP_NUM_THREADS, unless the caller set it). Torch's default, every core per process, measured
    here beside a training trial on 2 CPUs: the evaluation stages took 61 s and 60 CPU-s with 2 threads, 42 s and
    31 CPU-s with 1 (the spare thread spins, slowing the other trial too)."""
    if env.get("OMP_NUM_THREADS"):
        return env
    return {**env, "OMP_NUM_THREADS": str(max(1, int(node_cpus) // max(1, max_concurrent)))}


def _run_trial(cmd: list[str], env: dict, log: str) -> int:
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def _pipeline(config: str, root: Path, stages: list[str], overrides: list[str]) -> list[str]:
    # run.root last: it must win over the sweep's own run.root among the overrides
    return [sys.executable, str(ROOT / "jobs" / "full_pipeline.py"), "--config", config, "--stages", ",".join(stages),
            *overrides, f"run.root={root}"]


def connect(root: Path, base) -> dict:
    """Start (or join) the sweep's Ray cluster and MLflow store; the environment every trial's pipeline runs with."""
    import ray

    from jobs import tracking
    from pipelines.ray_env import ensure_ray

    # one store for the whole sweep (its artifacts under run.root), one cluster: the shared run and every trial join
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")
           or f"sqlite:///{root / 'mlflow.db'}"}
    tracking.setup(root, base.run.experiment)  # the same store: tracking_uri(root) is root/mlflow.db or the env's
    ensure_ray(base.run.num_cpus)
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # Ray 2.60 starts a local cluster with token auth on, but a client joining by address assumes it off unless told
    env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "token")
    return env


def run_shared(*, config: str, root: Path, stages: list[str], overrides: list[str], env: dict, name: str) -> bool:
    """The shared stages, once, in root/shared (a pipeline of its own; skipped stage by stage when done)."""
    if not stages:
        return True
    (root / "shared").mkdir(parents=True, exist_ok=True)
    cmd = _pipeline(config, root / "shared", stages, [*overrides, f"run.name={name}-shared"])
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode == 0


def run_trials(*, config: str, root: Path, shared: list[str], trials: dict[str, tuple[list[str], list[str]]],
               env: dict, max_concurrent: int) -> dict[str, int]:
    """Each trial `name: (overrides, stages)` as a pipeline in root/trials/<name>, the shared stages linked in.

    Trials are zero-CPU Ray tasks on this node (the checkout's paths hold here), at most `max_concurrent` at a time;
    the work of each trial's stages is spread over the cluster by Ray Data and Ray Train. Returns exit codes by name.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_run_trial)
    cpus = next(n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node)
    env = trial_env(env, node_cpus=cpus, max_concurrent=max_concurrent)
    pending, status = {}, {}
    queue = list(trials.items())
    while queue or pending:
        while queue and len(pending) < max_concurrent:
            name, (overrides, stages) = queue.pop(0)
            troot = root / "trials" / name
            troot.mkdir(parents=True, exist_ok=True)
            for stage in shared:
                link = troot / stage
                if not link.is_symlink():
                    link.symlink_to(root / "shared" / stage, target_is_directory=True)
            ref = task.remote(_pipeline(config, troot, stages, overrides), env, str(troot / "pipeline.log"))
            pending[ref] = name
            print(f"[{name}] started → {troot}", flush=True)
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        status[name] = ray.get(done[0])
        print(f"[{name}] {'done' if status[name] == 0 else f'failed (exit {status[name]}), see its pipeline.log'}",
              flush=True)
    return status

def stage_metrics(troot: Path, stage: str) -> dict[str, float]:
    """The numeric metrics a finished stage of one trial recorded, read through the runner's own marker reader (an
    empty or cut-short marker is "not done": no metrics); booleans are not numbers here."""
    from jobs.runner import marker

    record = marker(troot, stage) or {}
    return {k: float(v) for k, v in record.get("outputs", {}).get("metrics", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True, help="the sweep's name (MLflow tag lawm.sweep, run names)")
    parser.add_argument("--axis", action="append", default=[], help="section.key=v1,v2,... (repeatable)")
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--stages", default="", help="comma-separated stages to run (default: all)")
    parser.add_argument("overrides", nargs="*", help="overrides for every trial, e.g. run.root=/mnt/lawm/sweeps/x")
    args = parser.parse_intermixed_args(argv)
    from jobs.config import PipelineConfig
    from jobs.stages import RENAMED_STAGES, STAGES, canonical_stages

    try:
        axes = parse_axes(args.axis)
        if not axes:
            raise ConfigError("--axis: give at least one")
        base = load(PipelineConfig, args.config, args.overrides, renamed=RENAMED_STAGES)
        if storage.is_uri(base.run.root):  # the trials' roots hold links to the shared stages' folders
            raise ConfigError(f"run.root: {base.run.root} is an object store; a sweep needs a path every node sees")
        points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
        trials = {trial_name(p): p for p in points}
        for point in points:  # every trial's configuration is valid before anything runs
            load(PipelineConfig, args.config, [*args.overrides, *(f"{k}={v}" for k, v in point.items())],
                 renamed=RENAMED_STAGES)
        selected = canonical_stages([s for s in args.stages.split(",") if s]) or [s.name for s in STAGES]
        unknown = sorted(set(selected) - {s.name for s in STAGES})
        if unknown:
            raise ConfigError(f"--stages: unknown {unknown}")
        shared = [s for s in shared_stages(base, axes, STAGES) if s in selected]
        own = [s.name for s in STAGES if s.name not in shared and s.name in selected]
        if not own:
            raise ConfigError("--stages: every selected stage is shared; nothing would differ between trials")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    root = Path(base.run.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    env = connect(root, base)
    print(f"sweep {args.name}: {len(trials)} trials over {', '.join(axes)}; shared: {', '.join(shared) or 'none'}")
    if not run_shared(config=args.config, root=root, stages=shared, overrides=args.overrides, env=env, name=args.name):
        print(f"sweep {args.name}: the shared stages failed", file=sys.stderr)
        return 1
    status = run_trials(config=args.config, root=root, shared=shared, env=env, max_concurrent=args.max_concurrent,
                        trials={name: ([*args.overrides, *(f"{k}={v}" for k, v in point.items()),
                                        f"run.name={args.name}-{name}", f"run.sweep={args.name}"], own)
                                for name, point in trials.items()})

    # 3. one table across the sweep, by the report stage's reader and writer
    from jobs.report import sweep_report

    paths = sweep_report(name=args.name, axes=axes, trials=trials, status=status, root=root,
                         tracking_uri=env.get("MLFLOW_TRACKING_URI", ""))
    print(f"sweep {args.name}: {sum(v == 0 for v in status.values())}/{len(trials)} trials ok; "
          f"table: {paths['md']} ({paths['html'].name} beside it)")
    return 0 if all(v == 0 for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
