"""Parameter groups, optimizers and per-iteration learning-rate schedules.

Parameter groups (each keeps its own ``lr`` so a LambdaLR factor applies to all of them):

- ``backbone``: conv / linear weights (ndim > 1), weight decay ``optim.weight_decay``;
- ``no_decay``: every 1-D backbone parameter — norm gamma/beta, biases and PReLU slopes — without
  weight decay (decaying a PReLU slope pushes it towards ReLU-like 0, decaying gamma/beta fights the
  normalisation: common practice, e.g. timm, and what the PReLU paper recommends);
- ``sn_mix``: SwitchNorm mixing logits (``mean_weight`` / ``var_weight``), lr scaled by
  ``optim.sn_lr_scale``, weight decay ``optim.sn_weight_decay`` (0 by default, as decay would pull the
  mixture towards uniform);
- ``head``: the Partial FC class centres, lr scaled by ``optim.head_lr_scale``, weight decay
  ``optim.head_weight_decay`` (default: ``optim.weight_decay``).

Frozen parameters (``requires_grad=False``, e.g. the fixed gamma of the embedding BatchNorm1d) are left out.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SN_MIX_NAMES = ("mean_weight", "var_weight")


def param_groups(backbone: nn.Module, head: nn.Module, optim: dict) -> list[dict]:
    """Split trainable parameters into the named groups described in the module docstring."""
    lr, wd = optim["lr"], optim["weight_decay"]
    head_wd = wd if optim["head_weight_decay"] is None else optim["head_weight_decay"]
    groups = {
        "backbone": {"params": [], "lr": lr, "weight_decay": wd},
        "no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
        "sn_mix": {"params": [], "lr": lr * optim["sn_lr_scale"], "weight_decay": optim["sn_weight_decay"]},
        "head": {"params": [], "lr": lr * optim["head_lr_scale"], "weight_decay": head_wd},
    }
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in SN_MIX_NAMES:
            groups["sn_mix"]["params"].append(param)
        elif param.ndim <= 1:
            groups["no_decay"]["params"].append(param)
        else:
            groups["backbone"]["params"].append(param)
    groups["head"]["params"] = [p for p in head.parameters() if p.requires_grad]
    return [dict(group, name=name) for name, group in groups.items() if group["params"]]


def build_optimizer(groups: list[dict], optim: dict) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over ``groups`` (as from :func:`param_groups`)."""
    if optim["name"] == "sgd":
        return torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"])
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])


def lr_factor(step: int, schedule: dict, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at iteration ``step`` (0-based): linear warmup, then the decay."""
    warmup = schedule["warmup_steps"] + round(schedule["warmup_epochs"] * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    name, floor = schedule["name"], schedule["min_lr_ratio"]
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "poly":
        return floor + (1 - floor) * (1 - progress) ** schedule["power"]
    if name == "step":
        passed = sum(step >= m * steps_per_epoch for m in schedule["milestones"])
        return schedule["gamma"] ** passed
    return 1.0  # constant


def build_schedule(optimizer, schedule: dict, total_steps: int, steps_per_epoch: int):
    """A LambdaLR stepped once per iteration over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, total_steps, steps_per_epoch))
