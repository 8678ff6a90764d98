"""Switchable Normalization (Luo et al., ICLR 2019): SwitchNorm2d, SwitchNorm1d, SyncSwitchNorm2d.

SN normalises with a learned softmax mixture of instance (IN), layer (LN) and batch (BN) statistics,
with separate mixture weights for the mean and the variance, exactly as the published formulas:
``var_in`` is the *unbiased* per-(n, c) variance over H*W; ``var_ln = mean_C(var_in + mu_in^2) - mu_ln^2``;
``var_bn = mean_N(var_in + mu_in^2) - mu_bn^2``; logits order [IN, LN, BN].

Conventions (all documented differences from the published code):

- ``momentum`` follows PyTorch: ``running = (1 - momentum) * running + momentum * batch``. The published
  code uses the opposite, ``running = m * running + (1 - m) * batch``; its m = 0.9 (0.997 in the 2018
  ImageNet models) is our ``momentum = 1 - m`` = 0.1 (0.003).
- The running variance accumulates SN's own BN term ``var_bn`` (built from the unbiased IN variances as
  in the formulas, like the published code), not the N*L/(N*L - 1)-corrected variance of ``nn.BatchNorm2d``.
- Running buffers start at ``running_mean = 0`` and ``running_var = 1`` (the PyTorch habit) rather than
  the published 0 and 0: a model evaluated before its first training step then sees a unit-variance BN
  term instead of one that divides by sqrt(eps) (a 316x blow-up). Trained values do not depend on it
  after a few steps; ``convert_published_sn`` loads published buffers whatever they hold.
- ``using_moving_average=False`` keeps the cumulative average of the batch statistics seen so far,
  ``running += (batch - running) / num_batches_tracked``, usable directly in eval (the published code
  keeps raw sums and needs a separate normalising pass).
- With H*W = 1 the unbiased IN variance is 0/0 (NaN in the published code); here it is defined as 0
  (a single value has no spread). Likewise SwitchNorm1d's unbiased LN/BN variances are 0 over 1 element.
- Statistics are computed in float32 (float64 stays float64) with autocast disabled; the output has
  the input's dtype.

Speed: SwitchNorm2d runs as one custom autograd function, which gets tensors and frozen options (never
the layer) and changes no state: the layer folds the BN term it returns into the running statistics.
Forward: per-(n, c) moments in one pass, the IN/LN/BN mixture on tiny (N, C) tensors, then one fused
``y = x * a + b`` with per-(n, c) ``a, b``. The one-pass kernels are BN's own, reused with unit
statistics (``_slice_sums``, ``_slice_affine``); on CPU, maps of up to 64 pixels take ``x * a + b`` as
broadcast elementwise ops instead, which are faster there.
Backward: one pass gives the per-(n, c) sums of ``g`` and ``g * (x - mean)``; the hand-derived
backward of the (N, C) statistic graph (autograd only for a BN term synchronised across processes,
whose all-reduce has its own backward) turns them into the parameter gradients and the per-(n, c)
coefficients of ``dx = g * a + x * c2 + c1`` (two passes). Saved for backward: ``x`` and the (N, C)
statistics.
SyncSwitchNorm2d and the traceable path (ONNX/TorchScript export, torch.compile) reuse the same code.
"""

import warnings
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .checks import check_positive_int

# Largest H * W at which, on CPU, broadcast elementwise ops compute ``x * a + b`` faster than the per-slice
# BN kernels (bench: 0.18 vs 0.32 ms at (64, 512, 7, 7); 0.49 vs 0.42 ms at (64, 256, 14, 14)).
_SMALL_MAP = 64

# Logit given to the non-chosen terms by hard_select: exp(-1e4) is exactly 0 in float32 and float64,
# so the softmax is an exact one-hot, and the value stays finite under weight decay.
_HARD_OFF = -1.0e4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SNOptions(NamedTuple):
    """What the SN statistics need from a layer for one call, frozen (the autograd function never sees
    the layer): ``synced`` takes the BN term over all processes of ``process_group``; ``devices`` > 1
    takes it per virtual device, sample ``k`` of the batch belonging to device ``k % devices``."""

    eps: float
    using_bn: bool
    training: bool
    synced: bool = False
    process_group: Any = None
    devices: int = 1


