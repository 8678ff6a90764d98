"""MTCNN face detection (Zhang et al., 2016): P-Net over an image pyramid, then R-Net and O-Net.

Coordinates are pixels of the input image: boxes ``(x0, y0, x1, y1)`` with continuous edges (pixel ``i``
spans ``[i, i + 1)``), landmarks ``(x, y)`` in template order (left eye, right eye, nose, left and right
mouth corner, image-left first). A batch of images goes through each network together: all pyramid levels
of an image are laid out on one canvas and the canvases of the images of one size stacked (one P-Net call
per image size); the R-Net and O-Net crops of every image are cut with ``roi_align`` and run in one batch
each.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, roi_align

from .nets import load_nets

CELL = 12  # P-Net window
STRIDE = 2  # P-Net output stride


@dataclass(frozen=True)
class Face:
    """One detected face: ``box`` (4,) ``x0, y0, x1, y1``, ``score`` (O-Net probability), ``landmarks``
    (5, 2) ``(x, y)`` in template order."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray


def pyramid_scales(height: int, width: int, min_face: float = 20.0, factor: float = 0.709) -> list[float]:
    """Scales at which P-Net's 12-pixel window sees faces from ``min_face`` pixels up to the image size.

    The first scale maps ``min_face`` onto 12 pixels; each next one is ``factor`` times the previous, while
    the shorter side, scaled, still holds a 12-pixel window. Empty for images smaller than ``min_face``.
    """
    scale = CELL / min_face
    scales = []
    while min(height, width) * scale >= CELL:
        scales.append(scale)
        scale *= factor
    return scales


def regress_boxes(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN box regression: each edge moves by its offset times the box width (x) or height (y)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * size


def square_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The square of side ``max(width, height)`` with the same centre as each box."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def layout_levels(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Place pyramid levels ``(h, w)`` (largest first) on shelves of one canvas, at even offsets (the P-Net
    stride) so each level's output cells are those of the level on its own. Returns ``([(y, x)], (H, W))``."""
    even = lambda v: v + v % 2
    width = even(sizes[0][1]) + (even(sizes[1][1]) if len(sizes) > 1 else 0)
    offsets, x, y, shelf = [], 0, 0, 0
    for h, w in sizes:
        if x + w > width:
            x, y, shelf = 0, y + shelf, 0
        offsets.append((y, x))
        x, shelf = x + even(w), max(shelf, even(h))
    return offsets, (y + shelf, width)


