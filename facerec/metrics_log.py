"""Training output for people and programs: tqdm progress, ``metrics.jsonl``, TensorBoard scalars."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per logged step to ``<run_dir>/metrics.jsonl`` and mirrors numbers to
    TensorBoard (``<run_dir>/tensorboard``). Disabled (no files, no bar) on ranks other than 0.

    ``resume_step``: records after this step (written by a run that died before its next checkpoint)
    are dropped, so the file describes one consistent history.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int = 0,
                 total_steps: int = 0, progress: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=resume_step, desc="train", unit="step",
                            dynamic_ncols=True, smoothing=0.05)

    def log(self, step: int, **values) -> None:
        """Record ``values`` (numbers, or dicts of numbers, e.g. verification results) at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        for key, value in _flatten(values):
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def progress(self, step: int, **shown) -> None:
        """Move the progress bar to ``step`` and show ``shown`` (e.g. loss, lr, img/s) beside it."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()},
                                 refresh=False)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar (rank 0 only)."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # an unreadable (torn) line is dropped


def _flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value
