"""MTCNN's three networks (Zhang et al., 2016) and the published weights they load.

The weights are the ones shipped in the ``facenet-pytorch==2.6.0`` wheel (MIT licence) as
``facenet_pytorch/data/{pnet,rnet,onet}.pt``. The package is never imported: its data files are located
through ``importlib.metadata``, checked against their sha256 and their parameter names mapped onto the
modules here. Those weights were converted from the original Caffe release so that the convolutions take
images in the usual (N, C, H, W) orientation; only the first fully connected layer of R-Net and O-Net still
expects its input flattened in the Caffe (transposed) order (W, H, C), which :class:`_Dense` restores.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import torch
from torch import nn

WEIGHTS_PACKAGE = "facenet-pytorch"
WEIGHTS_VERSION = "2.6.0"
INSTALL_HINT = (f"install them with `pip install --no-deps -r requirements-detect.txt` ({WEIGHTS_PACKAGE}=="
                f"{WEIGHTS_VERSION}, whose wheel ships the published MTCNN weights; it is never imported)")
WEIGHTS_SHA256 = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
# their parameter prefixes -> ours
PARAMETER_NAMES = {
    "pnet": {"conv1": "body.0", "prelu1": "body.1", "conv2": "body.3", "prelu2": "body.4", "conv3": "body.5",
             "prelu3": "body.6", "conv4_1": "score", "conv4_2": "box"},
    "rnet": {"conv1": "body.0", "prelu1": "body.1", "conv2": "body.3", "prelu2": "body.4", "conv3": "body.6",
             "prelu3": "body.7", "dense4": "dense.linear", "prelu4": "dense.act", "dense5_1": "score",
             "dense5_2": "box"},
    "onet": {"conv1": "body.0", "prelu1": "body.1", "conv2": "body.3", "prelu2": "body.4", "conv3": "body.6",
             "prelu3": "body.7", "conv4": "body.9", "prelu4": "body.10", "dense5": "dense.linear",
             "prelu5": "dense.act", "dense6_1": "score", "dense6_2": "box", "dense6_3": "landmarks"},
}


def _conv_body(channels: list[int], kernels: list[int], pools: list[tuple[int, int] | None]) -> nn.Sequential:
    """Conv + PReLU blocks, each followed by a max-pool ``(kernel, stride)`` (ceil mode, as Caffe) or none."""
    layers = []
    for c_in, c_out, kernel, pool in zip(channels[:-1], channels[1:], kernels, pools):
        layers += [nn.Conv2d(c_in, c_out, kernel), nn.PReLU(c_out)]
        if pool is not None:
            layers.append(nn.MaxPool2d(*pool, ceil_mode=True))
    return nn.Sequential(*layers)


class _Dense(nn.Module):
    """Flatten in the Caffe order (W, H, C), then Linear + PReLU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.PReLU(out_features)

    def forward(self, x):
        return self.act(self.linear(x.permute(0, 3, 2, 1).flatten(1)))


class PNet(nn.Module):
    """Proposal net: fully convolutional, a 12x12 window per output cell (stride 2).

    Returns ``(face probability (N, H', W'), box offsets (N, 4, H', W'))``."""

    def __init__(self):
        super().__init__()
        self.body = _conv_body([3, 10, 16, 32], [3, 3, 3], [(2, 2), None, None])
        self.score = nn.Conv2d(32, 2, 1)
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.body(x)
        return self.score(x).softmax(1)[:, 1], self.box(x)


class RNet(nn.Module):
    """Refinement net on 24x24 crops: ``(face probability (N,), box offsets (N, 4))``."""

    def __init__(self):
        super().__init__()
        self.body = _conv_body([3, 28, 48, 64], [3, 3, 2], [(3, 2), (3, 2), None])
        self.dense = _Dense(576, 128)
        self.score = nn.Linear(128, 2)
        self.box = nn.Linear(128, 4)

    def forward(self, x):
        x = self.dense(self.body(x))
        return self.score(x).softmax(1)[:, 1], self.box(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: ``(face probability (N,), box offsets (N, 4), landmarks (N, 10))``; the
    landmarks are fractions of the crop, ``x1..x5`` then ``y1..y5``."""

    def __init__(self):
        super().__init__()
        self.body = _conv_body([3, 32, 64, 64, 128], [3, 3, 3, 2], [(3, 2), (3, 2), (2, 2), None])
        self.dense = _Dense(1152, 256)
        self.score = nn.Linear(256, 2)
        self.box = nn.Linear(256, 4)
        self.landmarks = nn.Linear(256, 10)

    def forward(self, x):
        x = self.dense(self.body(x))
        return self.score(x).softmax(1)[:, 1], self.box(x), self.landmarks(x)


NETS = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def weights_paths() -> dict[str, Path]:
    """Paths of the installed ``{pnet,rnet,onet}.pt`` (found, never imported); errors say how to install."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"MTCNN weights not found: {INSTALL_HINT}") from None
    paths = {name: Path(dist.locate_file(f"facenet_pytorch/data/{name}.pt")) for name in NETS}
    for name, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"MTCNN weights file {path} is missing ({WEIGHTS_PACKAGE} {dist.version} "
                                    f"installed): {INSTALL_HINT}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != WEIGHTS_SHA256[name]:
            raise ValueError(f"{path}: sha256 {digest} is not the published {name} weights' "
                             f"{WEIGHTS_SHA256[name]} ({WEIGHTS_PACKAGE} {dist.version}): {INSTALL_HINT}")
    return paths


def rename_parameters(state: dict, net: str) -> dict:
    """Their parameter names (``conv1.weight``, ``dense5_1.bias``, ...) -> ours; ``net`` in :data:`NETS`."""
    renamed = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in PARAMETER_NAMES[net]:
            raise KeyError(f"{net} weights: unexpected parameter {key!r}")
        renamed[f"{PARAMETER_NAMES[net][prefix]}.{leaf}"] = value
    return renamed


def load_nets(device="cpu") -> tuple[PNet, RNet, ONet]:
    """The three networks with the published weights, in eval mode, on ``device``, without gradients, in
    channels-last memory format (2-3x faster on CPUs: max-pooling is slow on (N, C, H, W) tensors)."""
    nets = []
    for name, path in weights_paths().items():
        net = NETS[name]()
        net.load_state_dict(rename_parameters(torch.load(path, map_location="cpu", weights_only=True), name))
        nets.append(net.eval().requires_grad_(False).to(device, memory_format=torch.channels_last))
    return tuple(nets)