class MTCNN:
    """The three-stage detector. ``detect(images)`` -> per image a list of :class:`Face`, best first.

    ``min_face``: smallest face side searched, in pixels; ``thresholds``: P-, R-, O-Net face probabilities
    kept; ``factor``: pyramid step; ``nms``: IoU thresholds (within a pyramid level, within each stage,
    final). Inputs are ``(x - 127.5) / 128``, as the networks were trained. With ``timed``, the seconds spent
    in each stage (``pnet``: pyramid, P-Net and its NMS; ``rnet``; ``onet``) add up in ``stage_seconds``
    (the device is synchronised around each stage).
    """

    def __init__(self, device="cpu", min_face: float = 20.0, thresholds=(0.6, 0.7, 0.7),
                 factor: float = 0.709, nms=(0.5, 0.7, 0.7), timed: bool = False):
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = load_nets(self.device)
        self.min_face, self.thresholds, self.factor, self.nms = min_face, thresholds, factor, nms
        self.timed, self.stage_seconds = timed, {"pnet": 0.0, "rnet": 0.0, "onet": 0.0}

    @contextmanager
    def _stage(self, name: str):
        if self.timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.timed:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stage_seconds[name] += time.perf_counter() - start

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Faces in each uint8 RGB ``(H, W, 3)`` image."""
        if not images:
            return []
        with self._stage("pnet"):
            batch = self._stack(images)
            boxes, owner = self._propose(batch, [image.shape[:2] for image in images])
        with self._stage("rnet"):
            boxes, owner, _, _ = self._refine(self.rnet, 24, batch, boxes, owner, self.thresholds[1])
        with self._stage("onet"):
            boxes, owner, scores, landmarks = self._refine(self.onet, 48, batch, square_boxes(boxes), owner,
                                                           self.thresholds[2])
            keep = batched_nms(boxes, scores, owner, self.nms[2])
        boxes, owner, scores, landmarks = (t[keep].cpu().numpy() for t in (boxes, owner, scores, landmarks))
        faces = [[] for _ in images]
        for box, i, score, points in zip(boxes, owner, scores, landmarks):
            faces[i].append(Face(box.astype(np.float64), float(score), points.astype(np.float64)))
        return faces

    def _stack(self, images: list[np.ndarray]) -> torch.Tensor:
        """Images as one zero-padded float (N, 3, H, W) batch of 0..255 values on the device."""
        height = max(image.shape[0] for image in images)
        width = max(image.shape[1] for image in images)
        batch = torch.zeros(len(images), 3, height, width, device=self.device)
        for i, image in enumerate(images):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"MTCNN.detect expects uint8 RGB (H, W, 3) images, got {image.dtype} "
                                 f"{image.shape} (image {i})")
            pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            batch[i, :, : image.shape[0], : image.shape[1]] = pixels.permute(2, 0, 1)
        return batch

    def _propose(self, batch: torch.Tensor, shapes) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net candidates (boxes, image index) of every image; images of one size share a P-Net call."""
        by_shape = {}
        for i, shape in enumerate(shapes):
            by_shape.setdefault(tuple(shape), []).append(i)
        boxes, owner = zip(*(self._propose_same_size(batch[indices], shape, indices)
                             for shape, indices in by_shape.items()))
        return torch.cat(boxes), torch.cat(owner)

    def _propose_same_size(self, images: torch.Tensor, shape, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the pyramid of ``images`` (all ``shape``), all levels laid out on one canvas."""
        height, width = shape
        scales = pyramid_scales(height, width, self.min_face, self.factor)
        if not scales:
            return torch.zeros(0, 4, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        sizes = [(math.ceil(height * s), math.ceil(width * s)) for s in scales]
        offsets, (canvas_h, canvas_w) = layout_levels(sizes)
        canvas = torch.zeros(len(images), 3, canvas_h, canvas_w, device=self.device)
        out_h, out_w = (canvas_h - CELL) // STRIDE + 1, (canvas_w - CELL) // STRIDE + 1
        # per output cell: its pyramid level (-1: none, the window leaves the level), scale and level origin
        cell_level = torch.full((out_h, out_w), -1, dtype=torch.long, device=self.device)
        cell_scale = torch.ones(out_h, out_w, device=self.device)
        cell_origin = torch.zeros(2, out_h, out_w, device=self.device)
        originals = images[:, :, :height, :width]
        for k, (scale, (lh, lw), (y, x)) in enumerate(zip(scales, sizes, offsets)):
            level = F.interpolate(originals, size=(lh, lw), mode="area")
            canvas[:, :, y : y + lh, x : x + lw] = (level - 127.5) * 0.0078125
            rows = slice(y // STRIDE, (y + lh - CELL) // STRIDE + 1)
            cols = slice(x // STRIDE, (x + lw - CELL) // STRIDE + 1)
            cell_level[rows, cols], cell_scale[rows, cols] = k, scale
            cell_origin[0, rows, cols], cell_origin[1, rows, cols] = x, y
        probability, offsets = self.pnet(canvas.contiguous(memory_format=torch.channels_last))
        candidate = (probability >= self.thresholds[0]) & (cell_level >= 0)
        image, row, col = torch.nonzero(candidate, as_tuple=True)
        top_left = torch.stack([col, row], 1) * STRIDE - cell_origin[:, row, col].T
        boxes = torch.cat([top_left, top_left + CELL], 1) / cell_scale[row, col][:, None]
        scores = probability[image, row, col]
        keep = batched_nms(boxes, scores, image * len(scales) + cell_level[row, col], self.nms[0])
        keep = keep[batched_nms(boxes[keep], scores[keep], image[keep], self.nms[1])]
        boxes = regress_boxes(boxes[keep], offsets[image[keep], :, row[keep], col[keep]])
        owner = torch.as_tensor(indices, device=self.device)[image[keep]]
        return square_boxes(boxes), owner

    def _refine(self, net, size: int, batch, boxes, owner, threshold: float):
        """R-Net or O-Net on ``size`` x ``size`` crops of ``boxes``: kept boxes (regressed), their image,
        scores, and landmarks (pixels, (K, 5, 2); empty for R-Net)."""
        empty = torch.zeros(0, 5, 2, device=self.device)
        if not len(boxes):
            return boxes, owner, torch.zeros(0, device=self.device), empty
        rois = torch.cat([owner[:, None].to(boxes.dtype), boxes], 1)
        crops = roi_align(batch, rois, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        outputs = net(((crops - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last))
        scores, offsets = outputs[0], outputs[1]
        keep = torch.nonzero(scores >= threshold).flatten()
        boxes, owner, scores, offsets = boxes[keep], owner[keep], scores[keep], offsets[keep]
        landmarks = empty
        if len(outputs) == 3:
            fractions = outputs[2][keep].view(-1, 2, 5).transpose(1, 2)  # x1..x5, y1..y5 -> (K, 5, 2)
            landmarks = boxes[:, None, :2] + fractions * (boxes[:, None, 2:] - boxes[:, None, :2])
        keep = batched_nms(boxes, scores, owner, self.nms[1])
        return regress_boxes(boxes[keep], offsets[keep]), owner[keep], scores[keep], landmarks[keep] \
            if len(landmarks) else empty
