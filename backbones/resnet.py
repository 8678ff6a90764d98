"""ImageNet-style ResNets (v1, He et al. 2015) and pre-activation ResNets (v2, He et al. 2016) as
embedding backbones, with a pluggable 2-D norm layer.

The layouts are those of torchvision and of the published Switchable Normalization model zoo
(``resnet_v1_sn`` / ``resnet_v2_sn``): stem conv7x7/2 + norm + ReLU + max-pool, 4 stages (strides
1, 2, 2, 2, v1 bottlenecks stride on the 3x3 conv), v2 ends with norm + ReLU.  Module names are those
of the published SN models, whatever the norm: norms ``sn1, sn2, sn3`` (v2's final one ``sn_out``), a
v1 shortcut ``downsample.0`` conv + ``downsample.1`` norm, a v2 shortcut a bare 1x1 conv
``downsample``; so a published checkpoint passed through ``convert_published_sn`` keeps its keys.
Instead of the 1000-way classifier the head is global average pool -> dropout -> ``fc`` (linear to
embedding_size) -> ``features`` (BatchNorm1d, scale fixed at 1).
"""
from collections.abc import Sequence

import torch
from torch import nn

from .checkpointing import run_stages
from .iresnet import NormLayer, conv3x3, embedding_head_norm, init_convs, zero_init_last_norms


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """v1 block: conv3x3 -> norm -> ReLU -> conv3x3 -> norm, + shortcut, ReLU."""

    expansion = 1
    preact = False

    def __init__(self, inplanes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.sn1 = norm_layer(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.sn2 = norm_layer(planes)
        self.downsample = _v1_shortcut(inplanes, planes * self.expansion, stride, norm_layer)

    @property
    def last_norm(self) -> nn.Module:
        return self.sn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.sn1(self.conv1(x)))
        out = self.sn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """v1 bottleneck (stride on the 3x3 conv, torchvision "v1.5"): 1x1 -> 3x3 -> 1x1 (x4 channels)."""

    expansion = 4
    preact = False

    def __init__(self, inplanes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.sn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.sn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.sn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = _v1_shortcut(inplanes, planes * self.expansion, stride, norm_layer)

    @property
    def last_norm(self) -> nn.Module:
        return self.sn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.sn1(self.conv1(x)))
        out = self.relu(self.sn2(self.conv2(out)))
        out = self.sn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class PreActBasicBlock(nn.Module):
    """v2 block: norm -> ReLU -> conv3x3 -> norm -> ReLU -> conv3x3, + shortcut of the pre-activation."""

    expansion = 1
    preact = True

    def __init__(self, inplanes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.sn1 = norm_layer(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.sn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU()
        self.downsample = _v2_shortcut(inplanes, planes * self.expansion, stride)

    @property
    def last_norm(self) -> nn.Module:
        return self.sn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.sn1(x))
        out = self.conv2(self.relu(self.sn2(self.conv1(preact))))
        identity = x if self.downsample is None else self.downsample(preact)
        return out + identity


class PreActBottleneck(nn.Module):
    """v2 bottleneck: (norm -> ReLU -> conv) x 3 with 1x1, 3x3 (stride), 1x1 (x4 channels)."""

    expansion = 4
    preact = True

    def __init__(self, inplanes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.sn1 = norm_layer(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.sn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.sn3 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = _v2_shortcut(inplanes, planes * self.expansion, stride)

    @property
    def last_norm(self) -> nn.Module:
        return self.sn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.sn1(x))
        out = self.conv2(self.relu(self.sn2(self.conv1(preact))))
        out = self.conv3(self.relu(self.sn3(out)))
        identity = x if self.downsample is None else self.downsample(preact)
        return out + identity


def _v1_shortcut(inplanes: int, outplanes: int, stride: int, norm_layer: NormLayer) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))


def _v2_shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return conv1x1(inplanes, outplanes, stride)


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]


class ResNet(nn.Module):
    """ResNet v1 or v2 (chosen by ``block``) mapping (N, 3, S, S) to embeddings (N, embedding_size).

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for depth 50.
        block: one of BasicBlock, Bottleneck (v1) or PreActBasicBlock, PreActBottleneck (v2).
        norm_layer: factory ``norm_layer(num_features) -> nn.Module`` used for every 2-D norm.
        embedding_size, width, dropout, zero_init_residual, activation_checkpointing: as
            :class:`backbones.iresnet.IResNet`.
        input_size: accepted for a uniform builder signature; global average pooling makes the head
            independent of it (the stride-32 network leaves a 1x1 map at 32x32 input).
    """

    def __init__(
        self,
        layers: Sequence[int],
        block: Block,
        norm_layer: NormLayer,
        embedding_size: int = 512,
        input_size: int = 224,
        width: int = 64,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {list(layers)}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.activation_checkpointing = activation_checkpointing
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.sn1 = norm_layer(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], 1, norm_layer)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, norm_layer)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, norm_layer)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, norm_layer)
        self.sn_out = norm_layer(self.inplanes) if block.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.inplanes, embedding_size)
        self.features = embedding_head_norm(embedding_size)
        init_convs(self)
        if zero_init_residual:
            zero_init_last_norms(self)

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int, norm_layer: NormLayer
    ) -> nn.Sequential:
        layers = [block(self.inplanes, planes, stride, norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.sn1(self.conv1(x))))
        x = run_stages((self.layer1, self.layer2, self.layer3, self.layer4), x,
                       self.activation_checkpointing and self.training and torch.is_grad_enabled())
        if self.sn_out is not None:
            x = self.relu(self.sn_out(x))
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return self.features(self.fc(x))
