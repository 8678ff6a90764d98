"""SwitchNorm2d/1d, hard_select and convert_published_sn against an independent float64 reference."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from backbones import (
    SwitchNorm1d,
    SwitchNorm2d,
    SyncSwitchNorm2d,
    convert_published_sn,
    hard_select,
    sn_mixture_weights,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- reference (REFERENCE.md section 1, float64)
def ref_sn2d(x, weight, bias, mean_logits, var_logits, eps=1e-5, running=None, using_bn=True):
    """Published SN formulas, literally. ``running=(mean, var)`` replaces the BN term (eval mode).

    Returns the output and the batch (mu_bn, var_bn) of shape (C,) (None without BN).
    """
    n, c, h, w = x.shape
    xv = x.reshape(n, c, h * w)
    mu_in = xv.mean(-1, keepdim=True)
    var_in = xv.var(-1, keepdim=True) if h * w > 1 else torch.zeros_like(mu_in)  # L = 1: defined as 0
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = (var_in + mu_in**2).mean(1, keepdim=True) - mu_ln**2
    mus, vs, batch = [mu_in, mu_ln], [var_in, var_ln], None
    if using_bn:
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = (var_in + mu_in**2).mean(0, keepdim=True) - mu_bn**2
        batch = (mu_bn.reshape(c), var_bn.reshape(c))
        if running is not None:
            mu_bn, var_bn = running[0].reshape(1, c, 1), running[1].reshape(1, c, 1)
        mus.append(mu_bn)
        vs.append(var_bn)
    wm, wv = torch.softmax(mean_logits, 0), torch.softmax(var_logits, 0)
    mu = sum(wm[k] * mus[k] for k in range(len(mus)))
    var = sum(wv[k] * vs[k] for k in range(len(vs)))
    y = (xv - mu) / torch.sqrt(var + eps)
    return y.reshape(n, c, h, w) * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1), batch


def ref_sn1d(x, weight, bias, mean_logits, var_logits, eps=1e-5, running=None, using_bn=True):
    """Published SwitchNorm1d: [LN, BN] with unbiased variances (0 over a single element)."""
    n, c = x.shape
    uvar = lambda t, d: (
        t.var(d, keepdim=True) if t.shape[d] > 1 else torch.zeros_like(t.mean(d, keepdim=True))
    )
    mus, vs, batch = [x.mean(1, keepdim=True)], [uvar(x, 1)], None
    if using_bn:
        mu_bn, var_bn = x.mean(0, keepdim=True), uvar(x, 0)
        batch = (mu_bn.reshape(c), var_bn.reshape(c))
        if running is not None:
            mu_bn, var_bn = running[0].reshape(1, c), running[1].reshape(1, c)
        mus.append(mu_bn)
        vs.append(var_bn)
    wm, wv = torch.softmax(mean_logits, 0), torch.softmax(var_logits, 0)
    mu = sum(wm[k] * mus[k] for k in range(len(mus)))
    var = sum(wv[k] * vs[k] for k in range(len(vs)))
    return (x - mu) / torch.sqrt(var + eps) * weight + bias, batch


def params64(layer):
    return [
        p.detach().double().clone().requires_grad_()
        for p in (layer.weight, layer.bias, layer.mean_weight, layer.var_weight)
    ]


def randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.mean_weight, layer.var_weight):
            p.copy_(torch.randn(p.shape, generator=g))
        layer.weight.add_(1.5)
    return layer


def make_x(shape, seed=1, offset=0.7, scale=1.8, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, **kw) * scale + offset


def check_against_reference(layer, x, ref, running=None, atol=1e-5, using_bn=True):
    """Output and gradients (input and all parameters) of ``layer`` vs the float64 reference."""
    x = x.clone().requires_grad_()
    y = layer(x)
    grad = make_x(y.shape, seed=7, offset=0.0, scale=1.0).to(y.dtype)
    y.backward(grad)
    ps = params64(layer)
    x64 = x.detach().double().requires_grad_()
    run64 = None if running is None else [t.double() for t in running]
    y_ref, batch = ref(x64, *ps, running=run64, using_bn=using_bn)
    y_ref.backward(grad.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=atol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=atol)
    for name, p, p_ref in zip(
        ("weight", "bias", "mean_weight", "var_weight"),
        (layer.weight, layer.bias, layer.mean_weight, layer.var_weight),
        ps,
    ):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=atol * 10, rtol=atol, msg=name)
    layer.zero_grad()
    return batch


# ---------------------------------------------------------------- SwitchNorm2d
@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize(
    "shape", [(4, 6, 5, 3), (3, 5, 1, 1), (1, 4, 3, 4), (2, 3, 9, 9)],
    ids=["4x6x5x3", "1x1-maps", "batch1", "81-pixel-maps"]
)
def test_sn2d_train_matches_reference(shape, using_bn):
    layer = randomise(SwitchNorm2d(shape[1], using_bn=using_bn)).train()
    assert len(layer.mean_weight) == (3 if using_bn else 2)
    check_against_reference(layer, make_x(shape), ref_sn2d, using_bn=using_bn)


def test_sn2d_float64_exact():
    layer = randomise(SwitchNorm2d(6)).double()
    x = make_x((4, 6, 5, 5), dtype=torch.float64, offset=30.0)  # large mean: conditioning of the moments
    check_against_reference(layer, x, ref_sn2d, atol=1e-10)


@pytest.mark.parametrize("moving_average", [True, False])
def test_sn2d_running_stats_and_eval(moving_average):
    momentum = 0.3
    layer = randomise(SwitchNorm2d(5, momentum=momentum, using_moving_average=moving_average))
    assert torch.equal(layer.running_mean, torch.zeros(5)) and torch.equal(layer.running_var, torch.ones(5))
    exp_mean, exp_var, batches = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), []
    for step in range(4):
        x = make_x((3, 5, 4, 4), seed=10 + step, offset=step - 1.0)
        batch = check_against_reference(layer.train(), x, ref_sn2d)
        batches.append(batch)
        if moving_average:  # PyTorch convention: published m = 1 - momentum
            exp_mean = (1 - momentum) * exp_mean + momentum * batch[0].detach()
            exp_var = (1 - momentum) * exp_var + momentum * batch[1].detach()
        else:  # cumulative average of the batch statistics
            exp_mean = torch.stack([b[0].detach() for b in batches]).mean(0)
            exp_var = torch.stack([b[1].detach() for b in batches]).mean(0)
        torch.testing.assert_close(layer.running_mean.double(), exp_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), exp_var, atol=1e-5, rtol=1e-5)
    assert layer.num_batches_tracked.item() == 4
    before = (layer.running_mean.clone(), layer.running_var.clone())
    layer.eval()
    x = make_x((2, 5, 3, 6), seed=99)
    check_against_reference(layer, x, ref_sn2d, running=(layer.running_mean, layer.running_var))
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


def test_sn2d_without_bn_same_in_train_and_eval():
    layer = randomise(SwitchNorm2d(4, using_bn=False))
    assert not hasattr(layer, "running_mean") and "running_mean" not in layer.state_dict()
    x = make_x((3, 4, 5, 5))
    torch.testing.assert_close(layer.train()(x), layer.eval()(x))


def test_sn2d_one_by_one_no_nan_eval_and_batch1():
    layer = randomise(SwitchNorm2d(3))
    for _ in range(2):
        check_against_reference(layer.train(), make_x((1, 3, 1, 1)), ref_sn2d)
    assert torch.isfinite(layer.running_var).all()
    layer.eval()
    check_against_reference(
        layer, make_x((2, 3, 1, 1)), ref_sn2d, running=(layer.running_mean, layer.running_var)
    )


def test_sn2d_gradcheck_double():
    for using_bn, train in ((True, True), (True, False), (False, True)):
        layer = randomise(SwitchNorm2d(3, using_bn=using_bn)).double().train(train)
        if using_bn:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
        x = make_x((2, 3, 3, 2), dtype=torch.float64).requires_grad_()
        params = (layer.weight, layer.bias, layer.mean_weight, layer.var_weight)
        momentum, layer.momentum = layer.momentum, 0.0  # keep the running stats fixed across evaluations
        assert torch.autograd.gradcheck(lambda x, *p, m=layer: m(x), (x, *params))
        layer.momentum = momentum
    x = make_x((2, 3, 3, 2), dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_sn2d_channels_last_matches_contiguous():
    layer = randomise(SwitchNorm2d(6))
    x = make_x((4, 6, 5, 7))
    g = make_x((4, 6, 5, 7), seed=3)
    outs = []
    for t in (x, x.to(memory_format=torch.channels_last)):
        t = t.clone().requires_grad_()
        y = layer(t)
        y.backward(g)
        outs.append((y.detach(), t.grad, layer.mean_weight.grad.clone(), layer.weight.grad.clone()))
        layer.zero_grad()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_sn2d_autocast_bf16_cpu():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = randomise(SwitchNorm2d(8))
    x = make_x((4, 3, 8, 8), offset=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    y_ref, _ = ref_sn2d(h.detach().double(), *params64(layer))
    torch.testing.assert_close(y.double(), y_ref, atol=3e-2, rtol=2e-2)
    # bf16 input outside autocast: statistics still float32-accurate
    hb = (make_x((4, 8, 6, 6), offset=20.0)).bfloat16()
    y_ref, _ = ref_sn2d(hb.double(), *params64(layer))
    torch.testing.assert_close(layer(hb).double(), y_ref, atol=3e-2, rtol=2e-2)


def test_sn2d_bfloat16_model():
    layer = randomise(SwitchNorm2d(4)).bfloat16()
    x = make_x((3, 4, 5, 5)).bfloat16().requires_grad_()
    y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == layer.mean_weight.grad.dtype == torch.bfloat16
    y_ref, _ = ref_sn2d(x.detach().double(), *params64(layer))
    torch.testing.assert_close(y.double(), y_ref, atol=3e-2, rtol=2e-2)


def test_sn2d_init_and_validation():
    layer = SwitchNorm2d(4, last_gamma=True)
    assert torch.equal(layer.weight, torch.zeros(4)) and torch.equal(layer.bias, torch.zeros(4))
    assert torch.equal(layer.mean_weight, torch.ones(3)) and torch.equal(layer.var_weight, torch.ones(3))
    assert layer.weight.shape == (4,) and layer.running_mean.shape == (4,)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="momentum"):
        SwitchNorm2d(4, momentum=1.5)


def test_state_dict_round_trip():
    model = nn.Sequential(randomise(SwitchNorm2d(4)), nn.Conv2d(4, 4, 1))
    model(make_x((3, 4, 5, 5)))  # update running stats
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = nn.Sequential(SwitchNorm2d(4), nn.Conv2d(4, 4, 1))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = make_x((2, 4, 5, 5), seed=5)
    for mode in (True, False):
        torch.testing.assert_close(model.train(mode)(x), fresh.train(mode)(x))


def test_syncsn_without_process_group_is_sn():
    sn, sync = randomise(SwitchNorm2d(4)), randomise(SyncSwitchNorm2d(4))
    x = make_x((3, 4, 5, 5))
    torch.testing.assert_close(sn(x), sync(x))
    torch.testing.assert_close(sn.running_var, sync.running_var)


# ---------------------------------------------------------------- SwitchNorm1d
@pytest.mark.parametrize("n", [5, 1])
def test_sn1d_matches_reference_train_and_eval(n):
    layer = randomise(SwitchNorm1d(6, momentum=0.2))
    assert len(layer.mean_weight) == 2 and layer.terms == ("LN", "BN")
    run_mean, run_var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    for step in range(3):
        batch = check_against_reference(layer.train(), make_x((n, 6), seed=step), ref_sn1d)
        run_mean = 0.8 * run_mean + 0.2 * batch[0].detach()
        run_var = 0.8 * run_var + 0.2 * batch[1].detach()
    torch.testing.assert_close(layer.running_mean.double(), run_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_var.double(), run_var, atol=1e-5, rtol=1e-5)
    check_against_reference(layer.eval(), make_x((3, 6), seed=9), ref_sn1d, running=(run_mean, run_var))


def test_sn1d_without_bn():
    layer = randomise(SwitchNorm1d(6, using_bn=False))
    assert layer.terms == ("LN",) and "running_mean" not in layer.state_dict()
    check_against_reference(layer, make_x((4, 6)), ref_sn1d, using_bn=False)


# ---------------------------------------------------------------- hard_select / report
def test_hard_select_uses_exactly_one_statistic():
    layer = randomise(SwitchNorm2d(5), seed=3)
    layer(make_x((4, 5, 3, 3)))
    mean_choice, var_choice = int(layer.mean_weight.argmax()), int(layer.var_weight.argmax())
    model = hard_select(nn.Sequential(layer))
    assert model[0] is layer and not layer.mean_weight.requires_grad
    report = sn_mixture_weights(model)[0]
    assert report["mean"] == [1.0 if k == mean_choice else 0.0 for k in range(3)]
    assert report["var"] == [1.0 if k == var_choice else 0.0 for k in range(3)]
    x = make_x((3, 5, 4, 4), seed=4)
    for mode in (True, False):
        layer.train(mode)
        running = None if mode else (layer.running_mean.double(), layer.running_var.double())
        x64 = x.double()
        _, _, mus, vs = _statistics64(x64, running)
        y_ref = (x64 - mus[mean_choice]) / torch.sqrt(vs[var_choice] + 1e-5)
        y_ref = y_ref * layer.weight.double().view(1, -1, 1, 1) + layer.bias.double().view(1, -1, 1, 1)
        torch.testing.assert_close(layer(x).double(), y_ref, atol=2e-5, rtol=1e-5)
    # the one-hot logits travel in the state dict
    fresh = nn.Sequential(SwitchNorm2d(5))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    assert sn_mixture_weights(fresh) == sn_mixture_weights(model)


def _statistics64(x, running):
    n, c, h, w = x.shape
    xv = x.reshape(n, c, -1)
    mu_in, var_in = xv.mean(-1), xv.var(-1)
    mu_ln = mu_in.mean(1, keepdim=True).expand(n, c)
    var_ln = (var_in + mu_in**2).mean(1, keepdim=True) - mu_ln**2
    if running is None:
        mu_bn = mu_in.mean(0, keepdim=True).expand(n, c)
        var_bn = (var_in + mu_in**2).mean(0, keepdim=True) - mu_bn**2
    else:
        mu_bn, var_bn = running[0].expand(n, c), running[1].expand(n, c)
    mus = [t.reshape(n, c, 1, 1) for t in (mu_in, mu_ln, mu_bn)]
    vs = [t.reshape(n, c, 1, 1) for t in (var_in, var_ln, var_bn)]
    return mu_in, var_in, mus, vs


def test_sn_mixture_weights_report():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        randomise(SwitchNorm2d(4)),
        SwitchNorm2d(4, using_bn=False),
        nn.Flatten(),
        SwitchNorm1d(4),
    )
    report = sn_mixture_weights(model)
    assert [r["name"] for r in report] == ["1", "2", "4"]
    assert [r["terms"] for r in report] == [("IN", "LN", "BN"), ("IN", "LN"), ("LN", "BN")]
    torch.testing.assert_close(torch.tensor(report[0]["mean"]), model[1].mean_weight.detach().softmax(0))
    torch.testing.assert_close(torch.tensor(report[0]["var"]), model[1].var_weight.detach().softmax(0))
    assert report[1]["mean"] == pytest.approx([0.5, 0.5]) and report[2]["var"] == pytest.approx([0.5, 0.5])


# ---------------------------------------------------------------- published checkpoints
def published_state_dict(c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "module.conv.weight": r(c, 3, 3, 3),
        "module.sn.weight": r(1, c, 1, 1),
        "module.sn.bias": r(1, c, 1, 1),
        "module.sn.mean_weight": r(3),
        "module.sn.var_weight": r(3),
        "module.sn.running_mean": r(1, c, 1),
        "module.sn.running_var": r(1, c, 1).abs(),
        "module.sn2.weight": r(1, c, 1, 1),
        "module.sn2.bias": r(1, c, 1, 1),
        "module.sn2.mean_weight": r(2),
        "module.sn2.var_weight": r(2),
        "module.head.weight": r(1, c),
        "module.head.bias": r(1, c),
        "module.head.mean_weight": r(2),
        "module.head.var_weight": r(2),
        "module.head.running_mean": r(1, c),
        "module.head.running_var": r(1, c).abs(),
    }


class Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.sn = SwitchNorm2d(c)
        self.sn2 = SwitchNorm2d(c, using_bn=False)
        self.head = SwitchNorm1d(c)

    def forward(self, x):
        return self.head(self.sn2(self.sn(self.conv(x))).mean((2, 3)))


def test_convert_published_sn_round_trip():
    published = published_state_dict()
    snapshot = {k: v.clone() for k, v in published.items()}
    converted = convert_published_sn(published, momentum=0.997)
    assert all(torch.equal(published[k], snapshot[k]) for k in published)  # input untouched
    assert converted["sn.weight"].shape == (4,) and converted["sn.running_var"].shape == (4,)
    assert converted["sn.num_batches_tracked"].item() == 0 and "sn2.running_mean" not in converted
    assert torch.equal(converted["conv.weight"], published["module.conv.weight"])
    net = Net()
    net.load_state_dict(converted)
    assert net.sn.momentum == pytest.approx(0.003) and net.head.momentum == pytest.approx(0.003)
    assert Net().sn.momentum == 0.1
    # eval output equals the published formulas evaluated on the published tensors
    x = make_x((2, 3, 6, 6))
    p = {k[len("module.") :]: v.double() for k, v in published.items()}
    h = nn.functional.conv2d(x.double(), p["conv.weight"], padding=1)
    h, _ = ref_sn2d(
        h,
        p["sn.weight"],
        p["sn.bias"],
        p["sn.mean_weight"],
        p["sn.var_weight"],
        running=(p["sn.running_mean"], p["sn.running_var"]),
    )
    h, _ = ref_sn2d(
        h, p["sn2.weight"], p["sn2.bias"], p["sn2.mean_weight"], p["sn2.var_weight"], using_bn=False
    )
    y_ref, _ = ref_sn1d(
        h.mean((2, 3)),
        p["head.weight"],
        p["head.bias"],
        p["head.mean_weight"],
        p["head.var_weight"],
        running=(p["head.running_mean"], p["head.running_var"]),
    )
    torch.testing.assert_close(net.eval()(x).double(), y_ref, atol=1e-5, rtol=1e-5)
    # our own layout passes through unchanged
    again = convert_published_sn(net.state_dict())
    assert (
        all(torch.equal(again[k], v) for k, v in net.state_dict().items())
        and again.keys() == converted.keys()
    )


def test_convert_published_sn_errors():
    bad = published_state_dict()
    bad["module.sn.mean_weight"] = torch.ones(4)
    with pytest.raises(ValueError, match="sn.mean_weight"):
        convert_published_sn(bad)
    bad = published_state_dict()
    bad["module.sn.running_mean"] = torch.ones(1, 5, 1)
    with pytest.raises(ValueError, match="sn.running_mean"):
        convert_published_sn(bad)
    with pytest.raises(ValueError, match="published momentum"):
        convert_published_sn(published_state_dict(), momentum=1.0)


def test_sn_leaves_the_process_thread_count_alone(monkeypatch):
    """A layer never changes process-wide settings: forward and backward never set torch's thread count
    (they used to drop it to 1 around the (N, C) statistics)."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    for layer in (SwitchNorm2d(3), SwitchNorm2d(3).eval()):
        layer(x).sum().backward()
    assert calls == []