def _quiet_when_jit_tracing(fn, *args):
    """``fn(*args)``, silencing TracerWarnings under torch.jit tracing (ONNX export): sizes such as H * W
    become trace-time constants there, which is right since exports fix every size but the batch."""
    if not torch.jit.is_tracing():
        return fn(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return fn(*args)


def _unbiased_var(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased variance along ``dim`` (keepdim), defined as 0 when there is a single element."""
    if x.shape[dim] == 1:
        return torch.zeros_like(x.narrow(dim, 0, 1))
    return x.var(dim, keepdim=True, correction=1)


def _slice_sums(g: torch.Tensor, x: torch.Tensor, center: torch.Tensor, ones: torch.Tensor):
    """``sum(g * (x - center))`` and ``sum(g)`` over each slice ``[0, s, :]`` of (1, S, L) tensors, in
    one pass; ``center`` and ``ones``: (S,). These are the two reductions of BN's backward kernel (its
    weight and bias gradients), which with unit inverse std (``ones``) are the sums themselves."""
    _, centered, total = torch.ops.aten.native_batch_norm_backward(
        g, x, None, None, None, center, ones, True, 0.0, [False, True, True]
    )
    return centered, total


def _slice_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, unit) -> torch.Tensor:
    """``x * scale + shift`` per slice ``[0, s, :]`` of a (1, S, L) tensor, in one pass; ``unit``: (S,)
    zeros and ones. This is eval-mode BN's kernel with running mean 0, running variance 1 and eps 0."""
    zeros, ones = unit
    return torch.native_batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0)[0]


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, unit) -> torch.Tensor:
    """``x * scale + shift`` for a (N, C, H, W) ``x`` and (N, C) ``scale, shift``, a new tensor: BN's
    per-slice kernel (``_slice_affine``) for contiguous ``x``, except small maps on CPU, where broadcast
    elementwise ops are faster; ``unit``: N * C zeros and ones."""
    scale4, shift4 = scale[..., None, None], shift[..., None, None]
    if not x.is_contiguous():
        return torch.addcmul(shift4, x, scale4)
    if x.device.type == "cpu" and x[0, 0].numel() <= _SMALL_MAP:
        return (x * scale4).add_(shift4)
    n, c = x.shape[:2]
    return _slice_affine(x.view(1, n * c, -1), scale.reshape(-1), shift.reshape(-1), unit).view_as(x)


