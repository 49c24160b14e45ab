"""What a person sees of a run: metrics as JSONL, a loss-curve PNG, and wandb (offline unless asked;
imported only when used, as some images lack it)."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

from jaxllm.files import atomic_write


class MetricsLog:
    """metrics.jsonl: one JSON object per line ({"step": ..., "loss": ...} or {"step": ..., "val_loss": ...})."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():  # keep what the checkpoint covers; drop steps a crash left behind
            lines = self.path.read_text().splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, path: Path, title: str = "") -> None:
        """Train and validation loss against step, written to a temporary name and renamed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in self.records if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write(path, buffer.getvalue())


class Wandb:
    """wandb in the mode asked for (WANDB_MODE, when set, wins); a no-op when disabled or absent."""

    def __init__(self, mode: str, project: str, run_dir: Path, config: dict):
        os.environ.setdefault("WANDB_MODE", mode)
        self.run = None
        if os.environ["WANDB_MODE"] == "disabled":
            return
        try:
            import wandb
        except ImportError:
            print("wandb is not installed: skipping wandb logging (pip install wandb)", file=sys.stderr)
            return
        self.run = wandb.init(project=project, dir=str(run_dir), config=config, name=Path(run_dir).name)

    def log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
