"""Activation checkpointing of backbone stages: keep only each stage's input in the forward pass and
recompute the stage in the backward pass (``torch.utils.checkpoint``, non-reentrant).

torch's checkpoint re-runs the stage's forward as it is, so norms with running statistics (BN, SN)
would update them a second time during the recomputation; :func:`run_stages` restores every buffer of
the stage after it is recomputed, so a step updates them exactly once, as without checkpointing.
"""
import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class BuffersRestored:
    """Context manager putting every buffer of ``module`` back to its value at entry when the block ends.

    Reusable and nestable: a backward pass may recompute a stage more than once (SyncSwitchNorm2d's
    backward runs a nested ``autograd.grad`` that unpacks the checkpointed tensors again)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def __enter__(self) -> None:
        self.saved.append([(buffer, buffer.clone()) for buffer in self.module.buffers()])

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buffer, value in self.saved.pop():
                buffer.copy_(value)


def run_stages(stages: Sequence[nn.Module], x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``x`` through ``stages`` in order; with ``checkpointed`` each stage's activations are recomputed
    in backward instead of kept (its buffers, e.g. running statistics, are updated by the forward only)."""
    for stage in stages:
        if checkpointed:
            x = checkpoint(stage, x, use_reentrant=False,
                           context_fn=lambda s=stage: (contextlib.nullcontext(), BuffersRestored(s)))
        else:
            x = stage(x)
    return x
