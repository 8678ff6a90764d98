"""The run folder (``train.output_dir``): one run at a time in it, and a finished or abandoned run is
moved aside, never overwritten."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.yaml")


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` held from :meth:`acquire` to :meth:`release`.

    The file names the holder (PID and host) for a refused run's message. The kernel drops the lock when
    its holder dies, however it dies, so a lock left by a dead process is simply taken over."""

    def __init__(self, run_dir, option: str = "train.output_dir"):
        self.run_dir = Path(run_dir)
        self.option = option  # how the folder was given, for the refusal's message
        self.path = self.run_dir / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        """Take the lock; ValueError naming the holder when another process has it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 (held until release(); "a+" keeps the holder's text)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise ValueError(f"{self.option} {self.run_dir} is in use by {holder} (lock {self.path}): "
                             f"wait for that run to end, stop it, or choose another {self.option}"
                             ) from None
        file.seek(0)
        file.truncate()
        file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # drops the lock
            self._file = None


def move_previous_run(run_dir) -> Path | None:
    """Move a previous run's files (``RUN_FILES``) from ``run_dir`` into ``run_dir/previous-<UTC time>/``;
    returns that folder, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir / f"previous-{stamp}"
    number = 1
    while target.exists():
        number += 1
        target = run_dir / f"previous-{stamp}-{number}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target
