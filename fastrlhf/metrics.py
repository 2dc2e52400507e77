"""Run metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard or
Weights & Biases when installed and asked for, and drawn as PNG curves at the end.

Rows look like ``{"step": 10, "split": "train", "loss": 1.23, "lr": 1e-4, ...}``. The JSONL
file is the source of truth: plots are redrawn from it, so a resumed run (which first
drops the rows written after its checkpoint, see ``truncate_after``) plots one clean curve.
matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible instead of crashing
    return v


class MetricsLogger:
    """Appends metric rows to ``<run_dir>/metrics.jsonl`` (and TensorBoard / W&B if enabled)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "fastrlhf",
        run_name: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError as e:  # tensorboard is optional
                warnings.warn(
                    f"logging.tensorboard=true but tensorboard is unavailable: {e}", stacklevel=2
                )
        if wandb:
            try:
                import wandb as _wandb

                self._wandb = _wandb.init(
                    project=wandb_project, name=run_name, config=config, dir=str(self.run_dir)
                )
            except ImportError as e:
                warnings.warn(f"logging.wandb=true but wandb is unavailable: {e}", stacklevel=2)

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        row.update({k: _jsonable(float(v)) for k, v in values.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file (a torn last line from a kill is skipped)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_after(path: str | Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run re-logs them); atomic rewrite."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_metrics(metrics_path: str | Path, out_dir: str | Path, title: str = "") -> list[Path]:
    """One PNG per split (train, eval, ...) with a panel per numeric metric; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for k, v in r.items():
            if k in ("step", "split", "time") or not isinstance(v, (int, float)):
                continue
            series[r.get("split", "train")][k].append((r["step"], float(v)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, metrics in series.items():
        names = sorted(metrics)
        cols = min(3, len(names))
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            xs, ys = zip(*metrics[name])
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names) :]:
            ax.set_visible(False)
        fig.suptitle(f"{title} {split}".strip())
        fig.tight_layout()
        path = out_dir / f"{split}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
