"""Backbones with pluggable normalization, Switchable Normalization first among them."""
from .build import BACKBONES, build_backbone
from .convert import convert_published_sn
from .norms import NORMS, make_norm
from .switchnorm import SwitchNorm1d, SwitchNorm2d, SyncSwitchNorm2d, hard_select, sn_mixture_weights
from .virtual_devices import split_batch_statistics

__all__ = [
    "BACKBONES",
    "NORMS",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SyncSwitchNorm2d",
    "build_backbone",
    "convert_published_sn",
    "hard_select",
    "make_norm",
    "sn_mixture_weights",
    "split_batch_statistics",
]
