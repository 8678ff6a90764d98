"""Norm-layer registry: ``make_norm(name, num_features, **kwargs)`` for every 2-D norm a backbone can use."""

import torch.nn as nn

from .checks import check_positive_int
from .switchnorm import SwitchNorm2d, SyncSwitchNorm2d

NORMS = ("sn", "syncsn", "bn", "syncbn", "gn", "in", "ln")

_SN_OPTIONS = ("eps", "momentum", "using_bn", "using_moving_average", "last_gamma")
_OPTIONS = {
    "sn": _SN_OPTIONS,
    "syncsn": _SN_OPTIONS + ("process_group",),
    "bn": ("eps", "momentum"),
    "syncbn": ("eps", "momentum", "process_group"),
    "gn": ("eps", "groups"),
    "in": ("eps",),
    "ln": ("eps",),
}


def default_groups(num_channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``num_channels`` that is at most ``max_groups`` (32 for the usual GroupNorm)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def make_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the 2-D norm layer ``name`` (one of ``NORMS``) over ``num_features`` channels.

    Accepted options per norm (anything else raises ``ValueError`` naming the option):
    ``sn``/``syncsn``: the ``SwitchNorm2d`` arguments (+ ``process_group`` for ``syncsn``);
    ``bn``/``syncbn``: ``eps``, ``momentum`` (PyTorch convention) (+ ``process_group``);
    ``gn``: ``eps``, ``groups`` (default: largest divisor of C that is <= 32, must divide C);
    ``in`` (``InstanceNorm2d(affine=True)``) and ``ln`` (``GroupNorm(1, C)``: LayerNorm over C,H,W): ``eps``.
    """
    if name not in _OPTIONS:
        raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(NORMS)}")
    check_positive_int(f"norm {name!r}: num_features", num_features)
    unknown = sorted(set(kwargs) - set(_OPTIONS[name]))
    if unknown:
        sn_only = [k for k in unknown if k in _OPTIONS["syncsn"]]
        hint = f" ({', '.join(sn_only)}: Switchable Normalization options only)" if sn_only else ""
        raise ValueError(
            f"norm {name!r} does not accept option(s) {', '.join(unknown)}{hint}; "
            f"it accepts: {', '.join(_OPTIONS[name])}"
        )
    if name == "sn":
        return SwitchNorm2d(num_features, **kwargs)
    if name == "syncsn":
        return SyncSwitchNorm2d(num_features, **kwargs)
    if name == "bn":
        return nn.BatchNorm2d(num_features, **kwargs)
    if name == "syncbn":
        return nn.SyncBatchNorm(num_features, **kwargs)
    if name == "gn":
        groups = kwargs.pop("groups", None)
        groups = default_groups(num_features) if groups is None else groups
        if not isinstance(groups, int) or groups <= 0 or num_features % groups:
            raise ValueError(f"norm 'gn': groups={groups!r} must be a positive divisor of C={num_features}")
        return nn.GroupNorm(groups, num_features, **kwargs)
    if name == "in":
        return nn.InstanceNorm2d(num_features, affine=True, **kwargs)
    return nn.GroupNorm(1, num_features, **kwargs)  # "ln": LayerNorm over C, H, W
