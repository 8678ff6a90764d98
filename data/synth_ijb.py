"""Synthetic IJB-B / IJB-C sets in insightface's ``IJB_release`` layout, from the synthetic identity renderer.

Every subject (a rendered identity, disjoint from the training and ``synth.bin`` identities by default) has
one gallery template and several probe templates. A template holds one to three medias: a still (one
image) or a video (a group of frames of one rendered pose that drift slightly, blur and flicker, as frames
of one clip do). Each image is a loose crop: the rendered face under a random rotation, scale and shift in
a larger canvas; its 5 landmarks are where that placement puts the ArcFace template of the rendered frame,
so aligning them gives back the rendered face. Faceness scores fall with blur and noise. Written:

    <output>/IJBC/loose_crop/<k>.jpg
    <output>/IJBC/meta/ijbc_face_tid_mid.txt        image_name template_id media_id
    <output>/IJBC/meta/ijbc_name_5pts_score.txt     image_name x1 y1 ... x5 y5 faceness
    <output>/IJBC/meta/ijbc_template_pair_label.txt template_1 template_2 label (every gallery x probe pair)
    <output>/IJBC/meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ijbc_1N_probe_mixed.csv (IJB-B: IJBB, ijbb, S1, S2)

The bytes depend on the arguments only (each subject draws from its own generator), never on ``workers``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from .align import template_for_size
from .images import encode_image
from .synth import identity_rng, image_rng, render_face, sample_traits
from .workers import map_ordered

TARGETS = {"ijbc": ("IJBC", ("G1", "G2")), "ijbb": ("IJBB", ("S1", "S2"))}
MANIFEST = "synth_ijb.json"
FIRST_IDENTITY = 100_000  # far above the identities of `run.py synth` sets with the same seed
MEDIA_ID_BASE = 100_000


def subject_rng(seed: int, subject: int) -> np.random.Generator:
    """Generator of one subject's template plan and image placements."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, subject)))


def _placement(rng: np.random.Generator, size: int) -> tuple[int, float, float, np.ndarray]:
    """A loose crop's canvas side and the rendered face's rotation (radians), scale and centre in it."""
    side = int(round(size * rng.uniform(1.3, 1.7)))
    centre = np.array([side / 2, side / 2]) + rng.normal(0, 0.04 * side, 2)
    return side, math.radians(rng.normal(0, 8)), math.exp(rng.normal(0, 0.1)), centre


def _drift(placement, rng: np.random.Generator) -> tuple[int, float, float, np.ndarray]:
    """The placement of the next frame of a clip: a degree, 2% and a pixel or so away."""
    side, angle, scale, centre = placement
    return side, angle + math.radians(rng.normal(0, 1)), scale * math.exp(rng.normal(0, 0.02)), \
        centre + rng.normal(0, 1.0, 2)


def _place(face: np.ndarray, placement) -> tuple[np.ndarray, np.ndarray]:
    """Loose crop holding ``face`` at ``placement`` (outside filled by reflection) and the 2x3 mapping."""
    side, angle, scale, centre = placement
    half = face.shape[0] / 2
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = np.hstack([rotation, (centre - rotation @ [half, half])[:, None]])
    crop = cv2.warpAffine(face, matrix, (side, side), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)
    return crop, matrix


