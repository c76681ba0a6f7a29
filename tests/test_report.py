"""The report stage: read back from real MLflow runs made by the real runner, rendered by headless Chromium
(Debian's `chromium` package; CI installs it with `apt-get install -y chromium`)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.config import PipelineConfig, RunConfig
from jobs.report import ReportConfig, rendered_dom, report_inputs, run_report, screenshot
from jobs.runner import Stage, StageContext, run_pipeline

FAKE = {
    "train_lam": {"val_one_step_error": 0.0291, "val_copy_error": 0.0532},
    "eval_leakage": {"leakage/error_nocut": 0.0312, "leakage/error_cut": 0.1617, "leakage/ratio": 5.18,
                     "leakage/vs_copy": 0.934, "leakage/copy_cut": 0.1731, "leakage/pixel_error_cut": 0.2104},
    "eval_transfer": {"transfer/error": 0.0456, "transfer/cycle_error": 0.0479, "transfer/cycle_increase": 0.0504,
                      "transfer/nav/error": 0.0611, "transfer/counterfactual_error": 0.0789},
    "eval_probe": {"probe/r2": 0.612, "probe/r2/agent": 0.437, "probe/r2/camera": 0.787,
                   "probe/r2_shifted_z/agent": -0.021},
}


def _fake_stage(name: str):
    def run(section, ctx: StageContext) -> dict:
        if name == "eval_leakage":  # a picture whose colour the screenshot must show
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            img = np.zeros((120, 200, 3), np.uint8)
            img[..., 0] = 255
            Image.fromarray(img).save(ctx.out_dir / "red.png")
            ctx.log_artifact(ctx.out_dir / "red.png", "plots")
        return {"metrics": FAKE[name]}
    return run


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "run"
    cfg = PipelineConfig(run=RunConfig(root=str(root), name="t", experiment="report-test"))
    stages = [Stage(name, _fake_stage(name)) for name in FAKE]
    stages.append(Stage("report", run_report, inputs=lambda c: report_inputs(list(FAKE))))
    results = run_pipeline(cfg, stages, [s.name for s in stages], echo=lambda m: None)
    assert [r.status for r in results] == ["ran"] * 5
    return root / "report", results[-1].outputs


def test_report_tables_hold_our_numbers_beside_the_papers(report_run):
    out_dir, outputs = report_run
    md = Path(outputs["report_md"]).read_text()
    for title in ("Table 1", "Table 2", "Table S1", "Table S2", "Linear probes"):
        assert f"## {title}" in md
    assert "| 0.031 | 0.162 | 5.18 | 0.93 | 0.173 |" in md  # leakage row, read back from MLflow
    assert "0.28 / 0.66 (×2.3)" in md  # the paper's sparse low-capacity leakage, beside ours
    assert "0.046 | 0.048 | 0.050" in md  # transfer: error, after cycle, increase
    assert re.search(r"\| in-the-wild \| agent \| 0\.44 \| -0\.02 \|", md)
    assert "noisy beta=" in md  # the model named from train_lam's params
    assert (out_dir / "pictures" / "eval_leakage" / "red.png").exists()
    assert "](pictures/eval_leakage/red.png)" in md


def test_report_html_renders_in_chromium(report_run, tmp_path):
    out_dir, outputs = report_run
    page = Path(outputs["report_html"])
    html = page.read_text()
    assert "data:image/png;base64," in html and "pictures/" not in html.split("<h2>Runs</h2>")[0].split("<img")[1][:40]
    dom = rendered_dom(page)
    assert dom.count("<table") >= 5
    assert "0.162" in dom and "Table 2" in dom
    png = screenshot(page, tmp_path / "report.png", size=(1200, 3000))
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.std() > 10  # not a blank page
    assert (pixels.min(-1) < 128).mean() > 0.002  # some dark text
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 5000  # the inlined picture was decoded and drawn (200 x 120 px of pure red)


def test_report_errors_name_the_stage(tmp_path, report_run):
    out_dir, _ = report_run
    uri = f"sqlite:///{out_dir.parent / 'mlflow.db'}"
    inputs = {name: {"outputs": {}, "mlflow_run_id": "0" * 32} for name in FAKE}
    ctx = StageContext(name="report", out_dir=tmp_path / "report", root=tmp_path, inputs=inputs, seed=0,
                       tracking_uri=uri)
    ctx.out_dir.mkdir()
    with pytest.raises(ValueError, match="MLflow run 0+ of `train_lam` is not in"):
        run_report(ReportConfig(), ctx)
    del inputs["eval_probe"]
    with pytest.raises(ValueError, match=r"needs the runs of \['eval_probe'\]"):
        run_report(ReportConfig(), ctx)
