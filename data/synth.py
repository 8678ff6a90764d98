"""Synthetic face-like identity datasets, packed exactly like insightface's (train.rec/.idx, property, .bin).

Each identity is a set of stable traits (head shape and proportions, skin/hair/eye colours, hair style,
facial hair, glasses, moles and freckles); each image renders those traits under a random head pose
(yaw/pitch/roll of a rough 3-D face), scale, position, expression, background, lighting, blur, noise,
occlusion and JPEG quality. Every identity and image draws from its own ``numpy.random.Generator`` derived
from ``(seed, identity, image)``, so the bytes written depend on the arguments only, never on ``workers``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .bins import write_bin
from .errors import DataError
from .images import encode_image
from .pack import write_identity_records
from .workers import map_ordered, remove_dead_temporaries

SUPERSAMPLE = 2  # faces are drawn at this multiple of the output size, then shrunk (anti-aliasing)
MANIFEST = "synth.json"
FOLDS = 10

_HAIR_COLOURS = np.array(
    [
        [20, 16, 14],
        [45, 30, 22],
        [85, 55, 35],
        [130, 90, 55],
        [200, 165, 110],
        [150, 60, 30],
        [150, 150, 150],
        [225, 225, 220],
    ],
    np.float32,
)
_IRIS_COLOURS = np.array(
    [[60, 35, 20], [25, 18, 15], [70, 110, 170], [70, 120, 80], [120, 125, 130], [120, 90, 45]], np.float32
)


@dataclass(frozen=True)
class FaceTraits:
    """Stable traits of one synthetic identity (lengths in head half-widths, colours RGB 0..255)."""

    width: float  # half-width of the head
    height: float  # half-height of the head
    depth: float  # half-depth (how far features bulge towards the camera)
    chin: float  # super-ellipse exponent of the lower half: < 2 pointed, > 2 square
    crown: float  # super-ellipse exponent of the upper half
    skin: tuple
    hair: tuple
    iris: tuple
    lips: tuple
    hairline: float  # y of the hairline (negative = above the centre)
    hair_volume: float  # how far hair extends beyond the head outline
    hair_length: float  # y where side hair ends (long hair reaches below the chin)
    parting: float  # x offset of the fringe's low point
    bald: bool
    eye_y: float
    eye_gap: float  # half distance between the eye centres
    eye_w: float
    eye_h: float
    iris_r: float
    brow_gap: float
    brow_thick: float
    brow_slant: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    ear_size: float
    beard: bool
    moustache: bool
    glasses: bool
    glasses_colour: tuple
    marks: tuple  # ((x, y, radius), ...) moles on the face surface
    freckles: tuple  # ((x, y), ...) small spots on the cheeks and nose


def identity_rng(seed: int, identity: int) -> np.random.Generator:
    """Generator of identity ``identity``'s traits (independent of every other identity and image)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, identity)))


