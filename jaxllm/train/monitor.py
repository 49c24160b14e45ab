"""What a person sees of a run: metrics as JSONL, a loss-curve PNG, and wandb (offline unless asked;
imported only when used, as some images lack it)."""
from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

from jaxllm.errors import DataError
from jaxllm.files import atomic_write


class MetricsLog:
    """metrics.jsonl: one JSON object per line ({"step": ..., "loss": ...} or {"step": ..., "val_loss": ...}).
    A non-finite number is written as null: every line stays JSON."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():  # keep what the checkpoint covers; drop steps a crash left behind
            self.records = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write(self.path, "".join(_dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(_dumps(record) + "\n")

    def plot(self, path: Path, title: str = "") -> None:
        """Train and validation loss against step (and a TiDAR model's drafter loss), written to a
        temporary name and renamed. A TiDAR model's train loss is (alpha AR + diffusion) / (1 + alpha);
        its validation loss is the AR half alone."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in (("loss", "train"), ("val_loss", "validation"),
                           ("val_diffusion_loss", "validation, TiDAR drafter")):
            points = [(r["step"], r[key]) for r in self.records if r.get(key) is not None and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), label=label, marker=None if key == "loss" else "o")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write(path, buffer.getvalue())


def _dumps(record: dict) -> str:
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (what a kill during a write leaves) is
    dropped; any other line that is not a JSON object with a step is a one-line DataError."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer step")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[number:]):
                break  # the torn last line of an interrupted write
            raise DataError(f"{str(path)}:{number}: not a metrics record ({e}); the file is corrupt: repair or "
                            f"delete that line to resume") from None
        records.append(record)
    return records


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