def _instance_moments(x: torch.Tensor, ones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and biased variance of a (N, C, H, W) tensor, shapes (N, C); ``ones``: N * C ones."""
    n, c = x.shape[:2]
    if x.is_contiguous():
        xv = x.view(1, n * c, -1)
        spatial = xv.shape[2]
        shift = xv[0, :, 0].contiguous()  # a sample of each (n, c) slice: keeps the sums well conditioned
        sxs, sx = _slice_sums(xv, xv, shift, ones)  # sum(x * (x - shift)), sum(x)
        mean = sx / spatial
        # sum((x - mean)^2) = sum(x * (x - shift)) - sum(x) * (mean - shift)
        var = torch.addcmul(sxs, sx, mean - shift, value=-1).div_(spatial).clamp_min_(0)
        return mean.view(n, c), var.view(n, c)
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    return mean, var


def _mix(weights: torch.Tensor, terms: list) -> torch.Tensor:
    """sum_k weights[k] * terms[k]; terms[0] is (N, C), the others broadcast to it."""
    weights = weights.unbind()
    mixed = terms[1] * weights[1]
    for k in range(2, len(terms)):
        mixed = torch.addcmul(mixed, terms[k], weights[k])
    return torch.addcmul(mixed, terms[0], weights[0])


def _dots(grads: list, terms: list) -> torch.Tensor:
    """Vector of sum(grads[k] * terms[k]): the gradient of a mixture w.r.t. its weights."""
    return torch.stack([torch.vdot(g.reshape(-1), t.reshape(-1)) for g, t in zip(grads, terms)])


def _softmax_backward(weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return weights * (grad - (weights * grad).sum())


def _bn_term(batch_stats, running: tuple, training: bool, dtype: torch.dtype):
    """The BN term (mean_bn, var_bn), each (1, C): ``batch_stats()`` in training; in eval, copies of the
    ``running`` buffers in ``dtype`` (copies: the buffers may change before a graph's backward)."""
    if training:
        return batch_stats()
    return tuple(r.to(dtype, copy=True).view(1, -1) for r in running)


def _batch_stats(mean_in: torch.Tensor, var_in: torch.Tensor, opts: _SNOptions):
    """Per-channel BN statistics (1, C) of the batch from its (N, C) IN statistics (``var_in`` unbiased).

    Synced: the per-channel mean of ``mu`` and of ``var + mu^2`` is averaged over the processes with a
    differentiable all-reduce (its backward is itself an all-reduce), assuming equal batches."""
    mean_bn = mean_in.mean(0, keepdim=True)
    var_bn = var_in.mean(0, keepdim=True) + (mean_in - mean_bn).square().mean(0, keepdim=True)
    if not opts.synced:
        return mean_bn, var_bn
    world = dist.get_world_size(opts.process_group)
    packed = torch.cat([mean_bn, var_bn + mean_bn.square()])  # (2, C): mean, E[var + mu^2]
    packed = _AllReduceSum.apply(packed, opts.process_group) / world
    mean_bn = packed[:1]
    return mean_bn, packed[1:] - mean_bn.square()


def _per_device(t: torch.Tensor, devices: int) -> torch.Tensor:
    """An (N, C) tensor viewed as (N / devices, devices, C): ``[i, v]`` is sample ``i * devices + v``, the
    i-th sample of virtual device ``v`` (the strided split: sample k on device k % devices)."""
    return t if devices == 1 else t.view(-1, devices, t.shape[-1])


def _first_device(t: torch.Tensor) -> torch.Tensor:
    """The (1, C) statistics of virtual device 0 from a (1, C) or (1, devices, C) BN term."""
    return t if t.dim() == 2 else t[:, 0]


def check_device_split(layer: nn.Module, batch: int, devices: int) -> None:
    """ValueError naming ``layer`` unless ``batch`` splits into ``devices`` equal virtual-device parts."""
    if batch % devices:
        raise ValueError(f"{type(layer).__name__}: a batch of {batch} does not split into "
                         f"virtual_devices={devices} equal parts")


def _as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _scale_shift(mean_in, var_biased, params, running, opts: _SNOptions, *, spatial, bn_graph=False):
    """Per-(n, c) scale ``a`` and shift ``b`` of the output ``x * a + b`` (tiny (N, C) tensors).

    Built from the (N, C) per-instance mean and biased variance, ``params`` (weight, bias, mean_weight,
    var_weight) and the ``running`` (mean, var) buffers (read in eval). Differentiable with autograd
    (the traceable path), while the fused path runs it without a graph and calls ``_scale_shift_backward``
    with the returned intermediates. ``bn_graph``: record autograd for a synced BN term (its all-reduce
    has its own backward); a local one has a written-out backward. Returns ``(a, b, bn, saved)``:
    ``bn`` the (mean_bn, var_bn) used (None without a BN term): virtual device 0's with ``opts.devices`` > 1,
    whose statistics are (N / devices, devices, C) throughout (``_per_device``).
    """
    weight, bias, mean_weight, var_weight = params
    shape = mean_in.shape
    factor = spatial / (spatial - 1) if spatial > 1 else 0.0  # unbiased IN variance; 0 when L = 1
    mean_in = _per_device(mean_in, opts.devices)
    var_in = _per_device(var_biased, opts.devices) * factor
    mean_ln = mean_in.mean(-1, keepdim=True)
    # var_ln = mean_C(var_in + mean_in^2) - mean_ln^2, written without cancellation.
    var_ln = var_in.mean(-1, keepdim=True) + (mean_in - mean_ln).square().mean(-1, keepdim=True)
    means, variances, bn, bn_leaves = [mean_in, mean_ln], [var_in, var_ln], None, None
    if opts.using_bn:
        if opts.training and bn_graph and opts.synced:
            # saved as they are even inside an activation checkpoint: the nested autograd.grad of the
            # backward would otherwise recompute the whole checkpointed stage once per layer
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
                bn_leaves = (mean_in.detach().requires_grad_(), var_in.detach().requires_grad_())
                mean_bn, var_bn = _batch_stats(*bn_leaves, opts)
            bn_leaves += (mean_bn, var_bn)
            mean_bn, var_bn = mean_bn.detach(), var_bn.detach()
        else:
            batch_stats = lambda: _batch_stats(mean_in, var_in, opts)
            mean_bn, var_bn = _bn_term(batch_stats, running, opts.training, mean_in.dtype)
        bn = (_first_device(mean_bn), _first_device(var_bn))
        means.append(mean_bn)
        variances.append(var_bn)
    mean_w, var_w = mean_weight.softmax(0), var_weight.softmax(0)
    mean, var = _mix(mean_w, means), _mix(var_w, variances)
    rstd = torch.rsqrt(var + opts.eps)
    scale = weight * rstd
    shift = torch.addcmul(bias, mean, scale, value=-1)
    local_bn = opts.using_bn and opts.training and bn_leaves is None
    saved = ((*means, *variances, mean_w, var_w, mean, rstd), (factor, local_bn, bn_leaves))
    return scale.reshape(shape), shift.reshape(shape), bn, saved


def _scale_shift_backward(grad_scale, grad_shift, scale, tensors, info):
    """Gradients of ``_scale_shift``: (mean_in, var_biased, weight, bias, mean_weight, var_weight)."""
    terms = (len(tensors) - 4) // 2
    means, variances = tensors[:terms], tensors[terms : 2 * terms]
    mean_w, var_w, mean, rstd = tensors[2 * terms :]
    factor, local_bn, bn_leaves = info
    shape, c = grad_scale.shape, grad_scale.shape[1]
    grad_scale, grad_shift, scale = (t.view(mean.shape) for t in (grad_scale, grad_shift, scale))
    g_mean = grad_shift * scale
    g_mean.neg_()
    g_scale = torch.addcmul(grad_scale, grad_shift, mean, value=-1)
    d_weight = (g_scale * rstd).reshape(-1, c).sum(0)
    d_bias = grad_shift.reshape(-1, c).sum(0)
    g_var = g_scale * scale
    g_var.mul_(rstd).mul_(rstd).mul_(-0.5)  # d rstd / d var = -rstd^3 / 2
    # each mixture term's gradient, reduced to that term's shape: (N, C), (N, 1) LN, (1, C) BN (with
    # virtual devices: (N/V, V, C), (N/V, V, 1), (1, V, C))
    g_means = [g_mean, g_mean.sum(-1, keepdim=True), g_mean.sum(0, keepdim=True)][: len(means)]
    g_vars = [g_var, g_var.sum(-1, keepdim=True), g_var.sum(0, keepdim=True)][: len(variances)]
    d_mean_weight = _softmax_backward(mean_w, _dots(g_means, means))
    d_var_weight = _softmax_backward(var_w, _dots(g_vars, variances))
    # IN term, then LN: mean_ln = mean_C(mean_in), var_ln = mean_C(var_in + (mean_in - mean_ln)^2)
    d_var_ln = g_vars[1] * var_w[1]
    d_mean_in = torch.addcmul(g_means[1] * (mean_w[1] / c), g_mean, mean_w[0])
    d_mean_in.addcmul_(means[0] - means[1], d_var_ln, value=2.0 / c)
    d_var_in = torch.addcmul(d_var_ln / c, g_var, var_w[0])
    if local_bn:  # this batch's (device's) BN term: mean_N(mean_in), mean_N(var_in + (mean_in - mean_bn)^2)
        n = grad_scale.shape[0]
        d_var_bn = g_vars[2] * var_w[2]
        d_mean_in.addcmul_(g_means[2], mean_w[2], value=1.0 / n)
        d_mean_in.addcmul_(means[0] - means[2], d_var_bn, value=2.0 / n)
        d_var_in.add_(d_var_bn, alpha=1.0 / n)
    elif bn_leaves is not None:  # BN term synced across processes: autograd through _batch_stats
        leaves, outputs = bn_leaves[:2], bn_leaves[2:]
        d_mean_bn, d_var_bn = torch.autograd.grad(
            outputs, leaves, (g_means[2] * mean_w[2], g_vars[2] * var_w[2]), retain_graph=True
        )
        d_mean_in.add_(d_mean_bn)
        d_var_in.add_(d_var_bn)
    return (d_mean_in.view(shape), d_var_in.mul_(factor).view(shape), d_weight, d_bias, d_mean_weight,
            d_var_weight)


class _SwitchNorm2dFunction(torch.autograd.Function):
    """``(y, mean_bn, var_bn)``: y = x * a + b with per-(n, c) ``a, b`` from ``_scale_shift`` over x's
    per-(n, c) moments; ``mean_bn, var_bn`` (non-differentiable; None without a BN term) are the BN term
    it used, for the caller's running statistics. Inputs: ``x, opts, running_mean, running_var, *params``."""

    @staticmethod
    def forward(ctx, x, opts, running_mean, running_var, *params):
        needs_grad = any(ctx.needs_input_grad)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(_compute_dtype(x.dtype))
            n, c = x.shape[:2]
            unit = xc.new_zeros(n * c), xc.new_ones(n * c)
            mean, var = _instance_moments(xc, unit[1])
            param_dtypes = [p.dtype for p in params]
            params = [p.to(xc.dtype) for p in params]  # no graph is recorded in a Function's forward
            a, b, bn, saved = _scale_shift(mean, var, params, (running_mean, running_var), opts,
                                           spatial=x[0, 0].numel(), bn_graph=needs_grad)
            y = _affine(xc, a, b, unit)
        if needs_grad:
            tensors, ctx.info = saved
            ctx.save_for_backward(x, mean, a, *tensors)
            ctx.param_dtypes = param_dtypes
            ctx.unit = unit
        mean_bn, var_bn = bn if bn is not None else (None, None)
        if bn is not None:
            ctx.mark_non_differentiable(mean_bn, var_bn)
        return y.to(x.dtype), mean_bn, var_bn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_mean_bn, _grad_var_bn):
        x, mean, a, *tensors = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(a.dtype)
            g = grad.to(a.dtype)
            n, c = x.shape[:2]
            spatial = x[0, 0].numel()
            fused = xc.is_contiguous()
            if fused:
                g = g.contiguous()
                xv, gv = xc.view(1, n * c, -1), g.view(1, n * c, -1)
                sgxc, sg = _slice_sums(gv, xv, mean.view(-1), ctx.unit[1])  # sum(g * (x - mean)), sum(g)
                sgxc, sg = sgxc.view(n, c), sg.view(n, c)
            else:
                sgxc, sg = (g * (xc - mean[..., None, None])).sum((2, 3)), g.sum((2, 3))
            grad_a = torch.addcmul(sgxc, mean, sg)  # d loss / d a = sum(g * x)
            d_mean, d_var, *param_grads = _scale_shift_backward(grad_a, sg, a, tensors, ctx.info)
            c2 = d_var * (2.0 / spatial)  # d var / d x = 2 (x - mean) / L
            c1 = torch.addcmul(d_mean / spatial, c2, mean, value=-1)
            dx_out = None
            if ctx.needs_input_grad[0]:  # dx = x * c2 + c1 + g * a
                dx = _affine(xc, c2, c1, ctx.unit)
                dx.addcmul_(g, a[..., None, None])
                dx_out = dx.to(x.dtype)
        param_grads = [
            t.to(dt) if needed else None
            for t, dt, needed in zip(param_grads, ctx.param_dtypes, ctx.needs_input_grad[4:])
        ]
        return (dx_out, None, None, None, *param_grads)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the processes of ``group``: the gradient is itself all-reduced (summed)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _SwitchNormBase(nn.Module):
    """Parameters, running statistics and mixture weights shared by the SN layers."""

    def __init__(self, num_features, terms, eps, momentum, using_moving_average, last_gamma=False):
        super().__init__()
        check_positive_int("num_features", num_features)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1] (PyTorch convention: weight of the new batch), got {momentum!r}"
            )
        self.num_features = num_features
        self.terms = tuple(terms)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.using_bn = "BN" in self.terms
        self.using_moving_average = using_moving_average
        self.last_gamma = last_gamma
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features))
        self.mean_weight = nn.Parameter(torch.empty(len(self.terms)))
        self.var_weight = nn.Parameter(torch.empty(len(self.terms)))
        if self.using_bn:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def mixture_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights (mean, var) over ``self.terms``."""
        return self.mean_weight.float().softmax(0), self.var_weight.float().softmax(0)

    @torch.no_grad()
    def _update_running_stats(self, mean_bn: torch.Tensor, var_bn: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        rate = self.momentum
        if not self.using_moving_average:  # cumulative average; a tensor rate avoids a device sync
            rate = self.num_batches_tracked.reciprocal().to(self.running_mean.dtype)
        self.running_mean.lerp_(mean_bn.detach().reshape(-1).to(self.running_mean.dtype), rate)
        self.running_var.lerp_(var_bn.detach().reshape(-1).to(self.running_var.dtype), rate)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # convert_published_sn(..., momentum=m) records the converted momentum in the state dict metadata.
        if "sn_momentum" in local_metadata:
            self.momentum = float(local_metadata["sn_momentum"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        devices = getattr(self, "virtual_devices", 1)
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, terms={self.terms}, "
            f"using_moving_average={self.using_moving_average}, last_gamma={self.last_gamma}"
            + (f", virtual_devices={devices}" if devices > 1 else "")
        )


class SwitchNorm2d(_SwitchNormBase):
    """Switchable Normalization over (N, C, H, W): softmax mixture of [IN, LN, BN] statistics.

    Args: ``num_features`` C; ``eps`` added to the mixed variance; ``momentum`` PyTorch convention
    (published m -> ours 1 - m); ``using_bn=False`` gives the [IN, LN] mixture without running
    buffers (same function in train and eval; for one sample per device); ``using_moving_average=False``
    keeps a cumulative average of the batch statistics instead; ``last_gamma=True`` initialises the
    scale to 0. Eval mode: the BN term uses the running statistics, IN and LN still come from the sample.
    ``virtual_devices`` V > 1: in training, the BN term is taken per virtual device (sample k of the
    batch on device k % V), as V processes with one V-th of the batch each would take it; the running
    statistics follow device 0, as process 0's do under DDP without buffer broadcast.
    See the module docstring for the conventions (running buffer init, L = 1, dtypes).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, using_bn=True, using_moving_average=True,
                 last_gamma=False, virtual_devices=1):
        terms = ("IN", "LN", "BN") if using_bn else ("IN", "LN")
        super().__init__(num_features, terms, eps, momentum, using_moving_average, last_gamma)
        check_positive_int("virtual_devices", virtual_devices)
        self.virtual_devices = virtual_devices

    def _options(self) -> _SNOptions:
        devices = self.virtual_devices if self.training and self.using_bn else 1
        return _SNOptions(self.eps, self.using_bn, self.training, devices=devices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.weight, self.bias, self.mean_weight, self.var_weight)
        opts = self._options()
        running = (self.running_mean, self.running_var) if self.using_bn else (None, None)
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not tracing and (x.dim() != 4 or x.shape[1] != self.num_features):
            raise ValueError(
                f"{type(self).__name__}: expected input (N, {self.num_features}, H, W), got {tuple(x.shape)}"
            )
        if tracing:
            y, bn = _quiet_when_jit_tracing(self._forward_traceable, x, params, running, opts)
        else:
            check_device_split(self, x.shape[0], opts.devices)
            y, *bn = _SwitchNorm2dFunction.apply(x, opts, *running, *params)
        if self.training and self.using_bn:
            self._update_running_stats(*bn)
        return y

    def _forward_traceable(self, x, params, running, opts):
        """The same function in plain autograd ops, for tracing (ONNX/TorchScript export, torch.compile)."""
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(_compute_dtype(x.dtype))
            var, mean = torch.var_mean(xc, dim=(2, 3), correction=0)
            params = [p.to(xc.dtype) for p in params]
            a, b, bn, _ = _scale_shift(mean, var, params, running, opts, spatial=int(x.shape[2] * x.shape[3]))
            y = xc * a[..., None, None] + b[..., None, None]
        return y.to(x.dtype), bn