def image_rng(seed: int, identity: int, image: int) -> np.random.Generator:
    """Generator of the nuisance factors (pose, light, ...) of one image of one identity."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, identity, image)))


def _colour(rng, base, jitter):
    return tuple(float(c) for c in np.clip(np.asarray(base, np.float32) + rng.normal(0, jitter, 3), 0, 255))


def sample_traits(rng: np.random.Generator) -> FaceTraits:
    """Draw one identity's traits."""
    u = rng.uniform
    tone = u(0.0, 1.0)
    skin = np.array([250, 218, 190]) * (1 - tone) + np.array([95, 60, 42]) * tone
    skin = _colour(rng, skin, 18)
    hair = _colour(rng, _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], 30)
    lips = _colour(rng, 0.55 * np.array(skin) + 0.45 * np.array([190, 70, 80]), 12)
    n_marks = int(rng.integers(0, 4))
    marks = tuple((float(u(-0.7, 0.7)), float(u(-0.5, 0.9)), float(u(0.025, 0.06))) for _ in range(n_marks))
    freckles = (
        tuple(map(tuple, u([-0.55, -0.05], [0.55, 0.45], (14, 2)).tolist())) if rng.random() < 0.15 else ()
    )
    width = u(0.85, 1.15)
    return FaceTraits(
        width=width,
        height=width * u(1.2, 1.55),
        depth=width * u(0.8, 1.1),
        chin=u(1.4, 3.2),
        crown=u(1.8, 2.8),
        skin=skin,
        hair=hair,
        iris=_colour(rng, _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))], 10),
        lips=lips,
        hairline=u(-0.95, -0.35),
        hair_volume=u(0.03, 0.35),
        hair_length=u(-0.3, 1.6),
        parting=u(-0.6, 0.6),
        bald=bool(rng.random() < 0.1),
        eye_y=u(-0.25, 0.05),
        eye_gap=u(0.3, 0.48),
        eye_w=u(0.15, 0.25),
        eye_h=u(0.35, 0.65),
        iris_r=u(0.35, 0.5),
        brow_gap=u(0.12, 0.26),
        brow_thick=u(0.03, 0.09),
        brow_slant=u(-0.3, 0.3),
        nose_len=u(0.25, 0.45),
        nose_w=u(0.1, 0.24),
        mouth_y=u(0.45, 0.75),
        mouth_w=u(0.25, 0.55),
        lip_thick=u(0.03, 0.1),
        ear_size=u(0.18, 0.34),
        beard=bool(rng.random() < 0.2),
        moustache=bool(rng.random() < 0.25),
        glasses=bool(rng.random() < 0.15),
        glasses_colour=_colour(rng, [40, 40, 40], 40),
        marks=marks,
        freckles=freckles,
    )


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (
        math.cos(yaw),
        math.sin(yaw),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(roll),
        math.sin(roll),
    )
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Camera:
    """Maps face coordinates (x right, y down, z towards the viewer) to pixel coordinates."""

    def __init__(self, t: FaceTraits, rotation, centre, scale):
        self.t, self.r, self.centre, self.scale = t, rotation, np.asarray(centre), scale

    def surface(self, xy) -> np.ndarray:
        """Lift (N, 2) face-plane points onto the head ellipsoid and project them: (N, 2) float pixels."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        q = 1 - (xy[:, 0] / self.t.width) ** 2 - (xy[:, 1] / self.t.height) ** 2
        z = self.t.depth * np.sqrt(np.clip(q, 0.05, None))
        p = np.column_stack([xy, z]) @ self.r.T
        return p[:, :2] * self.scale + self.centre

    def px(self, xy) -> np.ndarray:
        return np.round(self.surface(xy) * 16).astype(np.int32)  # 4 fractional bits for cv2 (shift=4)


def _outline(t: FaceTraits, n: int = 48) -> np.ndarray:
    """Head outline in the face plane: super-ellipse with different exponents above and below the centre."""
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(a), np.sin(a)
    p = np.where(s > 0, t.chin, t.crown)
    x = t.width * np.sign(c) * np.abs(c) ** (2 / p)
    y = t.height * np.sign(s) * np.abs(s) ** (2 / p)
    return np.column_stack([x, y])


def _background(rng, n: int) -> np.ndarray:
    kind = rng.integers(4)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    img = np.empty((n, n, 3), np.float32)
    img[:] = base
    if kind >= 1:  # linear gradient to a second colour
        other = rng.uniform(0, 255, 3).astype(np.float32)
        ang = rng.uniform(0, 2 * np.pi)
        g = np.linspace(-1, 1, n, dtype=np.float32)
        ramp = (np.cos(ang) * g[None, :] + np.sin(ang) * g[:, None]) * 0.5 + 0.5
        img = img * (1 - ramp[..., None]) + other * ramp[..., None]
    if kind >= 2:  # low-frequency clutter
        k = 4 if kind == 2 else 8
        blobs = cv2.resize(
            rng.normal(0, 45, (k, k, 3)).astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC
        )
        img = img + blobs
    if kind == 3:  # a few random shapes (door frames, shelves, other objects)
        for _ in range(int(rng.integers(1, 4))):
            p1 = tuple(int(v) for v in rng.integers(0, n, 2))
            p2 = tuple(int(v) for v in rng.integers(0, n, 2))
            cv2.rectangle(img, p1, p2, tuple(float(v) for v in rng.uniform(0, 255, 3)), -1)
    return img


def render_face(t: FaceTraits, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one image of identity ``t`` with nuisance factors from ``rng``: uint8 RGB (size, size, 3)."""
    n = size * SUPERSAMPLE
    u = rng.uniform
    img = _background(rng, n)
    yaw, pitch, roll = (
        math.radians(u(-30, 30)),
        math.radians(u(-15, 15)),
        math.radians(np.clip(rng.normal(0, 8), -25, 25)),
    )
    scale = n * 0.27 * math.exp(u(-0.15, 0.15))
    centre = np.array([n / 2, n / 2 + 0.1 * scale]) + rng.normal(0, 0.05 * n, 2)
    cam = _Camera(t, _rotation(yaw, pitch, roll), centre, scale)
    sh = 4
    aa = cv2.LINE_AA

    def poly(points, colour, closed=True, thick=-1):
        pts = cam.px(points)
        if thick < 0:
            cv2.fillPoly(img, [pts], colour, aa, sh)
        else:
            cv2.polylines(img, [pts], closed, colour, max(1, int(thick * scale)), aa, sh)

    def ellipse(xy, axes, angle, colour, thick=-1):
        c = cam.px([xy])[0]
        ax = (
            max(1, int(axes[0] * scale * 16 * abs(math.cos(yaw + xy[0] * 0.6)))),
            max(1, int(axes[1] * scale * 16)),
        )
        cv2.ellipse(
            img,
            tuple(int(v) for v in c),
            ax,
            angle + math.degrees(roll),
            0,
            360,
            colour,
            -1 if thick < 0 else max(1, int(thick * scale)),
            aa,
            sh,
        )

    outline = _outline(t)
    # silhouette: the head's outline seen from the rotated view hardly shrinks (the head is roughly round)
    squeeze = math.sqrt(math.cos(yaw) ** 2 + (t.depth / t.width) ** 2 * math.sin(yaw) ** 2)
    nose_shift = t.depth * math.sin(yaw)
    sil = outline * [squeeze, 1.0] + [0.15 * nose_shift, 0]
    rz = _rotation(0, 0, roll)[:2, :2]
    sil_px = np.round((sil @ rz.T * scale + centre) * 16).astype(np.int32)
    # hair behind the head, then ears, then the face
    if not t.bald:
        back = sil * (1 + t.hair_volume)
        back = back - [0, t.hair_volume * 0.4]
        back[:, 1] = np.minimum(back[:, 1], t.hair_length)
        back_px = np.round((back @ rz.T * scale + centre) * 16).astype(np.int32)
        cv2.fillPoly(img, [back_px], t.hair, aa, sh)
    ear_y = 0.5 * (t.eye_y + t.eye_y + t.nose_len)
    for side in (-1, 1):
        vis = 1 - 0.8 * max(0.0, side * math.sin(yaw))
        ex = side * t.width * squeeze + 0.15 * nose_shift
        c = (np.array([ex, ear_y]) @ rz.T) * scale + centre
        cv2.ellipse(
            img,
            tuple(int(v) for v in np.round(c * 16)),
            (max(1, int(t.ear_size * 0.45 * vis * scale * 16)), int(t.ear_size * scale * 16)),
            math.degrees(roll),
            0,
            360,
            tuple(0.9 * v for v in t.skin),
            -1,
            aa,
            sh,
        )
    cv2.fillPoly(img, [sil_px], t.skin, aa, sh)
    if t.beard:
        xs = np.linspace(-t.width, t.width, 15)
        jaw = [(x, min(t.height * (1 - abs(x / t.width) ** t.chin) ** (1 / t.chin), t.height)) for x in xs]
        top = [(x, t.mouth_y - 0.1 + 0.2 * (x / t.width) ** 2) for x in xs[::-1]]
        poly(np.array(jaw + top) * [0.97, 1.0], t.hair)
    # forehead hair (fringe) between the crown and the hairline, on the face surface
    if not t.bald:
        xs = np.linspace(-t.width, t.width, 17)
        line = [(x, t.hairline + 0.25 * ((x - t.parting) / t.width) ** 2) for x in xs]
        crown = [(x, -t.height * 1.05) for x in xs[::-1]]
        poly(np.array(line + crown), t.hair)
    for x, y in t.freckles:
        ellipse((x, y), (0.018, 0.018), 0, tuple(0.75 * v for v in t.skin))
    for x, y, r in t.marks:
        ellipse((x * t.width, y * t.height * 0.8), (r, r), 0, tuple(0.45 * v for v in t.skin))
    # eyes, brows
    blink = rng.random() < 0.1
    gaze = rng.normal(0, 0.04, 2)
    for side in (-1, 1):
        ex, ey = side * t.eye_gap, t.eye_y
        if blink:
            poly([(ex - t.eye_w, ey), (ex + t.eye_w, ey)], (40, 30, 30), closed=False, thick=0.02)
        else:
            ellipse((ex, ey), (t.eye_w, t.eye_w * t.eye_h), 0, (235, 235, 230))
            ellipse((ex + gaze[0], ey + gaze[1]), (t.eye_w * t.iris_r, t.eye_w * t.iris_r), 0, t.iris)
            ellipse((ex + gaze[0], ey + gaze[1]), (t.eye_w * 0.15, t.eye_w * 0.15), 0, (10, 10, 10))
        by = ey - t.brow_gap
        brow = [
            (ex - side * t.eye_w * 1.1, by + t.brow_slant * 0.1),
            (ex, by - 0.04),
            (ex + side * t.eye_w * 1.2, by - t.brow_slant * 0.1),
        ]
        poly(brow, tuple(0.8 * v for v in t.hair), closed=False, thick=t.brow_thick)
    # nose: a shaded ridge and nostrils
    ny = t.eye_y + t.nose_len
    dark = tuple(0.72 * v for v in t.skin)
    poly([(0.02, t.eye_y + 0.05), (t.nose_w * 0.4, ny - 0.02)], dark, closed=False, thick=0.03)
    for side in (-1, 1):
        ellipse(
            (side * t.nose_w * 0.45, ny),
            (t.nose_w * 0.28, t.nose_w * 0.16),
            0,
            tuple(0.5 * v for v in t.skin),
        )
    # mouth with expression
    smile, open_ = u(-0.04, 0.1), u(0, 1) ** 3 * 0.12
    my, mw = t.mouth_y, t.mouth_w / 2
    xs = np.linspace(-mw, mw, 9)
    upper = [(x, my - smile * (x / mw) ** 2 - t.lip_thick * (1 - (x / mw) ** 2)) for x in xs]
    lower = [
        (x, my - smile * (x / mw) ** 2 + (t.lip_thick * 1.3 + open_) * (1 - (x / mw) ** 2)) for x in xs[::-1]
    ]
    poly(np.array(upper + lower), t.lips)
    if open_ > 0.02:
        gap = [(x, my - smile * (x / mw) ** 2 + open_ * 0.8 * (1 - (x / mw) ** 2)) for x in xs[::-1]]
        mid = [(x, my - smile * (x / mw) ** 2) for x in xs]
        poly(np.array(mid + gap), (60, 20, 25))
    if t.moustache:
        ym = (ny + my) / 2
        poly(
            [(-mw * 1.05, ym + 0.05), (0, ym - 0.04), (mw * 1.05, ym + 0.05)],
            t.hair,
            closed=False,
            thick=0.06,
        )
    if t.glasses:
        for side in (-1, 1):
            ellipse(
                (side * t.eye_gap, t.eye_y), (t.eye_w * 1.5, t.eye_w * 1.1), 0, t.glasses_colour, thick=0.03
            )
        poly(
            [(-t.eye_gap + t.eye_w * 1.4, t.eye_y), (t.eye_gap - t.eye_w * 1.4, t.eye_y)],
            t.glasses_colour,
            closed=False,
            thick=0.03,
        )
    _occlude(img, rng, cam, t)
    return _degrade(img, rng, size)


