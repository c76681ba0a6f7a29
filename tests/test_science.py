"""The science benchmark's smallest configuration end to end (`science/run.py --smoke`), and its verdict rules on
hand-made rows: each rule must be able to say both `reproduced` and `not reproduced`."""
from __future__ import annotations

import csv
import math
import re

import mlflow
import pytest

from science import run as science


def _rows(**metrics_by_family):
    """Three seeds of every grid point with the given metrics (family -> {key: value or [low, mid, high]})."""
    rows = []
    for name, (labels, _, _) in science.grid().items():
        row = {"trial": name, **labels, "status": "ok"}
        for key, value in metrics_by_family.get(labels["family"], {}).items():
            row[key] = float(value[labels["capacity"]] if isinstance(value, list) else value) + 1e-4 * labels["seed"]
        rows.append(row)
    return rows


GOOD = {"leakage/ratio": 3.0, "leakage/vs_copy": 0.95, "transfer/counterfactual_error": 0.03,
        "transfer/cycle_increase": 0.02, "probe/r2/agent": 0.85, "probe/r2/camera": 0.95,
        "train_lam:val_one_step_error": [0.04, 0.03, 0.02], "planning/manip/delta_xyz": 0.1,
        "planning/manip/delta_xyz_action_wm": 0.09, "planning/manip/delta_xyz_zero_action": 0.3,
        "planning/nav/ate": 1.0, "planning/nav/ate_action_wm": 0.9, "planning/nav/ate_zero_action": 2.0}


def test_verdict_rules_can_pass_and_fail():
    vs = {"leakage/vs_copy": [0.99, 0.95, 0.9]}
    discrete = {**GOOD, **vs, "transfer/counterfactual_error": 0.05, "transfer/cycle_increase": 0.04}
    good = _rows(sparse={**GOOD, **vs}, noisy={**GOOD, **vs}, discrete=discrete, none={"leakage/vs_copy": 0.3})
    found = science.verdicts(good)
    assert all(ok for ok, _ in found.values()), found
    # each question fails on its own when its decisive number moves past the threshold
    bad = {
        "leakage": _rows(sparse={**GOOD, **vs}, noisy={**GOOD, **vs}, discrete=discrete,
                         none={"leakage/vs_copy": 0.7}),  # the positive control does not leak
        "transfer": _rows(sparse={**GOOD, **vs, "transfer/cycle_increase": 0.06}, noisy={**GOOD, **vs},
                          discrete=discrete, none={"leakage/vs_copy": 0.3}),
        "probe": _rows(sparse={**GOOD, **vs, "probe/r2/agent": 0.5}, noisy={**GOOD, **vs, "probe/r2/agent": 0.79},
                       discrete=discrete, none={"leakage/vs_copy": 0.3}),
        "capacity": _rows(sparse={**GOOD, "leakage/vs_copy": [0.9, 0.95, 0.99]}, noisy={**GOOD, **vs},
                          discrete=discrete, none={"leakage/vs_copy": 0.3}),
        "planning": _rows(sparse={**GOOD, **vs}, noisy={**GOOD, **vs, "planning/nav/ate_zero_action": 1.2},
                          discrete=discrete, none={"leakage/vs_copy": 0.3}),
    }
    # a fall of the means no larger than the seed spread (here 1e-4 per seed) is not a trade-off
    bad["capacity in the spread"] = _rows(sparse={**GOOD, **vs}, noisy={**GOOD, **vs}, none={"leakage/vs_copy": 0.3},
                                          discrete={**discrete, "train_lam:val_one_step_error": [0.0302, 0.0301, 0.03]})
    for q, rows in bad.items():
        found = science.verdicts(rows)
        q = q.split()[0]
        assert not found[q][0], (q, found[q])
        assert all(ok for other, (ok, _) in found.items() if other != q), (q, found)
    # a missing number never passes
    assert not any(ok for ok, _ in science.verdicts(_rows()).values())


def test_stats_spread_over_seeds_and_missing_values():
    rows = [{"family": "noisy", "k": 1.0}, {"family": "noisy", "k": 3.0}, {"family": "noisy", "k": float("nan")},
            {"family": "sparse", "k": 5.0}]
    mean, sd, n = science.stats(rows, "k", family="noisy")
    assert (mean, n) == (2.0, 2) and math.isclose(sd, math.sqrt(2))
    assert science.pm(rows, "k", family="sparse") == "5 (n=1)" and science.pm(rows, "k", family="x") == "—"


