"""SIGINT and SIGTERM as a request to stop at the next step boundary, the same step on every process."""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Within ``with StopRequest(device):`` SIGINT and SIGTERM only set :attr:`received` (the signal's
    name); the loop asks :meth:`requested` at each step. A second signal acts as it would without this."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self._restore()

    def requested(self) -> bool:
        """Whether any process received a stop signal (a collective when distributed: every rank calls it)."""
        if not dist.is_initialized():
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "a stop signal to another process"
        return bool(flag.item())
