"""Stage `report`: one page shaped like the paper's Tables 1, 2, S1 and S2 (plus the probes), read back from MLflow.

Which runs: each input stage's `_stage.json` names the MLflow run that made its outputs (a stage skipped in this
invocation still points at the run that made them); metrics, params and pictures (the `plots/` artifacts) are read
from those runs with the MLflow client, and the parent run of this invocation and its children are listed. Our
numbers stand beside their baselines and, for orientation only, beside the paper's (GPU scale, V-JEPA 2-L features,
LPIPS on decoded frames; ours: L1 in representation or pixel space at CPU scale — compare orderings, not values).

Outputs in `<run.root>/report/`: `report.md` (pictures as files under `pictures/`), `report.html` (self-contained:
pictures inlined as base64), both logged as artifacts. Every file is written to a temp name and renamed; the
runner writes `_stage.json` last.

A sweep (`jobs/sweep.py`) ends in `sweep_report`: the same reading (each trial's markers name its runs, the figures
come from those MLflow runs) and the same page writer, one row per trial and, when `run.seed` is an axis, one row
per setting with the mean ± sd over its seeds. Outputs in the sweep's root: `sweep.md`, `sweep.html`, `sweep.csv`
(written after every trial ended; each to a temp name, renamed), logged to a run tagged `lawm.stage=report` and
`lawm.sweep_table=<sweep>`.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lawm.config import require
from lawm.files import atomic_write_bytes

from jobs.runner import StageContext

# Stages whose runs the report reads, when registered; train_lam and the three evaluations must have run.
REQUIRED = ("train_lam", "eval_leakage", "eval_transfer", "eval_probe")
OPTIONAL = ("train_decoder", "train_controller", "train_wm_action", "eval_planning")

# The paper's numbers (arXiv 2601.05230, as transcribed in ../shared/PAPER.md). Table 1 and 2: LPIPS; S1: LPIPS
# IDM vs controller and Δxyz (m); S2: LPIPS IDM vs controller and ATE/RPE (waypoint units).
PAPER_T1 = {"sparse": ("0.28 / 0.66 (×2.3)", "0.20 / 0.50 (×2.4)"), "noisy": ("0.33 / 0.69 (×2.1)", "0.21 / 0.54 (×2.5)"),
            "discrete": ("0.34 / 0.69 (×2.0)", "0.29 / 0.68 (×2.3)")}
PAPER_T2 = {"sparse": ("0.26→0.31", "0.19→0.24", "0.24→0.29", "0.20→0.23"),
            "noisy": ("0.30→0.34", "0.20→0.26", "0.29→0.33", "0.20→0.24"),
            "discrete": ("0.32→0.33", "0.27→0.29", "0.32→0.33", "0.26→0.27")}
PAPER_S1 = {"sparse": ("0.12 vs 0.14; 0.33 m", "0.10 vs 0.12; 0.18 m", "0.09 vs 0.14; 0.13 m"),
            "noisy": ("0.13 vs 0.13; 0.49 m", "0.10 vs 0.11; 0.11 m", "0.09 vs 0.12; 0.10 m"),
            "discrete": ("0.13 vs 0.13; 0.18 m", "—", "0.11 vs 0.12; 0.14 m")}
PAPER_S1_BASELINES = "V-JEPA 2-AC 0.15 m; V-JEPA 2 + WM (action-conditioned upper bound) 0.05 m"
PAPER_S2 = {"sparse": ("0.23 vs 0.25; 1.68/0.48", "0.19 vs 0.23; 1.45/0.41", "0.17 vs 0.26; 1.43/0.42"),
            "noisy": ("0.24 vs 0.24; 2.06/0.55", "0.17 vs 0.21; 1.49/0.41", "0.17 vs 0.22; 1.40/0.40"),
            "discrete": ("0.24 vs 0.24; 1.81/0.51", "—", "0.20 vs 0.21; 1.48/0.42")}
PAPER_S2_BASELINES = "NoMaD 1.93/0.52; NWM 1.13/0.35"


@dataclass(kw_only=True)
class ReportConfig:
    title: str = "lawm report"
    paper: bool = True  # the paper's numbers beside ours, for orientation
    max_picture_mb: float = 8.0  # larger pictures are linked, not inlined

    def validate(self) -> None:
        require(bool(self.title), "title", "must not be empty")
        require(self.max_picture_mb > 0, "max_picture_mb", "must be positive")


# ---------------------------------------------------------------------------------------------- reading MLflow


@dataclass
class StageRun:
    stage: str
    run_id: str
    metrics: dict
    params: dict
    pictures: list[Path]


def read_runs(ctx: StageContext, stages: list[str], picture_dir: Path) -> dict[str, StageRun]:
    """Metrics, params and `plots/` pictures of each input stage's run, downloaded into `picture_dir`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ctx.tracking_uri or None)
    runs = {}
    for stage in stages:
        run_id = ctx.inputs[stage].get("mlflow_run_id")
        if not run_id:
            raise ValueError(f"report: the marker of `{stage}` names no MLflow run")
        try:
            run = client.get_run(run_id)
        except Exception as err:  # noqa: BLE001 - MlflowException for an unknown id; say which stage it was
            raise ValueError(f"report: the MLflow run {run_id} of `{stage}` is not in {ctx.tracking_uri} "
                             f"({err.__class__.__name__})") from None
        pictures = []
        for art in client.list_artifacts(run_id, "plots"):
            if Path(art.path).suffix.lower() in (".png", ".gif", ".jpg", ".jpeg"):
                dest = picture_dir / stage
                dest.mkdir(parents=True, exist_ok=True)
                pictures.append(Path(client.download_artifacts(run_id, art.path, str(dest))))
        runs[stage] = StageRun(stage, run_id, dict(run.data.metrics), dict(run.data.params), pictures)
    return runs


