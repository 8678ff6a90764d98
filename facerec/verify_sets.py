"""Verification sets by name or path, and a model's verification metrics on them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import load_bin
from data.verification_sets import load_raw_pairs
from eval.verification import evaluate, pair_distances

from .embedding import embed_images

STANDARD_SETS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")
DEFAULT_DATA_DIR = "datasets"
HOW_TO_GET = ("the standard .bin files ship in insightface's packed training-set folders (faces_emore/, "
              "ms1m-retinaface-t1/, ... hold lfw.bin, cfp_fp.bin, agedb_30.bin, ...): point --data-dir at "
              "such a folder, or build a .bin from the raw public release with `run.py make-bin`")


class NonFiniteEmbeddings(ValueError):
    """A model gave NaN or inf embeddings (its weights or running statistics have diverged)."""


@dataclass
class VerificationSet:
    """2P encoded images (pair i = images 2i, 2i+1), P booleans, a display name and where it came from."""

    name: str
    images: list
    issame: np.ndarray
    source: str


def load_verification_set(spec: str, data_dir=DEFAULT_DATA_DIR, input_size: int = 112,
                          workers: int | None = None, device="cpu") -> list[VerificationSet]:
    """The verification set(s) of ``spec``: a name looked up as ``<data_dir>/<name>.bin`` (or a raw release
    folder ``<data_dir>/<name>``, ``<data_dir>/cfp`` for the CFP sets), a ``.bin`` path, or a raw LFW / CFP
    release folder (both CFP protocols unless named). ``NAME=PATH`` names the set (for raw CFP, ``cfp_ff``
    or ``cfp_fp`` picks the protocol; raw images are aligned in ``workers`` processes, the detector running
    on ``device``). A missing set raises FileNotFoundError listing every place tried."""
    name, _, given = spec.rpartition("=")
    path, data_dir = Path(given), Path(data_dir)
    if path.suffix == ".bin" or path.is_absolute() or len(path.parts) > 1:
        candidates = [path]
    else:
        candidates = [data_dir / f"{given}.bin", data_dir / given, path]
        candidates += [data_dir / "cfp"] if given in ("cfp_ff", "cfp_fp") else []
    if not name and given in STANDARD_SETS:
        name = given
    for candidate in candidates:
        if candidate.is_file():
            images, issame = load_bin(candidate)
            return [VerificationSet(name or candidate.stem, images, issame, str(candidate))]
        if candidate.is_dir():
            found = load_raw_pairs(candidate, name=name or None, size=input_size, workers=workers,
                                   device=device)
            return [VerificationSet(key, images, np.asarray(issame, dtype=bool), str(candidate))
                    for key, (images, issame) in found.items()]
    tried = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"verification set {given!r} not found; looked for:\n  {tried}\n{HOW_TO_GET}")


def load_verification_sets(specs: str, data_dir=DEFAULT_DATA_DIR, input_size: int = 112,
                           workers: int | None = None, device="cpu") -> list[VerificationSet]:
    """Comma-separated ``specs`` -> list of :class:`VerificationSet` (see :func:`load_verification_set`)."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no verification set given (names like {', '.join(STANDARD_SETS)} or .bin paths)")
    return [vset for spec in names
            for vset in load_verification_set(spec, data_dir, input_size, workers, device)]


def verify(model, vset: VerificationSet, input_size: int, batch_size: int = 64, flip: bool = True,
           device="cpu", folds: int = 10) -> tuple[dict, np.ndarray]:
    """Metrics of :func:`eval.verification.evaluate` (with ``xnorm``) and the pair distances of ``vset``."""
    embeddings, norms = embed_images(model, vset.images, input_size, batch_size=batch_size, flip=flip,
                                     device=device, with_norms=True,
                                     describe=lambda i: f"{vset.source}: image {i} (pair {i // 2})")
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        raise NonFiniteEmbeddings(f"{vset.source}: the model's embeddings of {int((~finite).sum())} of "
                                  f"{len(finite)} images are not finite (NaN or inf)")
    try:
        metrics = evaluate(embeddings, vset.issame, folds=folds, norms=norms)
    except ValueError as exc:
        raise ValueError(f"{vset.source}: {exc}") from None
    return metrics, pair_distances(embeddings)
