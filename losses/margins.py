"""Margin heads: turn cosines between embeddings and class centres into logits.

Every head is ``head(cosine, labels) -> logits``: ``cosine`` is (B, C), ``labels`` (B,) holds each
row's target column, or -1 when the row has no target among these columns (Partial FC shards).
The margin is applied to the target column only, and all margin maths runs in float32 (also under
bf16/fp16 autocast); the logits come back as float32.

All margins are one function, the combined margin ``s * (cos(m1*theta + m2) - m3)``:
ArcFace = (1, m, 0), CosFace = (1, 0, m), plain (normalised) softmax = (1, 0, 0).

Beyond-pi rule.  ``cos(m1*theta + m2)`` stops decreasing once ``m1*theta + m2`` passes pi, i.e. for
``theta > theta_max = (pi - m2) / m1``; the target logit would then *grow* with the angle and reward
moving away from the class centre.  There, as for ArcFace in insightface, the target logit becomes
``cos(theta) - m3 - p`` with a constant penalty ``p``.  ArcFace's classic rule is ``p = m*sin(m)``:
the additive angle at the turning point (``delta = pi - theta_max = m``) times ``sin(theta_max)``.  We
use the same expression for any (m1, m2): ``p = delta*sin(delta)`` with ``delta = pi - theta_max``
(exactly ArcFace's ``m*sin(m)`` when m1 = 1), raised to ``1 - cos(delta)`` when that is larger (only
for delta > ~2.33 rad) so that the logit never jumps *up* at theta_max: the target logit is then
non-increasing in theta over the whole [0, pi] for every valid (m1, m2, m3).
"""
import math

import torch
from torch import nn

# (1 - c) * (1 + c) is clamped to this before the square root: sin(theta) >= 1e-6, so the gradient of
# theta = atan2(sin, cos) stays finite at cosine = +-1 (the clamp passes no gradient there).
_MIN_SIN_SQUARED = 1e-12


def combined_margin_logits(
    cosine: torch.Tensor, labels: torch.Tensor, scale: float, m1: float, m2: float, m3: float
) -> torch.Tensor:
    """Float32 logits ``scale * cosine`` with the target column replaced by ``cos(m1*theta + m2) - m3``
    (times scale), and the module docstring's monotone rule beyond ``theta_max``; rows with label -1
    get no margin."""
    if cosine.ndim != 2 or labels.shape != cosine.shape[:1]:
        raise ValueError(
            f"expected cosine (B, C) and labels (B,), got {tuple(cosine.shape)} and {tuple(labels.shape)}"
        )
    with torch.autocast(device_type=cosine.device.type, enabled=False):
        cosine = cosine.float()
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        target = _margin_target(cosine[rows, cols], m1, m2, m3)
        return cosine.index_put((rows, cols), target) * scale


def _margin_target(c: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    if m1 == 1.0 and m2 == 0.0:
        return c - m3
    c = c.clamp(-1.0, 1.0)
    sin = torch.sqrt(((1.0 - c) * (1.0 + c)).clamp_min(_MIN_SIN_SQUARED))
    theta = torch.atan2(sin, c)  # accurate over the whole range, unlike acos near +-1
    target = torch.cos(m1 * theta + m2) - m3
    theta_max = (math.pi - m2) / m1
    if theta_max < math.pi:
        delta = math.pi - theta_max
        penalty = max(delta * math.sin(delta), 1.0 - math.cos(delta))
        target = torch.where(c < math.cos(theta_max), c - m3 - penalty, target)
    return target


class CombinedMargin(nn.Module):
    """Combined margin head ``scale * (cos(m1*theta + m2) - m3)`` on the target class.

    Requires scale > 0, m1 > 0 and 0 <= m2 < pi (so the logit decreases from theta = 0); m3 is free.
    """

    def __init__(self, scale: float, m1: float, m2: float, m3: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not m1 > 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {m2}")
        self.scale, self.m1, self.m2, self.m3 = float(scale), float(m1), float(m2), float(m3)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return combined_margin_logits(cosine, labels, self.scale, self.m1, self.m2, self.m3)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


class ArcFace(CombinedMargin):
    """Additive angular margin ``scale * cos(theta + margin)`` (Deng et al. 2019), theta + m > pi handled
    by insightface's ``cos(theta) - m*sin(m)``."""

    def __init__(self, scale: float = 64.0, margin: float = 0.5) -> None:
        super().__init__(scale, 1.0, margin, 0.0)


class CosFace(CombinedMargin):
    """Additive cosine margin ``scale * (cos(theta) - margin)`` (Wang et al. 2018)."""

    def __init__(self, scale: float = 64.0, margin: float = 0.4) -> None:
        super().__init__(scale, 1.0, 0.0, margin)


class Softmax(CombinedMargin):
    """No margin: plain logits ``scale * cosine`` (labels are ignored).  With the default scale 1.0 the
    logits are the raw cosines, whose [-1, 1] range keeps the softmax nearly uniform over many classes;
    normalised-softmax training uses a scale such as 30-64 (``build_head`` defaults to 64)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale, 1.0, 0.0, 0.0)
