"""Pictures for people: training curves and frame strips, saved as PNG (and logged to MLflow by the caller)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVES = ("loss", "pred_loss", "reg_loss", "mlp_l2", "cross_attention_l2", "pixel_l1", "data_wait_share")


def plot_progress(jsonl: Path, png: Path, title: str = "") -> Path:
    """Curves of the metrics logged in a progress.jsonl (see jobs/ray_train.py), one panel per metric."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    logs = [r for r in rows if r.get("event") == "log"]
    keys = [k for k in CURVES if any(k in r for r in logs)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = sorted((r["step"], r[key]) for r in logs if key in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        if key.endswith("loss") or key.endswith("l2"):
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def frame_grid(rows: dict[str, np.ndarray], png: Path, title: str = "") -> Path:
    """rows: name → (T, H, W, 3) floats in [0, 1]; one labelled row of frames each."""
    names = list(rows)
    t = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(names), t, figsize=(1.2 * t, 1.3 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j in range(t):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(rows[name]):
                ax.imshow(np.clip(rows[name][j], 0, 1))
        axes[i][0].set_title(name, fontsize=7, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def trajectories(manifests: dict[str, str], png: Path) -> Path:
    """Top-down paths of every simulated episode: the Husky's (x, y) and the Panda's end-effector (x, y)."""
    import pandas as pd

    keys = {"nav": "pose", "manip": "ee_pos"}
    fig, axes = plt.subplots(1, len(manifests), figsize=(4 * len(manifests), 4), squeeze=False)
    for ax, (domain, manifest) in zip(axes[0], manifests.items()):
        for path in pd.read_parquet(manifest)["path"]:
            sidecar = Path(path).with_name(Path(path).stem + ".labels.npz")
            if sidecar.exists():
                with np.load(sidecar) as npz:
                    xy = npz[keys[domain]][:, :2]
                ax.plot(xy[:, 0], xy[:, 1], lw=1)
                ax.plot(xy[:1, 0], xy[:1, 1], "k.", ms=4)
        ax.set_title(f"{domain}: {keys[domain]} (x, y)")
        ax.set_aspect("equal", "datalim")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
