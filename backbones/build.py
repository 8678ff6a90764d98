"""Backbone registry: one entry per name, ``build_backbone`` to construct it with any norm layer."""
import functools

from torch import nn

from .checks import check_positive_int
from .iresnet import IResNet
from .norms import make_norm
from .resnet import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, ResNet

_RESNET_DEPTHS = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)
}
_IRESNET_DEPTHS = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)
}


def _resnet(block_basic, block_bottleneck, depth):
    block = block_basic if depth < 50 else block_bottleneck
    return functools.partial(ResNet, block=block), _RESNET_DEPTHS[depth]


# name -> (builder(layers, norm_layer=..., embedding_size=..., ...), stage depths)
_REGISTRY = {
    **{f"iresnet{d}": (IResNet, layers) for d, layers in _IRESNET_DEPTHS.items()},
    **{f"resnet{d}": _resnet(BasicBlock, Bottleneck, d) for d in _RESNET_DEPTHS},
    **{f"preresnet{d}": _resnet(PreActBasicBlock, PreActBottleneck, d) for d in _RESNET_DEPTHS},
}

BACKBONES = tuple(_REGISTRY)


def build_backbone(
    name: str,
    norm: str = "sn",
    embedding_size: int = 512,
    input_size: int = 112,
    width: int = 64,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    activation_checkpointing: bool = False,
    **norm_kwargs,
) -> nn.Module:
    """Build backbone ``name`` mapping (N, 3, input_size, input_size) to (N, embedding_size).

    Every 2-D norm is ``make_norm(norm, num_features, **norm_kwargs)``; the embedding head keeps a
    BatchNorm1d with its scale fixed at 1.  ``zero_init_residual=True`` zero-initialises the scale of
    each residual block's last norm (any norm with a weight), as torchvision's option of that name.
    ``activation_checkpointing=True`` recomputes each of the 4 stages in the backward pass of training
    steps instead of keeping its activations (running statistics are still updated once per step).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    for key, value in (("embedding_size", embedding_size), ("input_size", input_size), ("width", width)):
        check_positive_int(key, value)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if "last_gamma" in norm_kwargs:  # SwitchNorm2d's own argument: would zero the scale of *every* norm
        raise ValueError("last_gamma is SwitchNorm2d's argument (scale starts at 0), not a backbone option: "
                         "use zero_init_residual=True to zero-initialise each residual block's last norm")
    builder, layers = _REGISTRY[name]
    return builder(
        layers,
        norm_layer=functools.partial(make_norm, norm, **norm_kwargs),
        embedding_size=embedding_size,
        input_size=input_size,
        width=width,
        dropout=dropout,
        zero_init_residual=bool(zero_init_residual),
        activation_checkpointing=bool(activation_checkpointing),
    )