def test_sn2d_function_has_no_side_effects_the_layer_updates_running_stats():
    """The autograd function gets tensors and frozen options, returns the BN term it used and changes
    nothing; SwitchNorm2d.forward folds that term into the running statistics."""
    from backbones.switchnorm import _SNOptions, _SwitchNorm2dFunction

    layer = randomise(SwitchNorm2d(3, momentum=0.25))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    params = (layer.weight, layer.bias, layer.mean_weight, layer.var_weight)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y, mean_bn, var_bn = _SwitchNorm2dFunction.apply(
        x.float(), _SNOptions(layer.eps, True, True), layer.running_mean, layer.running_var, *params
    )
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    _, batch = ref_sn2d(x, *(p.detach().double() for p in params))
    torch.testing.assert_close(mean_bn.double().view(-1), batch[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var_bn.double().view(-1), batch[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x.float()), y)
    torch.testing.assert_close(layer.running_mean, before["running_mean"].lerp(mean_bn.view(-1), 0.25))
    assert int(layer.num_batches_tracked) == 1


def test_bench_norm_times_small_steps_in_multi_step_samples():
    """A 5 ms step is timed 10 at a time (a 50 ms sample); a step longer than a sample alone."""
    from benchmarks.bench_norm import steps_per_sample

    assert steps_per_sample(0.005, 0.05) == 10
    assert steps_per_sample(0.2, 0.05) == 1 and steps_per_sample(0.0, 0.05) >= 1


def test_bench_norm_quick_runs():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_norm",
            "--quick",
            "--threads",
            "1",
            "--iters",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "SN/BN" in out and "(8, 64, 28, 28)" in out and "worst SN/BN time" in out


def test_onnx_export_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), randomise(SwitchNorm2d(6)), nn.Flatten(), SwitchNorm1d(6 * 6 * 6)
    )
    for seed in range(3):
        model(make_x((4, 3, 8, 8), seed=seed))
    model.eval()
    path = tmp_path / "sn.onnx"
    with pytest.warns(DeprecationWarning):  # the TorchScript-based exporter, as facerec.export uses
        torch.onnx.export(
            model,
            (make_x((2, 3, 8, 8)),),
            str(path),
            input_names=["input"],
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}},
            opset_version=17,
        )
    x = make_x((5, 3, 8, 8), seed=11)
    (y_onnx,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y_onnx), model(x).detach(), atol=2e-5, rtol=1e-5)


