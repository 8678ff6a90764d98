"""Image bytes <-> uint8 RGB arrays <-> normalised float tensors."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from .errors import DataError

# (x / 255 - 0.5) / 0.5 for every uint8 value x: cv2.LUT turns a whole image into float32 in one pass.
_NORMALISE = ((np.arange(256, dtype=np.float32) / 255 - 0.5) / 0.5).astype(np.float32)
# Decoders of OpenCV >= 4.10 write RGB directly; older ones decode BGR and get converted.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def decode_image(buf, size: int | None = None, source: str = "") -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB (H, W, 3); grayscale becomes 3 channels, alpha is dropped.

    With ``size`` the image is resized to ``size x size`` when it differs (INTER_AREA when shrinking,
    INTER_LINEAR when enlarging). Undecodable bytes raise DataError naming ``source``."""
    array = np.frombuffer(buf, dtype=np.uint8)
    image = None
    if array.size:
        try:
            image = cv2.imdecode(array, _IMREAD_RGB if _IMREAD_RGB is not None else cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
    if image is None:
        raise DataError(f"{source or 'image bytes'}: image does not decode ({array.size} bytes)")
    if _IMREAD_RGB is None:
        cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    if size is not None and image.shape[:2] != (size, size):
        shrink = size * size < image.shape[0] * image.shape[1]
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return image


def encode_image(rgb: np.ndarray, quality: int = 95, ext: str = ".jpg") -> bytes:
    """Encode a uint8 RGB (H, W, 3) image; the bytes hold BGR-encoded data as insightface's records do."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_image expects a uint8 (H, W, 3) RGB array, got {rgb.dtype} {rgb.shape}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cv2.imencode could not encode a {rgb.shape} image as {ext}")
    return buf.tobytes()


def normalised_view(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) or (N, H, W, 3) -> float (3, H, W) / (N, 3, H, W), ``(x / 255 - 0.5) / 0.5``.

    One pass over the pixels; the result is a channels-last strided view (what ``torch.stack`` in a
    DataLoader's collate copies anyway). Use :func:`to_tensor` for a contiguous tensor."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (H, W, 3) or (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    if not images.flags.c_contiguous:
        images = np.ascontiguousarray(images)
    if images.ndim == 3:
        return torch.from_numpy(cv2.LUT(images, _NORMALISE)).permute(2, 0, 1)
    flat = images.reshape(-1, images.shape[-2], 3)  # cv2 works on 2-D images with channels
    return torch.from_numpy(cv2.LUT(flat, _NORMALISE).reshape(images.shape)).permute(0, 3, 1, 2)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) or (N, H, W, 3) -> contiguous float (3, H, W) / (N, 3, H, W), (x/255-0.5)/0.5."""
    return normalised_view(images).contiguous()
