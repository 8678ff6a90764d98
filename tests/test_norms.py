"""make_norm registry: every name builds, runs forward+backward, and refuses bad names/options clearly."""

import pytest
import torch
import torch.nn as nn

from backbones import NORMS, SwitchNorm2d, SyncSwitchNorm2d, make_norm


def test_norm_names():
    assert NORMS == ("sn", "syncsn", "bn", "syncbn", "gn", "in", "ln")


@pytest.mark.parametrize("name", NORMS)
def test_every_norm_forward_backward(name):
    torch.manual_seed(0)
    layer = make_norm(name, 16)
    x = (torch.randn(4, 16, 5, 5) * 3 + 1).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.weight.shape == (16,)


def test_norm_types_and_semantics():
    x = torch.randn(3, 16, 4, 4) * 2 + 0.5
    assert type(make_norm("sn", 16)) is SwitchNorm2d and type(make_norm("syncsn", 16)) is SyncSwitchNorm2d
    assert isinstance(make_norm("syncbn", 16), nn.SyncBatchNorm)
    inorm = make_norm("in", 16)
    assert isinstance(inorm, nn.InstanceNorm2d) and inorm.affine
    ref_in = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(
        x.var((2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(inorm(x), ref_in, atol=1e-5, rtol=1e-5)
    ln = make_norm("ln", 16)
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    ref_ln = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(ln(x), ref_ln, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (16, 16), (48, 24), (40, 20), (7, 7), (3, 3)])
def test_gn_default_groups(channels, groups):
    layer = make_norm("gn", channels)
    assert layer.num_groups == groups and channels % layer.num_groups == 0


def test_gn_explicit_groups():
    assert make_norm("gn", 64, groups=8).num_groups == 8
    with pytest.raises(ValueError, match="groups=5 must be a positive divisor of C=64"):
        make_norm("gn", 64, groups=5)


def test_options_forwarded():
    sn = make_norm("sn", 8, using_bn=False, momentum=0.01, eps=1e-3)
    assert sn.terms == ("IN", "LN") and sn.momentum == 0.01 and sn.eps == 1e-3
    bn = make_norm("bn", 8, momentum=0.01, eps=1e-3)
    assert bn.momentum == 0.01 and bn.eps == 1e-3
    assert make_norm("gn", 8, eps=1e-3).eps == 1e-3
    for name in ("sn", "syncsn"):  # the published SN argument: this layer's scale starts at 0
        assert torch.equal(make_norm(name, 8, last_gamma=True).weight, torch.zeros(8)), name
    for name in ("bn", "syncbn", "gn", "in", "ln"):  # zero-init of residual blocks is the backbone's job
        with pytest.raises(ValueError, match="last_gamma: Switchable Normalization options only"):
            make_norm(name, 8, last_gamma=True)


def test_unknown_name():
    with pytest.raises(
        ValueError, match="unknown norm 'batchnorm'; valid names: sn, syncsn, bn, syncbn, gn, in, ln"
    ):
        make_norm("batchnorm", 8)


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("bn", "using_bn"),
        ("syncbn", "using_moving_average"),
        ("gn", "momentum"),
        ("in", "groups"),
        ("ln", "using_bn"),
    ],
)
def test_unsupported_option(name, option):
    with pytest.raises(ValueError, match=f"norm '{name}' does not accept option\\(s\\) {option}") as err:
        make_norm(name, 8, **{option: 1})
    assert "it accepts" in str(err.value)
    if option in ("using_bn", "using_moving_average"):
        assert "Switchable Normalization options only" in str(err.value)


def test_typo_option_and_bad_channels():
    with pytest.raises(ValueError, match="does not accept option\\(s\\) momentun"):
        make_norm("sn", 8, momentun=0.1)
    with pytest.raises(ValueError, match="num_features"):
        make_norm("bn", 0)


def test_a_bool_is_no_size():
    """``True`` is an int to Python, never a channel or device count: every size check says so by name."""
    from backbones import build_backbone
    from backbones.virtual_devices import split_batch_statistics

    with pytest.raises(ValueError, match="norm 'bn': num_features must be a positive int, got True"):
        make_norm("bn", True)
    with pytest.raises(ValueError, match="^num_features must be a positive int, got True"):
        SwitchNorm2d(True)
    with pytest.raises(ValueError, match="^virtual_devices must be a positive int, got True"):
        SwitchNorm2d(8, virtual_devices=True)
    with pytest.raises(ValueError, match="^virtual devices must be a positive int, got True"):
        split_batch_statistics(nn.Sequential(nn.BatchNorm2d(8)), True)
    with pytest.raises(ValueError, match="^width must be a positive int, got 0"):
        build_backbone("iresnet18", width=0)