def test_inference_mode_and_no_grad_match():
    layer = randomise(SwitchNorm2d(4))
    layer(make_x((3, 4, 5, 5)))
    layer.eval()
    x = make_x((2, 4, 5, 5), seed=2)
    with torch.inference_mode():
        y = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)
    assert not y.requires_grad
    check_against_reference(layer, x, ref_sn2d, running=(layer.running_mean, layer.running_var))


def test_hard_selected_layer_trains_without_mixture_gradients():
    layer = hard_select(randomise(SwitchNorm2d(4), seed=5))
    x = make_x((3, 4, 4, 4)).requires_grad_()
    layer(x).square().sum().backward()
    assert layer.mean_weight.grad is None and layer.var_weight.grad is None
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_compiled_module_matches_reference():
    layer = randomise(SwitchNorm2d(5))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # runs the traceable path
    check_against_reference(compiled, make_x((3, 5, 4, 6)), ref_sn2d)
    compiled.eval()
    check_against_reference(
        compiled, make_x((2, 5, 4, 6), seed=3), ref_sn2d, running=(layer.running_mean, layer.running_var)
    )
    head = randomise(SwitchNorm1d(6))
    check_against_reference(torch.compile(head, backend="eager", fullgraph=True), make_x((4, 6)), ref_sn1d)


def test_convert_wrapped_state_dict_keeps_metadata():
    wrapper = nn.Module()
    wrapper.module = Net()
    wrapper.module(make_x((2, 3, 6, 6)))
    state = wrapper.state_dict()
    assert "module.sn.weight" in state and "module.sn" in state._metadata
    converted = convert_published_sn(state, momentum=0.9)
    assert "sn" in converted._metadata and "version" in converted._metadata["sn"]
    net = Net()
    net.load_state_dict(converted)
    assert net.sn.momentum == pytest.approx(0.1) and net.sn2.momentum == pytest.approx(0.1)
    x = make_x((2, 3, 6, 6), seed=4)
    torch.testing.assert_close(net.eval()(x), wrapper.module.eval()(x))
