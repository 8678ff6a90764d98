"""Training-time jitter of aligned face crops: scale, rotation, shift, colour, grayscale, blur, JPEG quality,
erasing.

Each augmentation is a mapping of parameters with a probability ``p`` (0: off); all are off unless
configured. :class:`Augment` applies the active ones to a uint8 RGB crop in a fixed order (one warp for
scale, rotation and shift, then colour, grayscale, blur, JPEG, erasing), drawing from the generator it is
given, so a seeded generator per loader worker makes the whole stream reproducible.
"""
from __future__ import annotations

import cv2
import numpy as np

from .images import decode_image, encode_image

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as cv2's RGB2GRAY
_ERASE_ASPECT = 3.0  # erased rectangles: width / height log-uniform in [1/3, 3], as in Zhong et al. 2017
_MID_GRAY = 128  # the erased pixels: 0 after the loader's (x / 255 - 0.5) / 0.5


def warp_crop(image: np.ndarray, zoom: float, degrees: float, dx: float, dy: float) -> np.ndarray:
    """Scale ``image`` by ``zoom`` and turn it by ``degrees`` (counter-clockwise as displayed) about its
    centre, then move it by (dx, dy) times its side; the border left uncovered is black, as in an aligned
    crop reaching past the photo."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, zoom)
    matrix[:, 2] += dx * width, dy * height
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def adjust_colour(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Multiply saturation (distance from the pixel's gray), then brightness, then contrast (distance
    from the mean gray) by the given factors; 1, 1, 1 leaves the image unchanged. The three are one
    linear map of each pixel, applied in one pass."""
    mean = brightness * float(_LUMA @ np.array(cv2.mean(image)[:3], np.float32))
    linear = contrast * brightness * (saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), _LUMA))
    shift = np.full((3, 1), (1 - contrast) * mean)
    return cv2.transform(image, np.hstack([linear, shift]))


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """The luma of ``image`` in all three channels."""
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels."""
    return cv2.GaussianBlur(image, (0, 0), sigma)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` encoded as a JPEG of ``quality`` (1-100) and decoded again."""
    return decode_image(encode_image(image, quality=quality))


def erase_rectangle(image: np.ndarray, area: float, aspect: float, x: float, y: float) -> np.ndarray:
    """``image`` with a mid-gray rectangle of ``area`` (a fraction of the image) and ``aspect`` (width /
    height; each side capped at the image's); ``x``, ``y`` in [0, 1] place it from the left / top edge to
    the right / bottom one (random erasing, Zhong et al. 2017)."""
    height, width = image.shape[:2]
    pixels = area * height * width
    box_w = min(width, max(1, round(np.sqrt(pixels * aspect))))
    box_h = min(height, max(1, round(np.sqrt(pixels / aspect))))
    left, top = round(x * (width - box_w)), round(y * (height - box_h))
    erased = image.copy()
    erased[top:top + box_h, left:left + box_w] = _MID_GRAY
    return erased


class Augment:
    """The active augmentations and their parameters; ``augment(image, rng)`` returns a jittered copy.

    Arguments (each a mapping, or None / ``p: 0`` for off):
    ``scale {p, max}``: zoom by a factor in [1 - max, 1 + max]; ``rotate {p, max}``: turn by up to ``max``
    degrees either way; ``shift {p, max}``: move by up to ``max`` times the side along each axis;
    ``colour {p, brightness, contrast, saturation}``: multiply each by a factor in [1 - x, 1 + x];
    ``grayscale {p}``; ``blur {p, sigma: [lo, hi]}`` in pixels;
    ``jpeg {p, quality: [lo, hi]}``; ``erase {p, area: [lo, hi]}``: one mid-gray rectangle covering a
    fraction of the crop drawn from [lo, hi], of random aspect and place. Bad values raise ValueError
    naming the key, e.g. ``blur.sigma``.
    """

    def __init__(self, scale=None, rotate=None, shift=None, colour=None, grayscale=None, blur=None, jpeg=None,
                 erase=None):
        given = dict(scale=scale, rotate=rotate, shift=shift, colour=colour, grayscale=grayscale, blur=blur,
                     jpeg=jpeg, erase=erase)
        for name, params in given.items():
            if params:
                _check(name, params)
        self.settings = {name: dict(params) for name, params in given.items() if params and params["p"] > 0}

    def __bool__(self) -> bool:
        return bool(self.settings)

    def __repr__(self) -> str:
        return f"Augment({self.settings})"

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        fires = {name: rng.random() < params["p"] for name, params in self.settings.items()}
        if fires.get("scale") or fires.get("rotate") or fires.get("shift"):
            zoom = 1 + rng.uniform(-1, 1) * self.settings["scale"]["max"] if fires.get("scale") else 1.0
            degrees = rng.uniform(-1, 1) * self.settings["rotate"]["max"] if fires.get("rotate") else 0.0
            dx, dy = rng.uniform(-1, 1, 2) * self.settings["shift"]["max"] if fires.get("shift") else (0, 0)
            image = warp_crop(image, zoom, degrees, dx, dy)
        if fires.get("colour"):
            factors = [self.settings["colour"][k] for k in ("brightness", "contrast", "saturation")]
            image = adjust_colour(image, *(1 + rng.uniform(-1, 1, 3) * factors))
        if fires.get("grayscale"):
            image = to_grayscale(image)
        if fires.get("blur"):
            image = gaussian_blur(image, rng.uniform(*self.settings["blur"]["sigma"]))
        if fires.get("jpeg"):
            low, high = self.settings["jpeg"]["quality"]
            image = jpeg_roundtrip(image, int(rng.integers(int(low), int(high), endpoint=True)))
        if fires.get("erase"):
            area = rng.uniform(*self.settings["erase"]["area"])
            aspect = _ERASE_ASPECT ** rng.uniform(-1, 1)
            image = erase_rectangle(image, area, aspect, *rng.random(2))
        return image


_KEYS = {"scale": ("p", "max"), "rotate": ("p", "max"), "shift": ("p", "max"), "grayscale": ("p",),
         "blur": ("p", "sigma"), "colour": ("p", "brightness", "contrast", "saturation"),
         "jpeg": ("p", "quality"), "erase": ("p", "area")}
_BOUNDS = {"p": (0, 1), "scale.max": (0, 0.9), "rotate.max": (0, 45), "shift.max": (0, 0.5),
           "colour.brightness": (0, 1), "colour.contrast": (0, 1), "colour.saturation": (0, 1),
           "blur.sigma": (0.1, 10), "jpeg.quality": (1, 100), "erase.area": (0.01, 1)}
_PAIRS = ("blur.sigma", "jpeg.quality", "erase.area")  # [lo, hi] ranges drawn from uniformly


def _check(name: str, params: dict) -> None:
    """Raise ValueError naming ``name.key`` for missing, unknown or out-of-range parameters."""
    if set(params) != set(_KEYS[name]):
        raise ValueError(f"{name} takes the keys {', '.join(_KEYS[name])}; got {', '.join(map(str, params))}")
    for key, value in params.items():
        dotted = f"{name}.{key}"
        low, high = _BOUNDS["p" if key == "p" else dotted]
        pair = dotted in _PAIRS
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if (isinstance(value, (list, tuple)) != pair or len(values) != (2 if pair else 1)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
                           for v in values) or values != sorted(values)):
            wanted = f"a pair [lo, hi] with {low} <= lo <= hi <= {high}" if pair else \
                f"a number in [{low}, {high}]"
            raise ValueError(f"{dotted} must be {wanted}, got {value!r}")
