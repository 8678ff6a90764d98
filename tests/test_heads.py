"""Margin heads against an independent float64 formula over the whole angle range, gradients, build_head."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import HEADS, ArcFace, CombinedMargin, CosFace, PartialFC, Softmax, build_head

# (head, scale, m1, m2, m3)
CASES = [
    (ArcFace(), 64.0, 1.0, 0.5, 0.0),
    (ArcFace(scale=32.0, margin=0.3), 32.0, 1.0, 0.3, 0.0),
    (CosFace(), 64.0, 1.0, 0.0, 0.4),
    (CosFace(scale=30.0, margin=0.35), 30.0, 1.0, 0.0, 0.35),
    (CombinedMargin(64.0, 1.0, 0.3, 0.2), 64.0, 1.0, 0.3, 0.2),
    (CombinedMargin(64.0, 0.9, 0.4, 0.15), 64.0, 0.9, 0.4, 0.15),
    (CombinedMargin(32.0, 1.35, 0.25, 0.1), 32.0, 1.35, 0.25, 0.1),
    (CombinedMargin(30.0, 2.0, 0.0, 0.0), 30.0, 2.0, 0.0, 0.0),
    (CombinedMargin(16.0, 4.0, 0.0, -0.1), 16.0, 4.0, 0.0, -0.1),  # delta > 2.33: the 1 - cos(delta) case
    (CombinedMargin(64.0, 0.8, 0.0, 0.0), 64.0, 0.8, 0.0, 0.0),  # never passes pi
    (Softmax(), 1.0, 1.0, 0.0, 0.0),
    (Softmax(scale=30.0), 30.0, 1.0, 0.0, 0.0),
]
IDS = [f"{type(c[0]).__name__}-{c[1]}-{c[2]}-{c[3]}-{c[4]}" for c in CASES]


def reference_target(cos: np.ndarray, m1: float, m2: float, m3: float) -> np.ndarray:
    """float64 target logit (before scaling), written from the formulas in the module docs / REFERENCE."""
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    out = np.cos(m1 * theta + m2) - m3
    if m1 == 1.0:  # ArcFace / CosFace: insightface's rule, cos(theta) - m*sin(m) once theta > pi - m
        beyond = cos < np.cos(np.pi - m2)
        return np.where(beyond, cos - m2 * np.sin(m2) - m3, out)
    limit = (np.pi - m2) / m1
    if limit >= np.pi:
        return out
    delta = np.pi - limit
    penalty = max(delta * np.sin(delta), 1.0 - np.cos(delta))
    return np.where(theta > limit, cos - penalty - m3, out)


def _angle_grid(n: int = 721) -> torch.Tensor:
    cos = torch.cos(torch.linspace(0.0, math.pi, n, dtype=torch.float64)).float()
    cos[0], cos[-1] = 1.0, -1.0
    return cos


@pytest.mark.parametrize(("head", "scale", "m1", "m2", "m3"), CASES, ids=IDS)
def test_logits_match_float64_reference_over_all_angles(head, scale, m1, m2, m3):
    cos = _angle_grid()
    n = cos.numel()
    cosine = torch.stack([cos, cos.flip(0), torch.full_like(cos, 0.25)], dim=1)  # (n, 3)
    labels = torch.zeros(n, dtype=torch.long)
    labels[1::3] = -1  # rows without a target in this shard: untouched
    labels[2::3] = 2
    logits = head(cosine, labels)
    assert logits.dtype == torch.float32 and logits.shape == cosine.shape
    c64 = cosine.double().numpy()
    expected = scale * c64
    rows = np.nonzero(labels.numpy() >= 0)[0]
    cols = labels.numpy()[rows]
    expected[rows, cols] = scale * reference_target(c64[rows, cols], m1, m2, m3)
    np.testing.assert_allclose(logits.double().numpy(), expected, rtol=0, atol=2e-5 * scale + 1e-6)


@pytest.mark.parametrize(("head", "scale", "m1", "m2", "m3"), CASES, ids=IDS)
def test_target_logit_never_increases_with_the_angle(head, scale, m1, m2, m3):
    cos = _angle_grid(4001)
    target = head(cos[:, None], torch.zeros(cos.numel(), dtype=torch.long))[:, 0].double()
    assert torch.all(target[1:] - target[:-1] <= 1e-6 * scale)


@pytest.mark.parametrize(("head", "scale", "m1", "m2", "m3"), CASES, ids=IDS)
def test_gradients_match_float64_reference_inside_the_range(head, scale, m1, m2, m3):
    theta = torch.linspace(0.05, math.pi - 0.05, 157, dtype=torch.float64)
    limit = (math.pi - m2) / m1
    theta = theta[(theta - limit).abs() > 0.02]  # the rule beyond pi has a step at the limit
    cos = torch.cos(theta).float().requires_grad_()
    head(cos[:, None], torch.zeros(cos.numel(), dtype=torch.long)).sum().backward()
    c64 = cos.detach().double().requires_grad_()
    t = torch.arccos(c64)
    ref = torch.cos(m1 * t + m2) - m3
    if limit < math.pi:
        delta = math.pi - limit
        ref = torch.where(t > limit, c64 - m3 - max(delta * math.sin(delta), 1 - math.cos(delta)), ref)
    (scale * ref).sum().backward()
    torch.testing.assert_close(cos.grad.double(), c64.grad, rtol=2e-3, atol=2e-3 * scale)


@pytest.mark.parametrize(("head", "scale", "m1", "m2", "m3"), CASES, ids=IDS)
def test_gradients_finite_at_the_boundaries(head, scale, m1, m2, m3):
    eps = torch.finfo(torch.float32).eps
    cos = torch.tensor([1.0, -1.0, 1.0 - eps, -1.0 + eps, 1.0 + eps, -1.0 - eps, 0.0]).requires_grad_()
    logits = head(cos[:, None], torch.zeros(7, dtype=torch.long))
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert torch.isfinite(cos.grad).all()
    # through normalised vectors that coincide with / oppose the class centre
    w = torch.randn(3, 16)
    x = torch.cat([w[:1], -w[1:2], w[2:] * 3]).requires_grad_()
    cosine = F.linear(F.normalize(x), F.normalize(w))
    loss = F.cross_entropy(head(cosine, torch.tensor([0, 1, 2])), torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("head", "scale", "m1", "m2", "m3"), CASES[:9:2], ids=IDS[:9:2])
def test_autocast_keeps_margin_maths_in_float32(head, scale, m1, m2, m3, dtype):
    torch.manual_seed(0)
    w = torch.randn(5, 32)
    x = torch.cat([w[:2], -w[2:3], torch.randn(3, 32)]).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, -1, 4])
    with torch.autocast("cpu", dtype=dtype):
        cosine = F.linear(F.normalize(x), F.normalize(w))
        assert cosine.dtype == dtype
        logits = head(cosine, labels)
    assert logits.dtype == torch.float32
    expected = head(cosine.detach().float(), labels)
    torch.testing.assert_close(logits, expected)
    F.cross_entropy(logits[labels >= 0], labels[labels >= 0]).backward()
    assert torch.isfinite(x.grad).all()


def test_margin_only_on_target_and_inputs_untouched():
    cosine = torch.full((2, 4), 0.5)
    before = cosine.clone()
    logits = ArcFace()(cosine, torch.tensor([3, -1]))
    assert torch.equal(cosine, before)
    assert torch.allclose(logits[0, :3], torch.full((3,), 32.0)) and torch.allclose(logits[1], 64 * before[1])
    assert logits[0, 3] == pytest.approx(64 * math.cos(math.acos(0.5) + 0.5), abs=1e-4)


def test_head_errors():
    with pytest.raises(ValueError, match="labels"):
        ArcFace()(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="m1"):
        CombinedMargin(64.0, 0.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="m2"):
        CombinedMargin(64.0, 1.0, 4.0, 0.0)
    with pytest.raises(ValueError, match="scale"):
        CosFace(scale=-1.0)


def test_build_head_types_and_defaults():
    assert set(HEADS) == {"arcface", "cosface", "combined", "softmax"}
    pfc = build_head({"type": "arcface"}, embedding_size=8, num_classes=5)
    assert isinstance(pfc, PartialFC) and isinstance(pfc.head, ArcFace)
    assert (pfc.head.scale, pfc.head.m2, pfc.sample_rate) == (64.0, 0.5, 1.0)
    cos = build_head({"type": "cosface"}, embedding_size=8, num_classes=5).head
    assert isinstance(cos, CosFace) and (cos.scale, cos.m3) == (64.0, 0.4)
    comb = build_head({"type": "combined", "m1": 0.9, "m2": 0.4, "m3": 0.15, "scale": 32, "sample_rate": 0.5},
                      embedding_size=8, num_classes=5)
    got = (comb.head.scale, comb.head.m1, comb.head.m2, comb.head.m3, comb.sample_rate)
    assert got == (32, 0.9, 0.4, 0.15, 0.5)
    soft = build_head({"type": "softmax", "margin": 0.5, "m1": 2.0}, embedding_size=8, num_classes=5)
    assert isinstance(soft.head, Softmax) and soft.head.scale == 64.0  # other types' keys are ignored
    full = {"type": "arcface", "scale": 30.0, "margin": 0.3, "m1": 1.0, "m2": 0.5, "m3": 0.0,
            "sample_rate": None}
    assert build_head(full, embedding_size=8, num_classes=5).head.m2 == 0.3


def test_build_head_errors():
    with pytest.raises(ValueError, match="'sphereface'.*arcface, cosface, combined, softmax"):
        build_head({"type": "sphereface"}, embedding_size=8, num_classes=5)
    with pytest.raises(ValueError, match="'margins'.*sample_rate"):
        build_head({"type": "arcface", "margins": 0.5}, embedding_size=8, num_classes=5)
    with pytest.raises(ValueError, match="head.scale"):
        build_head({"type": "arcface", "scale": "big"}, embedding_size=8, num_classes=5)
    with pytest.raises(ValueError, match="sample_rate"):
        build_head({"type": "arcface", "sample_rate": 0.0}, embedding_size=8, num_classes=5)
