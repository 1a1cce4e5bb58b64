"""wandb as its users expect it (offline unless told otherwise) plus a local metrics file that always exists."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def start_wandb(wandb_config, job_type: str, config: dict, folder: str | Path):
    """A wandb run, or None when mode is "disabled". Offline runs land in `folder`/wandb for `wandb sync`."""
    if wandb_config.mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        project=wandb_config.project, group=wandb_config.group, job_type=wandb_config.job_type or job_type,
        notes=wandb_config.notes, mode=wandb_config.mode, config=config, dir=str(folder),
        settings=wandb.Settings(console="off"),
    )


class MetricsLog:
    """Appends one JSON line of figures per step to metrics.jsonl and mirrors them to wandb."""

    def __init__(self, path: str | Path, run=None):
        self.path = Path(path)
        self.run = run

    def log(self, figures: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **figures}) + "\n")
        if self.run is not None:
            self.run.log(figures)
