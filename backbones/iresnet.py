"""Face ResNets ("IResNet", the insightface backbone family) with a pluggable 2-D norm layer.

Layout (input S x S, S a multiple of 16, 112 as published):
stem conv3x3/1 + norm + PReLU (no max-pool) -> 4 stages of :class:`IBasicBlock`, each starting with
stride 2 -> head: norm2d -> dropout -> flatten (8*width * (S/16)^2) -> linear -> BatchNorm1d with
its scale fixed at 1.  Module names follow insightface (``conv1, bn1, prelu, layer1..4, bn2, dropout,
fc, features``) so its checkpoints keep their keys.
"""
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .checkpointing import run_stages

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def embedding_head_norm(embedding_size: int) -> nn.BatchNorm1d:
    """BatchNorm1d of the embedding head with its scale fixed at 1 (insightface's ``features``)."""
    features = nn.BatchNorm1d(embedding_size, eps=1e-5)
    nn.init.ones_(features.weight)
    features.weight.requires_grad = False
    return features


def zero_init_last_norms(model: nn.Module) -> None:
    """Set the scale of each residual block's last norm to 0 (``zero_init_residual``), where it has one."""
    for module in model.modules():
        last = getattr(module, "last_norm", None)
        if isinstance(last, nn.Module) and getattr(last, "weight", None) is not None:
            nn.init.zeros_(last.weight)


def init_convs(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) initialisation of every convolution, as torchvision."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class IBasicBlock(nn.Module):
    """norm -> conv3x3 -> norm -> PReLU -> conv3x3(stride) -> norm, plus the (projected) input."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = norm_layer(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm_layer(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), norm_layer(planes)
            )

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.bn3(self.conv2(self.prelu(self.bn2(out))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """Face ResNet mapping a normalised RGB batch (N, 3, S, S) to embeddings (N, embedding_size).

    Args:
        layers: number of blocks in each of the 4 stages, e.g. ``(3, 4, 14, 3)`` for iresnet50.
        norm_layer: factory ``norm_layer(num_features) -> nn.Module`` used for every 2-D norm.
        embedding_size: output dimension.
        input_size: S, a multiple of 16 (fixes the flattened size before ``fc``).
        width: channels of the first stage; stages have ``width * (1, 2, 4, 8)``.
        dropout: dropout probability before ``fc``.
        zero_init_residual: zero-initialise the scale of each block's last norm (as torchvision), so
            each residual branch starts as the identity.
        activation_checkpointing: in training, recompute each stage's activations in the backward pass
            instead of keeping them (less memory, about one more forward pass of time); eval is unaffected.
    """

    def __init__(
        self,
        layers: Sequence[int],
        norm_layer: NormLayer,
        embedding_size: int = 512,
        input_size: int = 112,
        width: int = 64,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {list(layers)}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.activation_checkpointing = activation_checkpointing
        self.inplanes = width
        self.conv1 = conv3x3(3, width)
        self.bn1 = norm_layer(width)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(width, layers[0], norm_layer)
        self.layer2 = self._make_layer(width * 2, layers[1], norm_layer)
        self.layer3 = self._make_layer(width * 4, layers[2], norm_layer)
        self.layer4 = self._make_layer(width * 8, layers[3], norm_layer)
        self.bn2 = norm_layer(width * 8)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(width * 8 * (input_size // 16) ** 2, embedding_size)
        self.features = embedding_head_norm(embedding_size)
        init_convs(self)
        if zero_init_residual:
            zero_init_last_norms(self)

    def _make_layer(self, planes: int, blocks: int, norm_layer: NormLayer) -> nn.Sequential:
        layers = [IBasicBlock(self.inplanes, planes, 2, norm_layer)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes, 1, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = run_stages((self.layer1, self.layer2, self.layer3, self.layer4), x,
                       self.activation_checkpointing and self.training and torch.is_grad_enabled())
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))