def _frame(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One video frame of ``face`` (blur, noise and a brightness change) and its quality in 0..1."""
    sigma, noise = rng.uniform(0, 1.6), rng.uniform(0, 10)
    frame = face.astype(np.float32) * rng.uniform(0.8, 1.15)
    if sigma > 0.3:
        frame = cv2.GaussianBlur(frame, (0, 0), sigma)
    frame += rng.normal(0, noise, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8), 1 - 0.35 * sigma / 1.6 - 0.25 * noise / 10


def render_subject(seed: int, subject: int, identity: int, media_plan: list[list[int]], size: int) -> list:
    """Images of one subject. ``media_plan[t]`` lists the frame counts of template t's medias (1: a still).
    Returns ``(template_index, media_index, jpeg_bytes, landmarks (5, 2), faceness)`` per image."""
    traits = sample_traits(identity_rng(seed, identity))
    rng = subject_rng(seed, subject)
    reference = template_for_size(size).astype(np.float64)
    out, rendered = [], 0
    for template, medias in enumerate(media_plan):
        for media, frames in enumerate(medias):
            face = render_face(traits, image_rng(seed, identity, rendered), size)
            rendered += 1
            placement = _placement(rng, size)
            for _ in range(frames):
                if frames == 1:
                    image, quality = face, rng.uniform(0.75, 1.0)
                else:
                    (image, quality), placement = _frame(face, rng), _drift(placement, rng)
                crop, matrix = _place(image, placement)
                landmarks = reference @ matrix[:, :2].T + matrix[:, 2]
                faceness = float(np.clip(quality + rng.normal(0, 0.03), 0.05, 1.0))
                jpeg = encode_image(crop, int(rng.integers(60, 96)))
                out.append((template, media, jpeg, landmarks, faceness))
    return out


def _render_task(task):
    return render_subject(*task)


def media_plans(seed: int, subjects: int, probes_per_subject: int) -> list[list[list[int]]]:
    """For each subject, its templates (gallery first, then probes), each a list of media frame counts."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,)))
    plans = []
    for _ in range(subjects):
        templates = []
        for _ in range(1 + probes_per_subject):
            medias = int(rng.choice([1, 1, 2, 3]))
            templates.append([1 if rng.random() < 0.6 else int(rng.integers(3, 7)) for _ in range(medias)])
        plans.append(templates)
    return plans


def generate_ijb(output_dir, target: str = "ijbc", subjects: int = 40, probes_per_subject: int = 3,
                 size: int = 112, seed: int = 0, first_identity: int = FIRST_IDENTITY,
                 workers: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Write a synthetic IJB set (layout in the module docstring) for ``target`` "ijbc" or "ijbb".

    ``subjects`` rendered identities ``first_identity, ...`` (half in each 1:N gallery), each with one
    gallery and ``probes_per_subject`` probe templates; faces rendered at ``size`` pixels. Refuses to
    overwrite an existing set unless ``force``. Returns a summary dict."""
    if target not in TARGETS:
        raise ValueError(f"unknown IJB target {target!r}; expected one of {', '.join(TARGETS)}")
    if subjects < 2 or probes_per_subject < 1 or size < 16:
        raise ValueError(f"need subjects >= 2, probes_per_subject >= 1, size >= 16; got {subjects}, "
                         f"{probes_per_subject}, {size}")
    folder, galleries = TARGETS[target]
    out = Path(output_dir)
    if (out / folder).exists() and not force:
        raise FileExistsError(f"{out / folder} already exists; pass force=True (--force) to overwrite")
    workers = len(os.sched_getaffinity(0)) if workers is None else max(1, int(workers))
    plans = media_plans(seed, subjects, probes_per_subject)
    tmp = out / f".synth-ijb-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "loose_crop").mkdir(parents=True)
    (tmp / "meta").mkdir()
    try:
        tasks = [(seed, s, first_identity + s, plans[s], size) for s in range(subjects)]
        rows = []  # (image_name, template_id, media_id, subject_id, is_gallery, landmarks, faceness)
        media_ids: dict[tuple[int, int, int], int] = {}
        for s, images in enumerate(map_ordered(_render_task, tasks, workers, desc="synth IJB subjects",
                                                     unit="subject", progress=progress)):
            for template, media, jpeg, landmarks, faceness in images:
                name = f"{len(rows) + 1}.jpg"
                (tmp / "loose_crop" / name).write_bytes(jpeg)
                media_id = media_ids.setdefault((s, template, media), MEDIA_ID_BASE + len(media_ids))
                template_id = 1 + s * (1 + probes_per_subject) + template
                rows.append((name, template_id, media_id, s + 1, template == 0, landmarks, faceness))
        _write_meta(tmp / "meta", target, galleries, rows, subjects)
        summary = {"target": target, "subjects": subjects, "probes_per_subject": probes_per_subject,
                   "size": size, "seed": seed, "first_identity": first_identity, "images": len(rows),
                   "templates": subjects * (1 + probes_per_subject), "medias": len(media_ids),
                   "pairs": subjects * subjects * probes_per_subject}
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(out / folder, ignore_errors=True)
        os.replace(tmp, out / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "output_dir": str(out / folder)}


def _write_meta(meta: Path, target: str, galleries: tuple[str, str], rows: list, subjects: int) -> None:
    """The meta files of the module docstring from ``rows`` (one per image, in loose_crop order)."""
    with open(meta / f"{target}_face_tid_mid.txt", "w") as f:
        f.writelines(f"{name} {template} {media}\n" for name, template, media, *_ in rows)
    with open(meta / f"{target}_name_5pts_score.txt", "w") as f:
        for name, *_, landmarks, faceness in rows:
            f.write(f"{name} {' '.join(f'{v:.3f}' for v in landmarks.ravel())} {faceness:.6f}\n")
    gallery = sorted({(r[1], r[3]) for r in rows if r[4]})
    probes = sorted({(r[1], r[3]) for r in rows if not r[4]})
    with open(meta / f"{target}_template_pair_label.txt", "w") as f:
        f.writelines(f"{g} {p} {int(gs == ps)}\n" for g, gs in gallery for p, ps in probes)
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
    half = (subjects + 1) // 2
    files = {f"{target}_1N_gallery_{galleries[0]}.csv": lambda r: r[4] and r[3] <= half,
             f"{target}_1N_gallery_{galleries[1]}.csv": lambda r: r[4] and r[3] > half,
             f"{target}_1N_probe_mixed.csv": lambda r: not r[4]}
    for file_name, keep in files.items():
        with open(meta / file_name, "w") as f:
            f.write(header)
            f.writelines(f"{r[1]},{r[3]},img/{r[0]},{r[2]}\n" for r in rows if keep(r))
