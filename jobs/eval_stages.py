"""Evaluation stages: eval_leakage, eval_transfer, eval_probe — the trained latent action world model (train_lam) on
held-out clips, every number beside its baselines (copy, zero z, random z, shifted z; see lawm/eval/common.py).

Each stage reads only its declared upstream outputs, writes `<stage>/metrics.json` (the metrics it returns, written
atomically: temp file + rename) and its pictures, and returns the metrics for the stage's MLflow run. Nothing is
written into an upstream stage's folder. Metric keys:
- eval_leakage: `leakage/<name>` in representation space, `leakage/pixel_<name>` through the train_decoder decoder;
- eval_transfer: `transfer/<name>` for in-the-wild clips, `transfer/nav/<name>` for the navigation simulator;
- eval_probe: `probe/r2`, `probe/r2/<target>` for in-the-wild clips, `probe/<domain>/r2[/<target>]` for simulators,
  baselines as `probe/r2_shifted_z[/<target>]` and the reference `probe/r2_frame_change[/<target>]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lawm.checkpoint import load_model
from lawm.config import require
from lawm.eval import leakage, probe, transfer
from lawm.eval.common import FeatureSet, load_features, partner_index
from lawm.models.encoders import EncoderConfig
from lawm.files import atomic_file, atomic_write_json

from jobs.runner import StageContext

SIM_DOMAINS = ("nav", "manip")


@dataclass(kw_only=True)
class EvalLeakageConfig:
    split: str = "val"  # held-out clips
    cut: int = 0  # representation index of the first frame after the cut; 0 = the middle of the clip
    max_clips: int = 256  # a seeded sample when there are more (the demo has 30 val clips)
    pixels: bool = True  # also through the train_decoder decoder (`leakage/pixel_*`)
    picture_pairs: int = 4

    def validate(self) -> None:
        require(self.cut >= 0, "cut", "must be >= 0 (0 = the middle of the clip)")
        require(self.max_clips >= 0 and self.picture_pairs >= 0, "max_clips", "counts must be >= 0")


@dataclass(kw_only=True)
class EvalTransferConfig:
    split: str = "val"
    seconds: float = 2.0  # the paper's horizon; at 4 fps and tubelet 1 (the demo's patch encoder) = 8 latent steps
    context: int = 1  # representations of context before the transferred latents
    # rollouts dominate this stage's time (measured: 90 % of it, 2 s x 8 steps per clip and baseline on 2 CPUs)
    max_clips: int = 256
    max_counterfactuals: int = 8  # counterfactual windows scored (first windows of a video first)
    domains: list[str] = field(default_factory=lambda: ["wild", "nav"])
    gif_pairs: int = 4  # rows of the A | B | B driven by A | counterfactual animation

    def validate(self) -> None:
        require(self.seconds > 0, "seconds", "must be positive")
        require(self.context >= 1, "context", "must be >= 1")
        require(self.max_counterfactuals >= 1, "max_counterfactuals", "must be >= 1")
        require(set(self.domains) <= {"wild", *SIM_DOMAINS}, "domains", "must be among wild, nav, manip")


@dataclass(kw_only=True)
class EvalProbeConfig:
    max_clips: int = 512  # per split
    domains: list[str] = field(default_factory=lambda: ["wild", "nav", "manip"])
    frame_change_dim: int = 256  # the reference probe reads s_t+1 - s_t through a fixed random projection this wide

    def validate(self) -> None:
        require(set(self.domains) <= {"wild", *SIM_DOMAINS}, "domains", "must be among wild, nav, manip")
        require(self.frame_change_dim >= 1, "frame_change_dim", "must be >= 1")


# ------------------------------------------------------------------------------------------------------- helpers


def _features_path(ctx: StageContext, domain: str) -> Optional[str]:
    enc = ctx.inputs["encode"]["outputs"]
    return enc.get("features" if domain == "wild" else f"{domain}_features")


def _encoder(ctx: StageContext):
    from pipelines.encode import make_encoder  # the seeded build that made the cache

    return make_encoder(EncoderConfig(**ctx.inputs["encode"]["outputs"]["encoder"]))


def _finish(ctx: StageContext, metrics: dict, extra: dict | None = None) -> dict:
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:  # a model that predicts NaN (or a zero denominator) is a broken input, not a result
        raise ValueError(f"{ctx.name}: non-finite metrics {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    atomic_write_json(ctx.out_dir / "metrics.json", metrics)
    ctx.log_artifact(ctx.out_dir / "metrics.json")
    return {"metrics_file": str(ctx.out_dir / "metrics.json"), **(extra or {}), "metrics": metrics}


def clip_pixels(shards: str, split: str, keys: list[str], encoder) -> torch.Tensor:
    """The ingest clips of `keys` (in that order) as frames (B, T, 3, H, W), resized as the encoder resizes them."""
    from lawm.data.clips import clip_dataset

    want, found = set(keys), {}
    for sample in clip_dataset(shards, split=split, shuffle=0):
        if sample["key"] in want:
            found[sample["key"]] = encoder.resize(sample["frames"][None])[0]
    missing = sorted(want - set(found))
    if missing:
        raise ValueError(f"{len(missing)} clips of the features are not in the ingest shards {shards}, "
                         f"e.g. {missing[0]}")
    return torch.stack([found[k] for k in keys])


def _to_img(frames: torch.Tensor) -> np.ndarray:
    return frames.clamp(0, 1).permute(0, 2, 3, 1).numpy()


# -------------------------------------------------------------------------------------------------- eval_leakage


def run_eval_leakage(cfg: EvalLeakageConfig, ctx: StageContext) -> dict:
    from jobs.plots import frame_grid

    lam = load_model(ctx.upstream("train_lam", "model")).eval()
    fs = load_features(_features_path(ctx, "wild"), cfg.split, cfg.max_clips, ctx.seed)
    cut = cfg.cut or fs.feats.shape[1] // 2
    partner = partner_index(fs.sources)
    s_a, s_b = fs.feats, fs.feats[partner]
    gen = torch.Generator().manual_seed(ctx.seed)
    preds = leakage.scene_cut(lam, s_a, s_b, cut, partner, gen)
    metrics = leakage.summarize(leakage.leakage_errors(preds, s_a, s_b, cut), "leakage/")
    metrics.update({"leakage/clips": len(fs), "leakage/cut_index": cut})
    outputs: dict = {}
    if cfg.pixels:
        decoder = load_model(ctx.upstream("train_decoder", "model")).eval()
        frames = clip_pixels(ctx.upstream("ingest", "shards"), cfg.split, fs.keys, _encoder(ctx))
        px = leakage.pixel_errors(decoder, preds, s_a, s_b, cut, frames, frames[partner])
        metrics.update(leakage.summarize(px, "leakage/pixel_"))
        if cfg.picture_pairs:
            rows = {}
            with torch.no_grad():
                for i in range(min(cfg.picture_pairs, len(fs))):
                    dec = lambda x: _to_img(leakage.decode_at(decoder, s_a[i:i + 1, :cut], x[i:i + 1])[0])  # noqa: E731
                    j = int(partner[i])
                    u = dec(preds["copy"]).shape[0]
                    true = lambda f: _to_img(f[cut * u:(cut + 1) * u])  # noqa: E731
                    rows[f"pair {i}: A before | A next | pred no cut | B next | pred cut | copy"] = np.concatenate(
                        [_to_img(frames[i, cut * u - u:cut * u]), true(frames[i]), dec(preds["nocut"]),
                         true(frames[j]), dec(preds["cut"]), dec(preds["copy"])])
            png = frame_grid(rows, ctx.out_dir / "leakage.png", title="scene cut: first frame after the cut (decoded)")
            ctx.log_artifact(png, "plots")
            outputs["picture"] = str(png)
    return _finish(ctx, metrics, outputs)


# ------------------------------------------------------------------------------------------------- eval_transfer


def _counterfactuals(ctx: StageContext, fs: FeatureSet) -> dict:
    """For every clip of an action-source video whose counterfactual was rendered: the A clip's index, the B clip's
    index (same time window of the scene video) and the counterfactual window — decoded like ingest (fps filter,
    short side scaled, centre crop), resized as the encoder does ("pixels") and encoded ("feats"). The
    counterfactual's context is B's scene with A's action history (the same frames as B's in a video's first window)."""
    import pandas as pd

    from lawm.data.video import stream_frames

    found: dict = {"a": [], "b": [], "pixels": [], "feats": [], "encoder": None}
    if "generate" not in ctx.inputs:  # clips from outside the pipeline (ingest.input): no rendered counterfactuals
        return found
    table = Path(ctx.upstream("generate", "manifest")).parent / "synthetic" / "counterfactuals.parquet"
    if not table.exists():
        return found
    encoder = found["encoder"] = _encoder(ctx)
    by_window = {(m.get("source_path"), m.get("clip_index")): i for i, m in enumerate(fs.meta)}
    for row in pd.read_parquet(table).itertuples():
        clips = [(i, m) for i, m in enumerate(fs.meta) if m.get("source_path") == row.action_source]
        if not clips:
            continue
        fps, size = float(clips[0][1]["fps"]), int(clips[0][1]["width"])
        frames = np.stack(list(stream_frames(row.path, fps, size)))  # (T, H, W, 3) uint8, the whole video
        for i, m in clips:
            j = by_window.get((row.scene, m["clip_index"]))
            first = int(round(m["start"] * fps))
            window = frames[first:first + int(m["frames"])]
            if j is None or len(window) < int(m["frames"]):
                continue
            x = encoder.resize(torch.from_numpy(window).permute(0, 3, 1, 2).float().div(255.0)[None])
            found["a"].append(i)
            found["b"].append(j)
            found["pixels"].append(x[0])
            found["feats"].append(encoder(x)[0].to(fs.feats.dtype))
    return found