def _occlude(img, rng, cam: _Camera, t: FaceTraits) -> None:
    r = rng.random()
    if r < 0.08:  # sunglasses
        for side in (-1, 1):
            c = cam.px([(side * t.eye_gap, t.eye_y)])[0]
            ax = (int(t.eye_w * 1.5 * cam.scale * 16), int(t.eye_w * 1.1 * cam.scale * 16))
            cv2.ellipse(img, tuple(int(v) for v in c), ax, 0, 0, 360, (15, 15, 20), -1, cv2.LINE_AA, 4)
    elif r < 0.13:  # mask over mouth and nose
        pts = cam.px(
            [
                (-t.width * 0.9, t.eye_y + t.nose_len * 0.6),
                (t.width * 0.9, t.eye_y + t.nose_len * 0.6),
                (t.width * 0.7, t.height * 0.95),
                (-t.width * 0.7, t.height * 0.95),
            ]
        )
        cv2.fillPoly(img, [pts], tuple(float(v) for v in rng.uniform(100, 255, 3)), cv2.LINE_AA, 4)
    elif r < 0.25:  # some object (hand, microphone, another head) in front
        n = img.shape[0]
        c = tuple(int(v) for v in rng.uniform(0, n, 2))
        ax = tuple(int(v) for v in rng.uniform(0.05 * n, 0.2 * n, 2))
        cv2.ellipse(
            img,
            c,
            ax,
            float(rng.uniform(0, 180)),
            0,
            360,
            tuple(float(v) for v in rng.uniform(0, 255, 3)),
            -1,
            cv2.LINE_AA,
        )


