"""Face alignment to the ArcFace template (least-squares similarity, as insightface's ``norm_crop``)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

# (x, y) of left eye, right eye, nose tip, left and right mouth corner in a 112x112 crop (image-left first).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def similarity_transform(src_points, dst_points) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping ``src_points`` onto ``dst_points``.

    Umeyama (1991), closed form, all points weighted equally (no RANSAC, no outlier rejection). A reflection
    is never returned: when the best orthogonal fit would mirror, the nearest proper rotation is used.
    Returns the 2x3 float64 matrix ``M`` with ``dst ~= M[:, :2] @ src + M[:, 2]``.
    """
    src = np.asarray(src_points, dtype=np.float64)
    dst = np.asarray(dst_points, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(
            f"similarity_transform expects two (N, 2) point arrays of equal shape with N >= 2, "
            f"got {src.shape} and {dst.shape}"
        )
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 0:
        raise ValueError("similarity_transform: source points are all identical")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # best orthogonal fit is a reflection: flip the weakest axis
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def template_for_size(size: int) -> np.ndarray:
    """The ArcFace template scaled to a ``size`` x ``size`` crop (``size / 112``, same relative face box)."""
    return ARCFACE_TEMPLATE * (size / 112.0)


def align_face(image: np.ndarray, landmarks5, size: int = 112, reference=None) -> np.ndarray:
    """Warp ``image`` so that its landmarks land on the ArcFace template; returns a ``size`` x ``size`` crop.

    ``landmarks5``: (5, 2) pixel (x, y) in template order (left eye, right eye, nose, left/right mouth
    corner, image-left first). ``reference``: other target points in 112x112 coordinates, one per landmark
    (e.g. a subset of the template for partly visible faces); default :data:`ARCFACE_TEMPLATE`. Both are
    scaled by ``size / 112``. The transform is :func:`similarity_transform`; the channel order of ``image`` is
    kept. Pixels from outside the source image are black (``cv2.BORDER_CONSTANT``, value 0), as insightface's
    ``norm_crop``.
    """
    points = np.asarray(landmarks5, dtype=np.float64)
    target = ARCFACE_TEMPLATE if reference is None else np.asarray(reference, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape != target.shape:
        raise ValueError(f"align_face expects landmarks of shape {target.shape}, got {points.shape}")
    matrix = similarity_transform(points, target * (size / 112.0))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def crop_face(image: np.ndarray, size: int = 112, box=None) -> np.ndarray:
    """Crop ``box`` = (x0, y0, x1, y1) (default: the centred square of side min(H, W)) and resize to ``size``.

    For already aligned or loosely centred faces when no landmarks exist; a non-square box is stretched.
    Shrinking uses ``cv2.INTER_AREA``, enlarging ``cv2.INTER_LINEAR``.
    """
    height, width = image.shape[:2]
    if box is None:
        side = min(height, width)
        x0, y0 = (width - side) // 2, (height - side) // 2
        box = (x0, y0, x0 + side, y0 + side)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"crop box {box} lies outside the {width}x{height} image")
    crop = image[y0:y1, x0:x1]
    shrinking = (x1 - x0) > size or (y1 - y0) > size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_landmarks_csv(path) -> dict[str, np.ndarray]:
    """Read ``image,x1,y1,...,x5,y5`` rows (header optional) into ``{image: (5, 2) float array}``.

    ``image`` is kept as written (a path relative to the image folder, with ``/`` separators). Raises
    ``FileNotFoundError`` or ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmarks file not found: {path}")
    landmarks = {}
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 11:
                raise ValueError(
                    f"{path}:{line_no}: expected 11 columns (image, x1, y1, ..., x5, y5), got {len(row)}"
                )
            try:
                values = np.array([float(v) for v in row[1:]], dtype=np.float64).reshape(5, 2)
            except ValueError:
                if line_no == 1:  # header
                    continue
                raise ValueError(f"{path}:{line_no}: landmarks must be numbers: {row[1:]}") from None
            if not np.isfinite(values).all():
                raise ValueError(f"{path}:{line_no}: landmark coordinates must be finite: {row[1:]}")
            key = row[0].strip().replace("\\", "/")
            if key in landmarks:
                raise ValueError(f"{path}:{line_no}: duplicate landmarks for {key!r}")
            landmarks[key] = values
    return landmarks