def pipeline_runs(ctx: StageContext) -> list[dict]:
    """This invocation's parent run and its children (stage, run id, status), for the record."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ctx.tracking_uri or None)
    if not ctx.mlflow_run_id:
        return []
    me = client.get_run(ctx.mlflow_run_id)
    parent = me.data.tags.get("mlflow.parentRunId")
    if not parent:
        return []
    children = client.search_runs([me.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    rows = [{"stage": "(parent)", "run_id": parent, "status": client.get_run(parent).info.status}]
    rows += [{"stage": r.data.tags.get("lawm.stage", "?"), "run_id": r.info.run_id, "status": r.info.status}
             for r in sorted(children, key=lambda r: r.info.start_time)]
    return rows


# ---------------------------------------------------------------------------------------------- the tables


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000 or (value != 0 and abs(value) < 10 ** -digits):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _model_name(wm: StageRun) -> str:
    kind = wm.params.get("model.reg.kind", "?")
    knob = {"sparse": "l1", "noisy": "beta", "discrete": "codebook_size"}.get(kind)
    mode = wm.params.get("model.idm.mode", "pooled")
    value = f" {knob}={wm.params.get('model.reg.' + knob)}" if knob else ""
    return f"{kind}{value}, {mode} z"


def tables(runs: dict[str, StageRun], paper: bool) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for each table."""
    get = lambda stage, key: runs[stage].metrics.get(key) if stage in runs else None  # noqa: E731
    model = _model_name(runs["train_lam"]) if "train_lam" in runs else "?"
    capacity = get("train_lam", "val_one_step_error")
    out = []

    def cut_row(name, p):
        return [name, fmt(get("eval_leakage", f"leakage/{p}error_nocut")), fmt(get("eval_leakage", f"leakage/{p}error_cut")),
                fmt(get("eval_leakage", f"leakage/{p}ratio"), 2), fmt(get("eval_leakage", f"leakage/{p}vs_copy"), 2),
                fmt(get("eval_leakage", f"leakage/{p}copy_cut")), fmt(get("eval_leakage", f"leakage/{p}error_cut_zero_z")),
                fmt(get("eval_leakage", f"leakage/{p}error_cut_random_z")),
                fmt(get("eval_leakage", f"leakage/{p}error_cut_shifted_z"))]

    rows = [cut_row(f"ours: {model}, representation L1 (capacity {fmt(capacity)})", ""),
            cut_row(f"ours: {model}, pixel L1 through the decoder", "pixel_")]
    if paper:
        rows += [[f"paper: {k}, low / high capacity (LPIPS, no cut / cut)", *v, "", "", "", "", "", ""]
                 for k, v in PAPER_T1.items()]
    out.append(("Table 1 — leakage under a scene cut",
                ["model", "error no cut", "error cut", "ratio", "vs copy", "copy across cut", "zero z", "random z",
                 "shifted z"], rows,
                "vs copy = cut error ÷ copying A's last frame across the cut: ≈ 1 the latent carries nothing of B, "
                "≪ 1 it leaks B. The paper's ratio ×2.0–2.5 is for regularised latents."))

    def cycle_row(name, p):
        return [name, fmt(get("eval_transfer", f"transfer/{p}error")), fmt(get("eval_transfer", f"transfer/{p}cycle_error")),
                fmt(get("eval_transfer", f"transfer/{p}cycle_increase"), 3),
                fmt(get("eval_transfer", f"transfer/{p}error_copy")), fmt(get("eval_transfer", f"transfer/{p}error_zero_z")),
                fmt(get("eval_transfer", f"transfer/{p}error_random_z")),
                fmt(get("eval_transfer", f"transfer/{p}error_shifted_z")),
                fmt(get("eval_transfer", f"transfer/{p}horizon_steps"), 0)]

    rows = [cycle_row(f"ours: in-the-wild, {model}", ""), cycle_row(f"ours: navigation sim, {model}", "nav/")]
    if paper:
        rows += [[f"paper: {k} (Kinetics low, high; RECON low, high)", " · ".join(v), "", "", "", "", "", "", ""]
                 for k, v in PAPER_T2.items()]
    cf = [get("eval_transfer", f"transfer/counterfactual_error{s}") for s in ("", "_own_z", "_copy", "_zero_z", "_random_z")]
    out.append(("Table 2 — transfer and the cycle (A → B → A)",
                ["model", "error (A, own z)", "after cycle", "cycle increase", "copy", "zero z", "random z",
                 "shifted z", "steps"], rows,
                "Rollouts of `steps` latent steps (2 s) from one context frame, mean L1 in representation space. "
                "Counterfactual (B driven by A against the rendered truth): "
                f"{fmt(cf[0])}; B's own z {fmt(cf[1])}, copy {fmt(cf[2])}, zero z {fmt(cf[3])}, random z {fmt(cf[4])}."))

    for domain, title, plan_cols, paper_rows, base in (
            ("manip", "Table S1 — manipulation (DROID-like): controller and planning",
             [("delta_xyz", "Δxyz")], PAPER_S1, PAPER_S1_BASELINES),
            ("nav", "Table S2 — navigation (RECON-like): controller and planning",
             [("ate", "ATE"), ("rpe", "RPE")], PAPER_S2, PAPER_S2_BASELINES)):
        ctrl = lambda k: get("train_controller", f"{domain}_val_{k}")  # noqa: E731
        plan = lambda k: get("eval_planning", f"planning/{domain}/{k}")  # noqa: E731
        header = ["model", "WM error, IDM z", "WM error, controller z (cross-attn / MLP)", "WM error, zero z"]
        row = [f"ours: {model}", fmt(ctrl("wm_error_idm")),
               f"{fmt(ctrl('wm_error_cross_attention'))} / {fmt(ctrl('wm_error_mlp'))}", fmt(ctrl("wm_error_zero_z"))]
        for key, name in plan_cols:
            header += [f"{name} (latent + controller)", f"{name} zero action", f"{name} action WM"]
            row += [fmt(plan(key)), fmt(plan(f"{key}_zero_action")), fmt(plan(f"{key}_action_wm"))]
        rows = [row]
        if paper:
            rows += [[f"paper: {k} (low; mid; high)", " · ".join(v)] + [""] * (len(header) - 2)
                     for k, v in paper_rows.items()]
        closed = plan("closed_loop_success")
        note = (f"Closed loop: success {fmt(closed, 2)} (zero action {fmt(plan('closed_loop_success_zero_action'), 2)}, "
                f"action WM {fmt(plan('closed_loop_success_action_wm'), 2)}). Paper baselines: {base}.")
        out.append((title, header, rows, note))

    targets = sorted({k.split("/")[-1] for k in (runs["eval_probe"].metrics if "eval_probe" in runs else {})
                      if k.startswith(("probe/r2/", "probe/nav/r2/", "probe/manip/r2/"))})
    rows = []
    for domain, p in (("in-the-wild", "probe/"), ("navigation", "probe/nav/"), ("manipulation", "probe/manip/")):
        names = [t for t in targets if get("eval_probe", f"{p}r2/{t}") is not None]
        for t in names:
            rows.append([domain, t, fmt(get("eval_probe", f"{p}r2/{t}"), 2),
                         fmt(get("eval_probe", f"{p}r2_shifted_z/{t}"), 2),
                         fmt(get("eval_probe", f"{p}r2_frame_change/{t}"), 2)])
        if names:
            rows.append([domain, "mean", fmt(get("eval_probe", f"{p}r2"), 2), fmt(get("eval_probe", f"{p}r2_shifted_z"), 2),
                         fmt(get("eval_probe", f"{p}r2_frame_change"), 2)])
    out.append(("Linear probes — held-out R² from z to the true motion",
                ["domain", "target", "R² from z", "R² from shifted z", "R² from the frame change"], rows,
                "Ridge, alpha by grouped cross-validation on train clips, scored on val clips. The frame change "
                "(s_t+1 − s_t through a fixed random projection) is what a linear read-out of the features holds."))
    return out