def _degrade(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Lighting, colour cast, blur and noise on the supersampled float image; returns uint8 at ``size``."""
    n = img.shape[0]
    u = rng.uniform
    g = np.linspace(-1, 1, n, dtype=np.float32)
    ang = u(0, 2 * np.pi)
    light = 1 + u(0, 0.4) * (np.cos(ang) * g[None, :] + np.sin(ang) * g[:, None])
    img = img * light[..., None] * np.exp(rng.normal(0, 0.07, 3)).astype(np.float32) * u(0.7, 1.2)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    sigma = u(0, 1.0) * size / 64
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = 255 * (np.clip(img, 0, 255) / 255) ** u(0.75, 1.3)
    img = img + rng.normal(0, u(0, 8), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_identity(seed: int, identity: int, count: int, size: int, quality_range=(40, 95)) -> list[bytes]:
    """JPEG bytes of images ``0..count-1`` of synthetic identity ``identity`` (pure function of the args)."""
    traits = sample_traits(identity_rng(seed, identity))
    out = []
    for image in range(count):
        rng = image_rng(seed, identity, image)
        rgb = render_face(traits, rng, size)
        out.append(encode_image(rgb, int(rng.integers(quality_range[0], quality_range[1] + 1))))
    return out


def verification_pairs(
    rng: np.random.Generator, identities: list[int], images_per_identity: int, pairs: int, folds: int = FOLDS
) -> list[tuple[int, int, int, int, bool]]:
    """``pairs`` pairs ``(identity_a, image_a, identity_b, image_b, same)`` in ``folds`` contiguous folds.

    Identity ``identities[i]`` belongs to fold ``i % folds`` only (no identity is shared between folds, as in
    LFW); each fold holds its same-identity pairs first, then as many different-identity pairs.
    """
    if pairs % (2 * folds):
        raise ValueError(
            f"verify_pairs must be a multiple of {2 * folds} (equal same/different halves in "
            f"{folds} folds), got {pairs}"
        )
    if len(identities) < 2 * folds:
        raise ValueError(
            f"need at least {2 * folds} verification identities (2 per fold), got {len(identities)}"
        )
    if images_per_identity < 2:
        raise ValueError(
            f"need at least 2 images per identity for same-identity pairs, got {images_per_identity}"
        )
    half = pairs // folds // 2
    out = []
    for f in range(folds):
        group = identities[f::folds]
        for _ in range(half):
            ident = group[rng.integers(len(group))]
            a, b = rng.choice(images_per_identity, 2, replace=False)
            out.append((ident, int(a), ident, int(b), True))
        for _ in range(half):
            i, j = rng.choice(len(group), 2, replace=False)
            a, b = rng.integers(images_per_identity, size=2)
            out.append((group[i], int(a), group[j], int(b), False))
    return out


def _render_task(task):
    return render_identity(*task)


OUTPUT_FILES = ("train.rec", "train.idx", "property", "synth.bin", MANIFEST)


def _resolved_arguments(identities, images_per_identity, size, seed, verify_identities, verify_pairs,
                        quality_range) -> dict:
    """generate_synthetic's arguments, checked, with the defaults of ``None`` filled in."""
    if identities < 1 or images_per_identity < 2 or size < 8:
        raise ValueError(
            f"need identities >= 1, images_per_identity >= 2, size >= 8; got {identities}, "
            f"{images_per_identity}, {size}"
        )
    lo, hi = (int(q) for q in quality_range)
    if not 1 <= lo <= hi <= 100:
        raise ValueError(f"quality_range must be (low, high) within 1..100, got {quality_range}")
    return {
        "seed": int(seed),
        "identities": int(identities),
        "images_per_identity": int(images_per_identity),
        "size": int(size),
        "verify_identities": (
            max(2 * FOLDS, identities // 4) if verify_identities is None else int(verify_identities)
        ),
        "verify_pairs": 3000 if verify_pairs is None else int(verify_pairs),
        "quality_range": [lo, hi],
    }


def synthetic_set_differences(output_dir, **arguments) -> dict:
    """``{argument: (found, asked)}`` for each of generate_synthetic's ``arguments`` (its keywords:
    identities, images_per_identity, size, seed, ...; defaults filled in) that differs from what
    ``output_dir/synth.json`` records; empty when they all match or there is no manifest."""
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
        found = {**manifest, "verify_identities": len(manifest["verify_identities"])}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a synthetic-set manifest ({err})") from None
    bound = inspect.signature(generate_synthetic).bind(output_dir, **arguments)
    bound.apply_defaults()
    args = bound.arguments
    asked = _resolved_arguments(args["identities"], args["images_per_identity"], args["size"], args["seed"],
                                args["verify_identities"], args["verify_pairs"], args["quality_range"])
    return {key: (found.get(key), value) for key, value in asked.items() if found.get(key) != value}


def generate_synthetic(
    output_dir,
    identities: int,
    images_per_identity: int,
    size: int,
    seed: int,
    verify_identities: int | None = None,
    verify_pairs: int | None = 3000,
    quality_range=(40, 95),
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write a synthetic identity dataset: ``train.rec/train.idx/property`` (insightface layout, training
    identities ``0..identities-1``), ``synth.bin`` (10-fold verification pairs on ``verify_identities``
    further identities, disjoint from training) and ``synth.json`` (arguments and every pair's identities).

    ``verify_identities`` defaults to ``max(20, identities // 4)``; ``verify_pairs`` (default 3000) must be
    a multiple of 20. The files depend only on the arguments (not on ``workers``, default: all usable CPUs).
    Refuses to overwrite existing files unless ``force``. Returns a summary dict.
    """
    import time

    out = Path(output_dir)
    args = _resolved_arguments(identities, images_per_identity, size, seed, verify_identities, verify_pairs,
                               quality_range)
    verify_identities, verify_pairs, (lo, hi) = (
        args["verify_identities"], args["verify_pairs"], args["quality_range"]
    )
    verify_ids = list(range(identities, identities + verify_identities))
    pairs = verification_pairs(
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))),
        verify_ids,
        images_per_identity,
        verify_pairs,
    )
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; pass force=True (--force) to overwrite"
        )
    workers = len(os.sched_getaffinity(0)) if workers is None else max(1, int(workers))

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out, ".synth-tmp-")  # of a generation killed while writing
    tmp = out / f".synth-tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        tasks = [
            (seed, i, images_per_identity, size, (lo, hi)) for i in range(identities + verify_identities)
        ]
        rendered = map_ordered(_render_task, tasks, workers, "synth identities", "id", progress)
        pool_images: dict[int, list[bytes]] = {}

        def training_images():  # keeps the held-out identities' images for the .bin
            for ident, images in enumerate(rendered):
                if ident < identities:
                    yield from ((ident, jpeg) for jpeg in images)
                else:
                    pool_images[ident] = images

        write_identity_records(tmp / "train.rec", tmp / "train.idx", training_images(), identities)
        (tmp / "property").write_text(f"{identities},{size},{size}\n")
        bins = [img for a, i, b, j, _ in pairs for img in (pool_images[a][i], pool_images[b][j])]
        write_bin(tmp / "synth.bin", bins, [same for *_, same in pairs])
        # the resolved arguments (what synthetic_set_differences compares), held-out ids listed
        manifest = {**args, "verify_identities": verify_ids, "train_identities": [0, identities],
                    "pairs": [list(p[:4]) for p in pairs]}
        (tmp / MANIFEST).write_text(json.dumps(manifest) + "\n")
        for name in OUTPUT_FILES:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    return {
        "output_dir": str(out),
        "num_classes": identities,
        "train_images": identities * images_per_identity,
        "verify_identities": verify_identities,
        "verify_pairs": verify_pairs,
        "size": size,
        "seed": seed,
        "seconds": round(seconds, 2),
        "files": [str(out / name) for name in OUTPUT_FILES],
    }