class SyncSwitchNorm2d(SwitchNorm2d):
    """SwitchNorm2d whose BN term uses the batch statistics of all processes of ``process_group``.

    The per-channel mean of ``mu`` and of ``var + mu^2`` is averaged across processes with a
    differentiable all-reduce (its backward is itself an all-reduce), assuming the same batch size on
    every process. Without an initialised process group, or with one process, it is SwitchNorm2d.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, using_bn=True, using_moving_average=True,
                 last_gamma=False, process_group=None):
        super().__init__(num_features, eps, momentum, using_bn, using_moving_average, last_gamma)
        self.process_group = process_group

    def _options(self) -> _SNOptions:
        """The BN term covers every sample of every process: ``virtual_devices`` does not split it."""
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1
        return super()._options()._replace(synced=synced, process_group=self.process_group, devices=1)


class SwitchNorm1d(_SwitchNormBase):
    """Switchable Normalization over (N, C) features: softmax mixture of [LN, BN] (IN is one element).

    As the published SwitchNorm1d, LN and BN use unbiased variances (over C and over N), defined as
    0 over a single element (batch size 1). ``using_bn=False`` leaves LN alone. Other arguments and
    conventions as SwitchNorm2d (momentum in PyTorch convention, running_var starts at 1).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, using_bn=True, using_moving_average=True):
        terms = ("LN", "BN") if using_bn else ("LN",)
        super().__init__(num_features, terms, eps, momentum, using_moving_average)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.dim() != 2 or x.shape[1] != self.num_features):
            raise ValueError(f"SwitchNorm1d: expected input (N, {self.num_features}), got {tuple(x.shape)}")
        y, bn = _quiet_when_jit_tracing(self._forward, x)
        if self.training and self.using_bn:
            self._update_running_stats(*bn)
        return y

    def _forward(self, x: torch.Tensor):
        """(y, bn): the output and the BN term (mean_bn, var_bn) it used (None without a BN term)."""
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(_compute_dtype(x.dtype))
            means, variances, bn = [xc.mean(1, keepdim=True)], [_unbiased_var(xc, 1)], None
            if self.using_bn:
                batch_stats = lambda: (xc.mean(0, keepdim=True), _unbiased_var(xc, 0))
                bn = _bn_term(batch_stats, (self.running_mean, self.running_var), self.training, xc.dtype)
                means.append(bn[0])
                variances.append(bn[1])
            mean_w = self.mean_weight.to(xc.dtype).softmax(0)
            var_w = self.var_weight.to(xc.dtype).softmax(0)
            mean = sum(mean_w[k] * t for k, t in enumerate(means))
            var = sum(var_w[k] * t for k, t in enumerate(variances))
            scale = self.weight.to(xc.dtype) * torch.rsqrt(var + self.eps)
            y = (xc - mean) * scale + self.bias.to(xc.dtype)
        return y.to(x.dtype), bn


def _sn_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _SwitchNormBase)]


@torch.no_grad()
def hard_select(model: nn.Module) -> nn.Module:
    """ARGMAX: make every SN mixture in ``model`` the one-hot choice of its largest weight (in place).

    Each layer's mean and variance logits become exactly one-hot after softmax (the chosen logit 0,
    the others -1e4) and are frozen (``requires_grad=False``), so forward normalises with exactly one
    statistic per mixture. Returns ``model``. The one-hot logits travel in the state dict: loading it
    into a freshly built model reproduces the selection (call ``hard_select`` again there to freeze).
    """
    for _, layer in _sn_layers(model):
        for logits in (layer.mean_weight, layer.var_weight):
            choice = int(torch.argmax(logits))
            logits.fill_(_HARD_OFF)
            logits[choice] = 0.0
            logits.requires_grad_(False)
    return model


def sn_mixture_weights(model: nn.Module) -> list[dict]:
    """One dict per SN layer, in module order: ``{"name", "terms", "mean", "var"}`` (softmax weights)."""
    report = []
    for name, layer in _sn_layers(model):
        mean_w, var_w = layer.mixture_weights()
        report.append({"name": name, "terms": layer.terms, "mean": mean_w.tolist(), "var": var_w.tolist()})
    return report