# ---------------------------------------------------------------------------------------------- rendering


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r + [""] * (len(header) - len(r)))) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r + [""] * (len(header) - len(r)))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 4px 0;font-size:13px}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eef}
td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#f7f7f7}
.note{font-size:12px;color:#555;max-width:1100px}img{max-width:100%;border:1px solid #ddd;margin:6px 0}
figure{margin:12px 0}figcaption{font-size:12px;color:#555}"""


def render(title: str, tabs, runs: dict[str, StageRun], listing: list[dict], md_path: Path, html_path: Path,
           picture_dir: Path, max_bytes: int) -> None:
    blocks: list[tuple] = [("table", name, header, rows, note) for name, header, rows, note in tabs]
    blocks.append(("heading", "Pictures"))
    blocks += [("picture", f"{run.stage}: {pic.name}", pic) for run in runs.values() for pic in run.pictures]
    run_rows = [[r.stage, r.run_id, "read"] for r in runs.values()] + [
        [f"this invocation: {r['stage']}", r["run_id"], r["status"]] for r in listing]
    blocks.append(("table", "Runs", ["stage", "MLflow run", "status"], run_rows, ""))
    write_page(title=title, blocks=blocks, md_path=md_path, html_path=html_path, max_bytes=max_bytes)


def write_page(*, title: str, blocks: list[tuple], md_path: Path, html_path: Path, max_bytes: int) -> None:
    """The one writer of report pages: `report.md` beside its pictures and a self-contained `report.html`.

    Blocks, in order: ("heading", text), ("text", paragraph), ("table", heading, header, rows, note) and
    ("picture", caption, path); a picture lives under md_path's folder and is inlined into the HTML as base64 up to
    max_bytes (linked beyond). Both files are written to temp names and renamed.
    """
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            md += [f"## {block[1]}", ""]
            body.append(f"<h2>{html.escape(block[1])}</h2>")
        elif kind == "text":
            md += [block[1], ""]
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            _, name, header, rows, note = block
            md += [f"## {name}", "", _md_table(header, rows), "", note, ""]
            body += [f"<h2>{html.escape(name)}</h2>", _html_table(header, rows),
                     f"<p class='note'>{html.escape(note)}</p>"]
        elif kind == "picture":
            _, caption, pic = block
            rel = pic.relative_to(md_path.parent)
            md += [f"![{caption}]({rel.as_posix()})", ""]
            mime = {".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(pic.suffix.lower(), "image/png")
            data = pic.read_bytes()
            src = (f"data:{mime};base64,{base64.b64encode(data).decode()}" if len(data) <= max_bytes
                   else html.escape(rel.as_posix()))
            body.append(f"<figure><img alt='{html.escape(caption)}' src='{src}'>"
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        else:
            raise ValueError(f"write_page: unknown block kind {kind!r}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    atomic_write_bytes(md_path, "\n".join(md).encode())
    atomic_write_bytes(html_path, page.encode())


def report_inputs(registered: list[str]) -> list[str]:
    return [s for s in (*REQUIRED, *OPTIONAL) if s in registered]


def run_report(cfg: ReportConfig, ctx: StageContext) -> dict:
    missing = [s for s in REQUIRED if s not in ctx.inputs]
    if missing:
        raise ValueError(f"report: needs the runs of {missing}")
    picture_dir = ctx.out_dir / "pictures"
    if picture_dir.exists():
        shutil.rmtree(picture_dir)
    picture_dir.mkdir(parents=True)
    stages = [s for s in (*REQUIRED, *OPTIONAL) if s in ctx.inputs]
    runs = read_runs(ctx, stages, picture_dir)
    tabs = tables(runs, cfg.paper)
    md, page = ctx.out_dir / "report.md", ctx.out_dir / "report.html"
    render(cfg.title, tabs, runs, pipeline_runs(ctx), md, page, picture_dir, int(cfg.max_picture_mb * 2 ** 20))
    for path in (md, page):
        ctx.log_artifact(path, "report")
    ctx.log_artifact(picture_dir, "report/pictures")
    return {"report_md": str(md), "report_html": str(page),
            "metrics": {"report/tables": len(tabs), "report/pictures": sum(len(r.pictures) for r in runs.values())}}


# ---------------------------------------------------------------------------------------------- a sweep's table

# the figures of a trial's row: (stage, metric key in its MLflow run)
SWEEP_FIGURES = (("train_lam", "val_one_step_error"), ("train_lam", "val_copy_error"),
                 ("eval_leakage", "leakage/ratio"), ("eval_leakage", "leakage/vs_copy"),
                 ("eval_transfer", "transfer/cycle_increase"), ("eval_probe", "probe/r2"))
SEED_AXIS = "run.seed"


def write_csv(rows: list[dict], path: Path) -> None:
    """The one CSV writer of result tables: a column for every key any row has, written to a temp name and renamed."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def trial_figures(client, troot: Path) -> dict:
    """SWEEP_FIGURES of one trial, read from the MLflow runs its stage markers name (None where a stage did not
    finish, names no run, or its run lacks the metric), and `unreadable`: the stages whose named run the store
    does not have (another store, a deleted run), so that one lost run costs a cell, not the sweep's table."""
    from jobs.runner import marker

    runs: dict[str, dict] = {}
    unreadable = []
    out: dict = {}
    for stage, key in SWEEP_FIGURES:
        if stage not in runs:
            run_id = (marker(troot, stage) or {}).get("mlflow_run_id")
            try:
                runs[stage] = dict(client.get_run(run_id).data.metrics) if run_id else {}
            except Exception:  # noqa: BLE001 - MlflowException for an unknown id: say so in the row
                runs[stage] = {}
                unreadable.append(stage)
        out[f"{stage}:{key}"] = runs[stage].get(key)
    return {**out, "unreadable": ",".join(unreadable)}


def mean_sd(values) -> tuple[float | None, float | None, int]:
    """Mean, standard deviation (n-1) and count of the finite floats among `values`; None where undefined (no
    value; one value for the sd). The one place seed statistics are computed (the sweep table, the science report)."""
    vals = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not vals:
        return None, None, 0
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, sd, len(vals)


def seed_means(rows: list[dict], axes: list[str], figures: list[str]) -> list[dict]:
    """One row per setting of the axes other than the seed: each figure's mean, sd (n-1) and count over the seeds
    whose trial finished, non-finite values left out. Settings keep the trials' order."""
    others = [a for a in axes if a != SEED_AXIS]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[a] for a in others), []).append(row)
    out = []
    for setting, members in groups.items():
        row = dict(zip(others, setting))
        row["seeds ok"] = f"{sum(m['status'] == 'ok' for m in members)}/{len(members)}"
        for fig in figures:
            row[fig] = mean_sd(m.get(fig) for m in members if m["status"] == "ok")
        out.append(row)
    return out


def sweep_report(*, name: str, axes: dict[str, list], trials: dict[str, dict], status: dict[str, int], root: Path,
                 tracking_uri: str = "") -> dict[str, Path]:
    """The table across a finished sweep (see the module's docstring). `trials`: name → its axis values; `status`:
    name → the trial's exit code. Returns the paths written."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or None)
    rows = []
    for tname, point in trials.items():
        code = status.get(tname)
        rows.append({"trial": tname, **point, "status": "ok" if code == 0 else f"exit {code}",
                     **trial_figures(client, root / "trials" / tname)})
    figures = [f"{stage}:{key}" for stage, key in SWEEP_FIGURES]
    paths = {"csv": root / "sweep.csv", "md": root / "sweep.md", "html": root / "sweep.html"}
    write_csv(rows, paths["csv"])
    cols = ["trial", *axes, "status", *figures] + (["unreadable"] if any(r["unreadable"] for r in rows) else [])
    blocks: list[tuple] = [("table", "Every trial", cols, [[fmt(r[c], 4) for c in cols] for r in rows],
                            "One row per trial; figures read from each trial's MLflow runs. — : the stage did not "
                            "finish or was not run; `unreadable`: stages whose run is not in this store.")]
    if SEED_AXIS in axes and len(axes[SEED_AXIS]) > 1:
        means = seed_means(rows, list(axes), figures)
        head = [a for a in axes if a != SEED_AXIS] + ["seeds ok"]
        cell = lambda m: "—" if m[0] is None else fmt(m[0], 4) + (f" ± {fmt(m[1], 4)}" if m[1] is not None else "")  # noqa: E731
        blocks.append(("table", "Mean ± sd over seeds", head + figures,
                       [[str(r[h]) for h in head] + [cell(r[f]) for f in figures] for r in means],
                       "sd over the seeds whose trial finished (n-1); a trial that failed adds no number."))
    axis_text = ", ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in axes.items())
    write_page(title=f"Sweep {name}", blocks=[("text", f"Axes: {axis_text}."), *blocks], md_path=paths["md"],
               html_path=paths["html"], max_bytes=0)
    with mlflow.start_run(run_name=f"{name}-report", tags={"lawm.sweep_table": name, "lawm.stage": "report"}):
        mlflow.log_params({f"axis.{k}": ",".join(map(str, v)) for k, v in axes.items()})
        mlflow.log_metrics({"sweep/trials": len(trials), "sweep/trials_ok": sum(v == 0 for v in status.values())})
        for path in paths.values():
            mlflow.log_artifact(str(path))
    return paths


# ---------------------------------------------------------------------------------------------- checking the page


def chromium_exe() -> str:
    """Headless Chromium: $LAWM_CHROMIUM, else `chromium` / `chromium-browser` on PATH (Debian: apt-get install
    chromium)."""
    exe = os.environ.get("LAWM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise RuntimeError("no chromium found: apt-get install -y chromium (or set LAWM_CHROMIUM)")
    return exe


def _chromium(html_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # an argument list, never a shell; --no-sandbox because CI containers run as root
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium_exe(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args, Path(html_path).absolute().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(html_path: Path, png: Path, size: tuple[int, int] = (1400, 2400)) -> Path:
    """A PNG of the page as headless Chromium renders it."""
    _chromium(html_path, f"--screenshot={Path(png).absolute()}", f"--window-size={size[0]},{size[1]}")
    return png


def rendered_dom(html_path: Path) -> str:
    """The page's DOM after Chromium has parsed and laid it out."""
    return _chromium(html_path, "--dump-dom").stdout