def test_grid_is_the_papers_axes_over_three_seeds():
    trials = science.grid()
    assert len(trials) == (3 * 3 + 1) * 3
    planning = [n for n, (_, _, stages) in trials.items() if "eval_planning" in stages]
    assert planning == [f"noisy-1e-4-s{s}" for s in (0, 1, 2)]
    assert {labels["seed"] for labels, _, _ in trials.values()} == {0, 1, 2}


def test_smallest_configuration_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root, out = tmp_path / "runs", tmp_path / "report"
    assert science.main(["--smoke", "--out", str(out), f"run.root={root}"]) == 0
    text = (out / "report.md").read_text()
    verdict_lines = [line for line in text.splitlines() if line.startswith("VERDICT ")]
    assert [line.split(":")[0] for line in verdict_lines] == [
        f"VERDICT {q}" for q in ("leakage", "transfer", "probe", "capacity", "planning")]
    assert all(": reproduced (" in line or ": not reproduced — " in line for line in verdict_lines)
    assert (out / "pictures" / "capacity.png").stat().st_size > 0 and "<table>" in (out / "report.html").read_text()
    rows = list(csv.DictReader((out / "science.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    planner = next(r for r in rows if r["trial"] == "noisy-1e-4-s0")
    assert math.isfinite(float(planner["planning/nav/ate"])) and math.isfinite(float(rows[0]["leakage/ratio"]))
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    reports = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 "attributes.run_name = 'science-report'")
    assert len(reports) == 1 and set(reports[0].data.metrics) >= {
        f"verdict/{q}" for q in ("leakage", "transfer", "probe", "capacity", "planning")}
    # --report-only runs nothing and rebuilds the same report from the finished trials
    markers = {p: p.stat().st_mtime_ns for p in (root / "trials").glob("*/*/_stage.json")}
    (out / "report.md").unlink()
    assert science.main(["--smoke", "--report-only", "--out", str(out), f"run.root={root}"]) == 0
    assert markers == {p: p.stat().st_mtime_ns for p in (root / "trials").glob("*/*/_stage.json")}
    again = (out / "report.md").read_text()
    assert [line for line in again.splitlines() if line.startswith("VERDICT ")] == verdict_lines
    # the rebuilt report still says how long the trials took, from the run that ran them (not from itself)
    ran = float(re.search(r"this invocation ([0-9.]+) min", text).group(1))
    assert f"the last invocation that ran trials took {ran:.1f} min" in again
    assert science.last_invocation(root, "lawm-science")[0] == pytest.approx(ran, abs=0.05)

def test_a_failed_or_cut_short_trial_is_reported_not_averaged(tmp_path):
    """collect() reads the runner's markers: a marker cut short mid-write reads as 'not done', a trial that failed or
    did not run gives no numbers at all; the report lists those trials and no verdict passes on missing numbers."""
    import json

    trials = science.grid(seeds=(0,), capacities=(science.MATCHED,))
    done, cut, failed_trial = "sparse-0.03-s0", "none-s0", "noisy-1e-4-s0"
    for name, text in ((done, json.dumps({"stage": "eval_leakage", "outputs": {"metrics": {
            "leakage/ratio": 3.0, "leakage/vs_copy": True}}})), (cut, '{"stage": "eval_leak'),
            (failed_trial, json.dumps({"stage": "eval_leakage", "outputs": {"metrics": {"leakage/ratio": 9.0}}}))):
        (tmp_path / "trials" / name / "eval_leakage").mkdir(parents=True)
        (tmp_path / "trials" / name / "eval_leakage" / "_stage.json").write_text(text)
    status = {name: 0 for name in trials} | {failed_trial: 1, "discrete-64-s0": "not run"}
    rows = science.collect(tmp_path, trials, status)
    by = {r["trial"]: r for r in rows}
    assert by[done]["leakage/ratio"] == 3.0 and "leakage/vs_copy" not in by[done]  # a bool is not a number
    assert "leakage/ratio" not in by[cut] and by[cut]["status"] == "ok"
    assert by[failed_trial]["status"] == "exit 1" and "leakage/ratio" not in by[failed_trial]
    found = science.verdicts(rows)
    assert not found["leakage"][0] and "nan" in found["leakage"][1]
    blocks = science.report_blocks(rows, found, out=tmp_path / "out", header=["h"])
    failed = [b for b in blocks if b[0] == "table" and b[1] == "Failed trials"]
    assert failed and failed[0][3] == [[failed_trial, "exit 1"], ["discrete-64-s0", "not run"]]
    assert any(b[0] == "text" and b[1].startswith("VERDICT leakage: not reproduced — ") for b in blocks)
