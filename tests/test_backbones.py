"""Backbones: every architecture with every norm, shapes, parameter count, head conventions, errors."""
import pytest
import torch
from torch import nn

from backbones import BACKBONES, NORMS, build_backbone

TINY = {"width": 8, "input_size": 32, "embedding_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_input(name: str, norm: str) -> int:
    # InstanceNorm needs more than one spatial element: the stride-32 ImageNet nets leave 1x1 at 32x32.
    return 64 if norm == "in" and not name.startswith("iresnet") else 32


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", BACKBONES)
def test_forward_backward_every_backbone_and_norm(name, norm):
    """Train-mode forward + backward in one process.  syncsn falls back to local statistics and
    nn.SyncBatchNorm to plain batch norm when torch.distributed is not initialised, so both run here."""
    torch.manual_seed(0)
    size = _tiny_input(name, norm)
    model = build_backbone(name, norm=norm, **{**TINY, "input_size": size})
    x = torch.randn(3, 3, size, size)
    out = model(x)
    assert out.shape == (3, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.conv1.weight.grad.abs().sum() > 0  # the gradient reaches the stem
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 16)


@pytest.mark.parametrize("name", ["iresnet18", "resnet18", "preresnet50"])
@pytest.mark.parametrize("size", [48, 64])
def test_other_input_sizes(name, size):
    model = build_backbone(name, norm="bn", **{**TINY, "input_size": size})
    assert model(torch.randn(2, 3, size, size)).shape == (2, 16)


def test_iresnet_layout():
    model = build_backbone("iresnet50", norm="bn", width=8, input_size=48, embedding_size=16)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 14, 3]
    assert model.fc.in_features == 8 * 8 * (48 // 16) ** 2
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert all(getattr(model, f"layer{i}")[0].conv2.stride == (2, 2) for i in range(1, 5))
    assert isinstance(model.prelu, nn.PReLU) and isinstance(model.layer1[0].prelu, nn.PReLU)
    # every 2-D norm comes from the factory; the embedding head keeps BatchNorm1d
    sn = build_backbone("iresnet18", norm="sn", width=8, input_size=32, embedding_size=16)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sn.modules())
    assert type(sn.bn2).__name__ == "SwitchNorm2d" and isinstance(sn.features, nn.BatchNorm1d)


def test_iresnet50_parameter_count_matches_insightface():
    model = build_backbone("iresnet50", norm="bn", embedding_size=512, input_size=112)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 43.6e6) / 43.6e6 < 0.005, count


def test_resnet50_matches_torchvision_layout():
    torchvision = pytest.importorskip("torchvision")
    ours = build_backbone("resnet50", norm="bn", embedding_size=1000, input_size=224)
    reference = torchvision.models.resnet50()
    ours_shapes = [p.shape for n, p in ours.named_parameters() if not n.startswith("features.")]
    assert ours_shapes == [p.shape for p in reference.parameters()]


def test_preresnet_is_preactivation():
    model = build_backbone("preresnet18", norm="bn", **TINY)
    block = model.layer2[0]
    assert isinstance(block.downsample, nn.Conv2d)  # bare projection of the pre-activation
    assert block.sn1.num_features == 8  # the first norm sees the block input
    assert model.sn_out.num_features == 64
    assert build_backbone("resnet18", norm="bn", **TINY).sn_out is None


@pytest.mark.parametrize("norm", ["sn", "bn", "gn", "in", "ln"])
@pytest.mark.parametrize("name", ["iresnet18", "resnet50", "preresnet18"])
def test_zero_init_residual_zeroes_only_the_last_norm_of_each_block(name, norm):
    model = build_backbone(name, norm=norm, zero_init_residual=True, **TINY)
    blocks = [m for m in model.modules() if hasattr(m, "last_norm")]
    assert blocks
    for block in blocks:
        assert torch.count_nonzero(block.last_norm.weight) == 0
        others = [m for n, m in block.named_children() if n.startswith("sn") or n.startswith("bn")]
        assert all(torch.all(m.weight == 1) for m in others if m is not block.last_norm)
    stem = model.bn1 if name.startswith("iresnet") else model.sn1
    assert torch.all(stem.weight == 1)
    default = build_backbone(name, norm=norm, **TINY)
    assert all(torch.all(b.last_norm.weight == 1) for b in default.modules() if hasattr(b, "last_norm"))


def test_zero_init_residual_blocks_start_as_identity():
    torch.manual_seed(0)
    model = build_backbone("resnet18", norm="bn", zero_init_residual=True, **TINY).eval()
    block = model.layer1[0]  # no shortcut projection: output = relu(input) at init
    x = torch.randn(2, 8, 8, 8).relu()
    with torch.no_grad():
        assert torch.equal(block(x), x)


def test_last_gamma_is_not_a_backbone_option():
    """last_gamma is SwitchNorm2d's argument; passed to every norm of a backbone it would zero them all."""
    with pytest.raises(ValueError, match="use zero_init_residual=True"):
        build_backbone("iresnet18", norm="sn", last_gamma=True, **TINY)


@pytest.mark.parametrize("name", ["iresnet18", "resnet18"])
def test_dropout_active_in_training_only(name):
    x = torch.randn(2, 3, 32, 32)
    for p, differs in ((0.5, True), (0.0, False)):
        torch.manual_seed(0)
        model = build_backbone(name, norm="gn", dropout=p, **TINY).train()  # gn: no batch statistics
        assert model.dropout.p == p
        assert (not torch.equal(model(x), model(x))) == differs
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["iresnet18", "resnet18"])
def test_embedding_batchnorm1d_scale_is_frozen_at_one(name):
    model = build_backbone(name, norm="bn", **TINY)
    features = model.features
    assert isinstance(features, nn.BatchNorm1d) and features.num_features == 16
    assert not features.weight.requires_grad and torch.all(features.weight == 1)
    assert features.bias.requires_grad
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert torch.all(features.weight == 1)


def test_norm_kwargs_reach_the_norms():
    model = build_backbone("iresnet18", norm="sn", using_bn=False, **TINY)
    assert all(m.mean_weight.numel() == 2 for m in model.modules() if type(m).__name__ == "SwitchNorm2d")
    model = build_backbone("resnet18", norm="bn", momentum=0.3, **TINY)
    assert model.layer1[0].sn1.momentum == 0.3


def test_errors():
    with pytest.raises(ValueError, match="iresnet50"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("iresnet18", input_size=100)
    with pytest.raises(ValueError, match="width"):
        build_backbone("iresnet18", width=0)
    with pytest.raises(ValueError, match="dropout"):
        build_backbone("iresnet18", dropout=1.5)
    with pytest.raises(ValueError, match="norm"):
        build_backbone("iresnet18", norm="batchnorm", **TINY)
    with pytest.raises(ValueError, match="using_bn"):
        build_backbone("iresnet18", norm="bn", using_bn=False, **TINY)
