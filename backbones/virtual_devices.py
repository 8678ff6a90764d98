"""Virtual devices: batch statistics per 1/V of a batch, as V data-parallel processes would compute them.

The SN paper's table varies the images per GPU, i.e. the samples behind each batch statistic. With
``split_batch_statistics(model, V)`` one process reproduces V processes of ``batch / V`` images each:
sample ``k`` of a batch belongs to virtual device ``k % V`` (the order in which the training sampler deals
a global batch to processes), and every batch statistic (BatchNorm's and SN's BN term) is taken per
device. Running statistics follow device 0, as process 0's do under DDP without buffer broadcast (what the
engine saves). Per-sample norms (GN, IN, LN) and the synchronised norms (SyncSN, SyncBN, whose statistics
cover the whole batch anyway) are left as they are. Eval mode is unaffected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_positive_int
from .switchnorm import SwitchNorm2d, SyncSwitchNorm2d, check_device_split


class _SplitBatchNorm:
    """Mixin for ``nn.BatchNorm1d/2d``: in training with ``virtual_devices`` V > 1, BatchNorm per device."""

    virtual_devices: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        devices = self.virtual_devices
        if not (self.training and devices > 1):
            return super().forward(x)
        n, c = x.shape[:2]
        check_device_split(self, n, devices)
        # (N, C, ...) -> (N/V, V*C, ...): channel v*C + c holds channel c of device v's samples
        grouped = x.reshape(n // devices, devices * c, *x.shape[2:])
        running = self.track_running_stats and self.running_mean is not None
        rate = self._update_rate() if running else 0.0
        mean, var = ((self.running_mean.repeat(devices), self.running_var.repeat(devices)) if running
                     else (None, None))
        weight = self.weight.repeat(devices) if self.weight is not None else None
        bias = self.bias.repeat(devices) if self.bias is not None else None
        y = F.batch_norm(grouped, mean, var, weight, bias, True, rate, self.eps)
        if running:
            with torch.no_grad():
                self.running_mean.copy_(mean[:c])
                self.running_var.copy_(var[:c])
        return y.reshape(x.shape)

    def _update_rate(self) -> float:
        """nn.BatchNorm's momentum for this step (counting it), cumulative average when momentum is None."""
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_devices={self.virtual_devices}"


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (same state dict) with batch statistics per virtual device in training."""


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same state dict) with batch statistics per virtual device in training."""


_SPLIT = {nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d}


def split_batch_statistics(model: nn.Module, devices: int, embedding: bool = True) -> nn.Module:
    """Make every batch statistic of ``model`` per virtual device (in place; returns ``model``).

    ``nn.BatchNorm2d`` layers become :class:`SplitBatchNorm2d` (weights and buffers kept), SwitchNorm2d
    layers take their BN term per device; ``embedding=False`` leaves the ``nn.BatchNorm1d`` layers whole
    (for one image per device, where a per-device BatchNorm1d has no statistics: the engine synchronises
    it over all devices instead). ``devices`` = 1 changes nothing.
    """
    check_positive_int("virtual devices", devices)
    if devices == 1:
        return model
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SwitchNorm2d) and not isinstance(child, SyncSwitchNorm2d):
                child.virtual_devices = devices
            elif type(child) in _SPLIT and (embedding or type(child) is nn.BatchNorm2d):
                setattr(parent, name, _split_copy(child, devices))
    return model


def _split_copy(layer: nn.Module, devices: int) -> nn.Module:
    """The Split version of a BatchNorm layer, sharing its parameters and buffers."""
    split = _SPLIT[type(layer)].__new__(_SPLIT[type(layer)])
    split.__dict__.update(layer.__dict__)
    split.virtual_devices = devices
    return split