def write_gif(columns: dict[str, np.ndarray], path: Path, fps: float, scale: int = 3) -> Path:
    """An animated grid: columns name → (rows, T, H, W, 3) floats in [0, 1]; written to a temp name, then renamed."""
    from PIL import Image, ImageDraw

    names = list(columns)
    rows, t, h, w, _ = columns[names[0]].shape
    cell_h, cell_w, gap, head = h * scale, w * scale, 4, 14
    frames = []
    for k in range(t):
        canvas = Image.new("RGB", (len(names) * (cell_w + gap) + gap, head + rows * (cell_h + gap) + gap), "white")
        draw = ImageDraw.Draw(canvas)
        for c, name in enumerate(names):
            x0 = gap + c * (cell_w + gap)
            draw.text((x0, 1), name, fill="black")
            for r in range(rows):
                img = (np.clip(columns[name][r, k], 0, 1) * 255 + 0.5).astype(np.uint8)
                tile = Image.fromarray(img).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (x0, head + gap + r * (cell_h + gap)))
        frames.append(canvas)
    with atomic_file(path) as fh:
        frames[0].save(fh, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def run_eval_transfer(cfg: EvalTransferConfig, ctx: StageContext) -> dict:
    lam = load_model(ctx.upstream("train_lam", "model")).eval()
    tubelet = int(ctx.inputs["encode"]["outputs"]["tubelet"])
    gen = torch.Generator().manual_seed(ctx.seed)
    metrics, outputs = {}, {}
    for domain in cfg.domains:
        path = _features_path(ctx, domain)
        if not path:
            continue
        fs = load_features(path, cfg.split, cfg.max_clips, ctx.seed)
        prefix = "transfer/" if domain == "wild" else f"transfer/{domain}/"
        fps = float(fs.meta[0]["fps"])
        # 2 s at 4 fps with tubelet 1 = 8 latent steps; clips too short for that (the simulators' 8-frame clips give
        # 7 steps after one context frame) use all they have, and `horizon_steps` says how many.
        horizon = min(transfer.horizon_steps(cfg.seconds, fps, tubelet), fs.feats.shape[1] - cfg.context)
        partner = partner_index(fs.sources)
        out = transfer.transfer_cycle(lam, fs.feats, fs.feats[partner], cfg.context, horizon, partner, gen)
        metrics.update(transfer.summarize(out["errors"], prefix))
        metrics.update({f"{prefix}horizon_steps": horizon, f"{prefix}horizon_seconds": horizon * tubelet / fps,
                        f"{prefix}clips": len(fs)})
        if domain == "wild":
            metrics.update(_counterfactual_metrics(cfg, ctx, lam, fs, horizon, gen, outputs))
    return _finish(ctx, metrics, outputs)


def _counterfactual_metrics(cfg: EvalTransferConfig, ctx: StageContext, lam, fs: FeatureSet, horizon: int,
                            gen: torch.Generator, outputs: dict) -> dict:
    cf = _counterfactuals(ctx, fs)
    if not cf["a"]:
        return {}
    # windows that start a video first: there B's context and the counterfactual's are the same frames
    keep = sorted(range(len(cf["a"])), key=lambda r: (fs.meta[cf["a"][r]]["clip_index"], r))[:cfg.max_counterfactuals]
    cf = {k: [v[r] for r in keep] if isinstance(v, list) else v for k, v in cf.items()}
    s_cf = torch.stack(cf["feats"])
    partner = np.roll(np.arange(len(cf["a"])), -1)  # the next pair's latents (another action source when pairs > 1)
    out = transfer.transfer_cycle(lam, fs.feats[cf["a"]], fs.feats[cf["b"]], cfg.context, horizon, partner, gen,
                                  s_cf=s_cf)
    metrics = {f"transfer/{k}": float(v.mean()) for k, v in out["errors"].items() if k.startswith("counterfactual")}
    metrics["transfer/counterfactual_clips"] = len(cf["a"])
    if cfg.gif_pairs and "train_decoder" in ctx.inputs:
        decoder = load_model(ctx.upstream("train_decoder", "model")).eval()
        rows = list(range(min(cfg.gif_pairs, len(cf["a"]))))
        keys = [fs.keys[cf["a"][r]] for r in rows] + [fs.keys[cf["b"][r]] for r in rows]
        pix = clip_pixels(ctx.upstream("ingest", "shards"), cfg.split, keys, cf["encoder"])
        with torch.no_grad():
            driven = decoder(torch.cat([s_cf[rows, :cfg.context], out["rollouts"]["cf_by_a"][rows]], dim=1))
        frames = driven.shape[1]  # (context + horizon) representations x tubelet frames
        n = len(rows)
        cols = {"A": pix[:n, :frames], "B": pix[n:, :frames], "B by A (decoded)": driven,
                "true CF": torch.stack([cf["pixels"][r] for r in rows])[:, :frames]}
        gif = write_gif({k: v.clamp(0, 1).permute(0, 1, 3, 4, 2).numpy() for k, v in cols.items()},
                        ctx.out_dir / "transfer.gif", fps=float(fs.meta[0]["fps"]))
        ctx.log_artifact(gif, "plots")
        outputs["animation"] = str(gif)
    return metrics


# ---------------------------------------------------------------------------------------------------- eval_probe


def _latents(lam, feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    return torch.cat([lam.infer_latents(feats[i:i + chunk]) for i in range(0, len(feats), chunk)])


def run_eval_probe(cfg: EvalProbeConfig, ctx: StageContext) -> dict:
    lam = load_model(ctx.upstream("train_lam", "model")).eval()
    tubelet = int(ctx.inputs["encode"]["outputs"]["tubelet"])
    metrics: dict = {}
    scatter: dict = {}
    for domain in cfg.domains:
        path = _features_path(ctx, domain)
        if not path:
            continue
        needs = ("agent_pos", "camera") if domain == "wild" else ("action",)
        train = load_features(path, "train", cfg.max_clips, ctx.seed, labels=needs)
        val = load_features(path, "val", cfg.max_clips, ctx.seed, labels=needs)
        steps = train.feats.shape[1] - 1
        targets = lambda f: (probe.synthetic_targets(f.labels, tubelet, steps) if domain == "wild"  # noqa: E731
                             else probe.action_targets(f.labels, tubelet, steps, domain))
        y_train, y_val = targets(train), targets(val)
        # a target that never changes (e.g. a gripper left open throughout) has no variance to explain
        constant = [n for n in y_train if float(y_train[n].var(0).sum()) == 0 or float(y_val[n].var(0).sum()) == 0]
        y_train = {n: v for n, v in y_train.items() if n not in constant}
        y_val = {n: v for n, v in y_val.items() if n not in constant}
        if not y_train:
            raise ValueError(f"eval_probe: every {domain} target is constant ({constant}); nothing to probe")
        z_train, z_val = _latents(lam, train.feats), _latents(lam, val.feats)
        groups = [src for src in train.sources for _ in range(steps)]
        proj = torch.randn(train.feats[0, 0].numel(), cfg.frame_change_dim,
                           generator=torch.Generator().manual_seed(ctx.seed), dtype=torch.float64)
        change = lambda f: probe.per_transition(f.feats.diff(dim=1).flatten(2)) @ proj  # noqa: E731
        shifted = torch.as_tensor(partner_index(val.sources))
        inputs = {"r2": (probe.per_transition(z_train), probe.per_transition(z_val)),
                  "r2_shifted_z": (probe.per_transition(z_train), probe.per_transition(z_val[shifted])),
                  "r2_frame_change": (change(train), change(val))}
        prefix = "probe/" if domain == "wild" else f"probe/{domain}/"
        for kind, (x_train, x_val) in inputs.items():
            fits = probe.ridge_probes(x_train, y_train, groups, x_val, y_val)
            for name, fit in fits.items():
                metrics[f"{prefix}{kind}/{name}"] = fit["r2"]
                if kind == "r2":
                    metrics[f"{prefix}alpha/{name}"] = fit["alpha"]
                    scatter[f"{domain}: {name}"] = (y_val[name][:, 0].numpy(), fit["pred"][:, 0].numpy())
            # the mean is over motion targets only (`light` is reported beside it, not in it)
            metrics[f"{prefix}{kind}"] = float(np.mean([f["r2"] for n, f in fits.items() if n not in probe.NOT_MOTION]))
        metrics.update({f"{prefix}train_clips": len(train), f"{prefix}val_clips": len(val),
                        f"{prefix}constant_targets": len(constant)})
    outputs = {}
    if scatter:
        png = _scatter(scatter, ctx.out_dir / "probe.png")
        ctx.log_artifact(png, "plots")
        outputs["picture"] = str(png)
    return _finish(ctx, metrics, outputs)


def _scatter(panels: dict[str, tuple[np.ndarray, np.ndarray]], png: Path) -> Path:
    from jobs.plots import plt

    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, (true, pred)) in zip(axes.flat, panels.items()):
        ax.scatter(true, pred, s=3, alpha=0.5)
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{name} (first dim)", fontsize=8)
        ax.set_xlabel("true", fontsize=7)
        ax.set_ylabel("probe from z", fontsize=7)
    fig.suptitle("linear probes on held-out clips", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
