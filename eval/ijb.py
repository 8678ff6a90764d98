"""IJB-B / IJB-C template evaluation, as arcface_torch's ``eval_ijbc.py`` computed the published numbers.

Image feature (flip sum, optional L2 normalisation, times the faceness score) -> media feature (mean of the
media's images in the template) -> template feature (sum of its media, L2-normalised) -> cosine of the two
templates of every pair -> TAR at FAR. 1:N identification searches the mixed probes in galleries G1 / G2
(IJB-B: S1 / S2). Pure functions over arrays, vectorised over images, media, templates and pairs;
:func:`read_ijb` and :func:`read_1n` are the I/O edge (``<root>/IJBC/meta/*`` as insightface distributes it).
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.metrics import auc as _area_under_curve

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (1e-2, 1e-1)
RANKS = (1, 5, 10)
TARGETS = {"ijbc": "IJBC", "ijbb": "IJBB"}
GALLERIES = {"ijbc": ("G1", "G2"), "ijbb": ("S1", "S2")}
_MAX_CELLS = 1 << 27  # largest first x second template score matrix pair_scores computes (1 GiB)


@dataclass(frozen=True)
class IJBMeta:
    """One IJB set's meta files: N images (in ``loose_crop``) and P template pairs."""

    names: np.ndarray  # (N,) image file names, as in the meta files
    landmarks: np.ndarray  # (N, 5, 2) float32 pixel (x, y): left eye, right eye, nose, mouth corners
    faceness: np.ndarray  # (N,) float32 detector scores
    templates: np.ndarray  # (N,) int64 template id of each image
    medias: np.ndarray  # (N,) int64 media id (one still, or the frames of one video)
    t1: np.ndarray  # (P,) int64 first template of each pair
    t2: np.ndarray  # (P,) int64 second template
    labels: np.ndarray  # (P,) int8: 1 same subject, 0 different


def meta_dir(root, target: str) -> Path:
    """``<root>/IJBC/meta`` for ``target`` "ijbc" (``IJBB``: "ijbb"); ``root`` may also be the IJBC folder."""
    if target not in TARGETS:
        raise ValueError(f"unknown IJB target {target!r}; expected one of {', '.join(TARGETS)}")
    root = Path(root)
    folder = root / TARGETS[target]
    return folder / "meta" if folder.is_dir() or not (root / "meta").is_dir() else root / "meta"


def meta_path(root, target: str, suffix: str) -> Path:
    """Meta file ``<target>_<suffix>`` (e.g. ``ijbc_face_tid_mid.txt``); missing raises FileNotFoundError."""
    path = meta_dir(root, target) / f"{target}_{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path} (expected the insightface IJB_release "
                                f"layout <root>/{TARGETS[target]}/meta/{target}_{suffix})")
    return path


def _text_rows(path: Path, columns: int, what: str):
    """``(line_no, fields)`` of each non-blank line of ``path``, checking the number of fields."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise ValueError(f"{path}:{line_no}: expected {columns} fields ({what}), got {len(fields)}: "
                                 f"{line.strip()[:200]!r}")
            yield line_no, fields


def read_face_tid_mid(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image_name template_id media_id`` lines -> (names, templates, medias)."""
    names, numbers = [], []
    for line_no, (name, template, media) in _text_rows(Path(path), 3, "image_name template_id media_id"):
        try:
            numbers.append((int(template), int(media)))
        except ValueError:
            raise ValueError(f"{path}:{line_no}: template and media ids must be integers, got "
                             f"{template!r} {media!r}") from None
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no images listed")
    ids = np.array(numbers, dtype=np.int64).reshape(-1, 2)
    return np.array(names, dtype=object), ids[:, 0], ids[:, 1]


def read_landmarks(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image_name x1 y1 ... x5 y5 faceness`` lines -> (names, (N, 5, 2) landmarks, faceness)."""
    names, numbers = [], []
    for line_no, fields in _text_rows(Path(path), 12, "image_name, 5 x/y landmark pairs, faceness score"):
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"{path}:{line_no}: landmarks and score must be numbers: {fields[1:]}") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{path}:{line_no}: landmarks and score must be finite: {fields[1:]}")
        names.append(fields[0])
        numbers.append(values)
    if not names:
        raise ValueError(f"{path}: no images listed")
    values = np.array(numbers, dtype=np.float32)
    return np.array(names, dtype=object), values[:, :10].reshape(-1, 5, 2), values[:, 10]


def _first_bad_line(path: Path, columns: int) -> str:
    """``path:line: ...`` for the first line that is not ``columns`` integers ("" if there is none)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if fields and (len(fields) != columns or not all(v.lstrip("+-").isdigit() for v in fields)):
                return (f"{path}:{line_no}: expected {columns} integers, got {len(fields)} fields: "
                        f"{line.strip()[:200]!r}")
    return ""


def read_int_table(path, columns: int) -> np.ndarray:
    """A file of whitespace-separated integers, ``columns`` per line, as (rows, columns) int64.

    Spaces, tabs, CRLF line ends and blank lines are accepted. NumPy's C parser (``np.loadtxt``) reads it:
    seconds for IJB-C's 15.7M-line pair file. Anything else raises ValueError naming the file and line."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked by the caller
            table = np.loadtxt(path, dtype=np.int64, comments=None, ndmin=2)
    except ValueError as exc:
        raise ValueError(_first_bad_line(path, columns) or f"{path}: {exc}") from None
    if table.size == 0:
        return np.zeros((0, columns), dtype=np.int64)
    if table.shape[1] != columns:
        raise ValueError(_first_bad_line(path, columns))
    return table


def read_pairs(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``template_1 template_2 label`` lines -> (t1, t2, labels int8); a label other than 0/1 is refused."""
    table = read_int_table(path, 3)
    if not len(table):
        raise ValueError(f"{path}: no template pairs listed")
    bad = np.flatnonzero((table[:, 2] < 0) | (table[:, 2] > 1))
    if bad.size:
        raise ValueError(f"{path}:{_line_of_row(path, bad[0])}: label must be 0 or 1, got {table[bad[0], 2]}")
    return table[:, 0], table[:, 1], table[:, 2].astype(np.int8)


def _line_of_row(path, row: int) -> int:
    """Line number of the ``row``-th (0-based) non-blank line of ``path`` (for error messages)."""
    with open(path, "rb") as f:
        rows = (line_no for line_no, line in enumerate(f, start=1) if line.strip())
        return next(line_no for i, line_no in enumerate(rows) if i == row)


def _rows_of(ids: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of each of ``ids`` in the sorted unique ``known``, and the indices of the ids not there.

    A lookup table when the ids are small enough for one (IJB's are), else a binary search."""
    if known[0] >= 0 and known[-1] < 4 * len(ids) + 4096:
        table = np.full(int(known[-1]) + 1, -1, dtype=np.int64)
        table[known] = np.arange(len(known))
        rows = table[np.clip(ids, 0, len(table) - 1)]
        unknown = np.flatnonzero((rows < 0) | (ids < 0) | (ids >= len(table)))
        return np.maximum(rows, 0), unknown
    rows = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    return rows, np.flatnonzero(known[rows] != ids)


def template_rows(ids, known: np.ndarray, what: str) -> np.ndarray:
    """Row of each template of ``ids`` in the sorted ``known``; an unknown one raises ValueError naming it."""
    ids = np.asarray(ids)
    rows, unknown = _rows_of(ids, known)
    if unknown.size:
        raise ValueError(f"{what} {ids[unknown[0]]} (entry {unknown[0] + 1}) is not a known template "
                         f"({unknown.size} entries name unknown templates)")
    return rows


def _align_names(names: np.ndarray, other: np.ndarray, path) -> np.ndarray:
    """Index into ``other`` for each of ``names`` (identity when both list the same images in order)."""
    if len(names) == len(other) and np.array_equal(names, other):
        return np.arange(len(names))
    where = {name: i for i, name in enumerate(other)}
    missing = [name for name in names if name not in where]
    if missing:
        raise ValueError(f"{path}: no landmarks for image {missing[0]!r} ({len(missing)} images missing)")
    return np.array([where[name] for name in names], dtype=np.int64)


def read_ijb(root, target: str = "ijbc") -> IJBMeta:
    """Read ``<root>/<IJBC|IJBB>/meta``: images with templates, medias, 5 landmarks and faceness; the pairs.

    Every pair must name templates that have images: an unknown one raises ValueError naming it."""
    tid_mid = meta_path(root, target, "face_tid_mid.txt")
    points = meta_path(root, target, "name_5pts_score.txt")
    pairs = meta_path(root, target, "template_pair_label.txt")
    names, templates, medias = read_face_tid_mid(tid_mid)
    point_names, landmarks, faceness = read_landmarks(points)
    order = _align_names(names, point_names, points)
    t1, t2, labels = read_pairs(pairs)
    known = np.unique(templates)
    for column, ids in (("template_1", t1), ("template_2", t2)):
        unknown = _rows_of(ids, known)[1]
        if unknown.size:
            line = _line_of_row(pairs, unknown[0])
            raise ValueError(f"{pairs}:{line}: {column} {ids[unknown[0]]} is not a template of {tid_mid} "
                             f"({unknown.size} pairs name unknown templates)")
    return IJBMeta(names, landmarks[order], faceness[order], templates, medias, t1, t2, labels)


def read_1n(root, target: str = "ijbc") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 1:N protocol: ``{"G1": (templates, subjects), "G2": ..., "probe": ...}`` (IJB-B: S1, S2).

    Read from the distributed CSVs (``ijbc_1N_gallery_G1.csv``, ``..._G2.csv``, ``ijbc_1N_probe_mixed.csv``;
    header with TEMPLATE_ID and SUBJECT_ID, one row per image): one entry per template, sorted by id."""
    names = {g: f"1N_gallery_{g}.csv" for g in GALLERIES[target]} | {"probe": "1N_probe_mixed.csv"}
    return {key: _read_1n_csv(meta_path(root, target, name)) for key, name in names.items()}


def _read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    header = [h.strip().upper() for h in rows[0]] if rows else []
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        raise ValueError(f"{path}:1: expected a header naming TEMPLATE_ID and SUBJECT_ID, got {rows[:1]}")
    columns = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    subject_of = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            template, subject = (int(row[c]) for c in columns)
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{line_no}: TEMPLATE_ID, SUBJECT_ID must be integers: {row}") from None
        if subject_of.setdefault(template, subject) != subject:
            raise ValueError(f"{path}:{line_no}: template {template} listed with subjects "
                             f"{subject_of[template]} and {subject}")
    if not subject_of:
        raise ValueError(f"{path}: no templates listed")
    templates = np.array(sorted(subject_of), dtype=np.int64)
    return templates, np.array([subject_of[t] for t in templates], dtype=np.int64)


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm, in place; all-zero rows stay zero (sklearn's ``normalize``)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x /= np.where(norms == 0, 1, norms)[:, None]
    return x


def image_features(embeddings, flipped, faceness, flip: bool = True, norm_score: bool = True,
                   detector_score: bool = True) -> np.ndarray:
    """Per-image features (N, D) from the raw embeddings of the images and of their horizontal flips.

    ``flip``: sum the two (else the image's alone); ``norm_score``: keep the raw sum so that its norm weighs
    the image (else L2-normalise it); ``detector_score``: multiply by ``faceness``. All on, as published.
    Keeps the input dtype (float32 embeddings give float32 features)."""
    x = np.asarray(embeddings)
    features = x + np.asarray(flipped, dtype=x.dtype) if flip else x.copy()
    if not norm_score:
        l2_rows(features)
    if detector_score:
        features *= np.asarray(faceness, dtype=features.dtype)[:, None]
    return features


def template_features(image_features, templates, medias) -> tuple[np.ndarray, np.ndarray]:
    """Template features (T, D) float64, L2-normalised, and their sorted ids (T,).

    A template's feature is the sum over its medias of the mean of that media's images in the template:
    one sparse (T, N) weighting times the image features, summed in their precision (float32 features
    are not copied to float64)."""
    x = np.asarray(image_features)
    templates, medias = np.asarray(templates), np.asarray(medias)
    if x.ndim != 2 or templates.shape != (len(x),) or medias.shape != (len(x),):
        raise ValueError(f"need (N, D) image features with N templates and medias, got {x.shape}, "
                         f"{templates.shape}, {medias.shape}")
    template_ids, template_row = np.unique(templates, return_inverse=True)
    media_ids, media_row = np.unique(medias, return_inverse=True)
    _, group, counts = np.unique(template_row * len(media_ids) + media_row, return_inverse=True,
                                 return_counts=True)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    weights = sparse.csr_matrix(((1.0 / counts[group]).astype(dtype), (template_row, np.arange(len(x)))),
                                shape=(len(template_ids), len(x)))
    return l2_rows(np.asarray(weights @ x.astype(dtype, copy=False), dtype=np.float64)), template_ids


def pair_scores(features, template_ids, t1, t2, chunk: int = 1 << 16) -> np.ndarray:
    """Cosine score (P,) float64 of each template pair: the dot product of the two template features.

    ``features`` (T, D) L2-normalised with sorted ``template_ids`` (T,), as :func:`template_features` gives.
    When the pairs are dense among the templates they use (IJB: gallery x probe), every score of those
    first and second templates comes from one matrix product, read at the pairs; else pairs are scored
    ``chunk`` at a time."""
    f = np.asarray(features, dtype=np.float64)
    ids = np.asarray(template_ids)
    i1 = template_rows(t1, ids, "template_1 of the pairs")
    i2 = template_rows(t2, ids, "template_2 of the pairs")
    firsts, seconds = (np.flatnonzero(np.bincount(i, minlength=len(ids))) for i in (i1, i2))
    cells = len(firsts) * len(seconds)
    if cells <= 8 * len(i1) and cells <= _MAX_CELLS:
        position = np.zeros((2, len(ids)), dtype=np.int64)
        position[0, firsts], position[1, seconds] = np.arange(len(firsts)), np.arange(len(seconds))
        return (f[firsts] @ f[seconds].T)[position[0, i1], position[1, i2]]
    scores = np.empty(len(i1), dtype=np.float64)
    for lo in range(0, len(i1), chunk):
        scores[lo:lo + chunk] = np.einsum("ij,ij->i", f[i1[lo:lo + chunk]], f[i2[lo:lo + chunk]])
    return scores


def _descending(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` sorted in descending order (float64) and the labels (bool) in the same order.

    Each class is sorted by value (faster than an argsort of all), then the positives are merged into
    the negatives; the order within tied scores moves no ROC point."""
    positives, negatives = np.sort(scores[labels]), np.sort(scores[~labels])
    at = np.searchsorted(negatives, positives) + np.arange(len(positives))
    merged, is_positive = np.empty(len(scores)), np.zeros(len(scores), dtype=bool)
    merged[at], is_positive[at] = positives, True
    merged[~is_positive] = negatives
    return merged[::-1], is_positive[::-1]


def _roc_descending(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ``roc_curve`` (default ``drop_intermediate=True``), step by step, on sorted input."""
    ends = np.append(np.flatnonzero(np.diff(scores)), len(scores) - 1)  # last index of each distinct score
    tps = np.cumsum(labels, dtype=np.int64)[ends].astype(np.float64)
    fps = 1 + ends - tps
    if len(fps) > 2:  # drop the points that lie on a straight line between their neighbours
        keep = np.concatenate([[True], np.diff(fps, 2).astype(bool) | np.diff(tps, 2).astype(bool), [True]])
        ends, tps, fps = ends[keep], tps[keep], fps[keep]
    tps, fps = np.append(0.0, tps), np.append(0.0, fps)
    return fps / fps[-1], tps / tps[-1], np.append(np.inf, scores[ends])


def roc(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ``roc_curve`` with its defaults, as published (false and true positive rates and
    thresholds, the same arrays), computed with a faster sort."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    return _roc_descending(*_descending(labels, scores))


def published_index(fpr: np.ndarray, far: float) -> int:
    """Index of the ROC point whose FPR is nearest ``far``; the last such point (larger TPR) on ties.

    arcface_torch flips the curve and takes ``min(zip(abs(fpr - far), range(n)))``: the first index of the
    flipped curve is the last of the original one."""
    distance = np.abs(np.asarray(fpr) - far)
    return len(distance) - 1 - int(np.argmin(distance[::-1]))


def bounded_threshold(negatives_descending: np.ndarray, far: float) -> float:
    """Score threshold (accept ``score > threshold``) admitting at most ``floor(far * negatives)`` negatives.

    ``-inf`` (accept all) when that allows every negative."""
    allowed = int(np.floor(far * len(negatives_descending) + 1e-9))
    return float(negatives_descending[allowed]) if allowed < len(negatives_descending) else -math.inf


def tar_at_far(labels, scores, fars=FARS) -> dict:
    """TAR at each FAR of ``fars`` by two rules, with the AUC and the ROC curve.

    ``published``: on scikit-learn's ROC, the point whose FPR is nearest the target, the larger TPR on ties
    (arcface_torch's rule: its FPR can exceed the target). ``bounded``: the threshold from the sorted
    negative scores that never lets the FAR exceed the target (``score > threshold``). Returns lists aligned
    with ``fars`` (``published``, ``published_far``, ``published_threshold``, ``bounded``, ``bounded_far``,
    ``bounded_threshold``), ``auc``, ``positives``, ``negatives`` and ``roc`` = (fpr, tpr)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"need one score per label, got {scores.shape} scores and {labels.shape} labels")
    if labels.all() or not labels.any():
        raise ValueError("TAR at FAR needs both same-subject and different-subject pairs")
    scores, labels = _descending(labels, scores)
    fpr, tpr, thresholds = _roc_descending(scores, labels)
    negatives, positives = scores[~labels], scores[labels][::-1]  # descending, ascending
    result = {key: [] for key in ("published", "published_far", "published_threshold", "bounded",
                                  "bounded_far", "bounded_threshold")}
    for far in fars:
        i = published_index(fpr, far)
        threshold = bounded_threshold(negatives, far)
        result["published"].append(float(tpr[i]))
        result["published_far"].append(float(fpr[i]))
        result["published_threshold"].append(float(thresholds[i]))
        result["bounded"].append(1.0 - np.searchsorted(positives, threshold, side="right") / len(positives))
        result["bounded_far"].append(np.count_nonzero(negatives > threshold) / len(negatives))
        result["bounded_threshold"].append(threshold)
    return {"fars": list(fars), **result, "auc": float(_area_under_curve(fpr, tpr)),
            "positives": int(labels.sum()), "negatives": int((~labels).sum()), "roc": (fpr, tpr)}


def identification(probe_features, probe_subjects, gallery_features, gallery_subjects, ranks=RANKS,
                   fpirs=FPIRS) -> dict:
    """Open-set 1:N search of probe templates in a gallery (features L2-normalised, cosine scores).

    A subject's score is its best gallery template's. Mated probes (subject in the gallery) give the
    rank-k identification rates (rank = 1 + subjects scoring strictly higher than the mate). Non-mated
    probes' top scores set the threshold at each FPIR (never exceeded: at most ``floor(fpir * non-mated)``
    above it); TPIR = share of mated probes with the mate at rank 1 and a score above the threshold."""
    probe_subjects, gallery_subjects = np.asarray(probe_subjects), np.asarray(gallery_subjects)
    scores = np.asarray(probe_features, dtype=np.float64) @ np.asarray(gallery_features, dtype=np.float64).T
    subjects, column = np.unique(gallery_subjects, return_inverse=True)
    by_subject = np.argsort(column, kind="stable")
    starts = np.searchsorted(column[by_subject], np.arange(len(subjects)))
    subject_scores = np.maximum.reduceat(scores[:, by_subject], starts, axis=1)
    mated = np.isin(probe_subjects, subjects)
    mated_scores = subject_scores[mated]
    mate = mated_scores[np.arange(len(mated_scores)), np.searchsorted(subjects, probe_subjects[mated])]
    rank = 1 + np.count_nonzero(mated_scores > mate[:, None], axis=1)
    nonmated_top = np.sort(subject_scores[~mated].max(axis=1, initial=-math.inf))[::-1]
    thresholds = [bounded_threshold(nonmated_top, fpir) if len(nonmated_top) else math.nan for fpir in fpirs]
    tpir = [float(np.mean((rank == 1) & (mate > t))) if len(mate) and len(nonmated_top) else math.nan
            for t in thresholds]
    return {"rank": {k: float(np.mean(rank <= k)) if len(rank) else math.nan for k in ranks},
            "fpirs": list(fpirs), "tpir": tpir, "tpir_threshold": thresholds,
            "mated": int(mated.sum()), "nonmated": int((~mated).sum()),
            "gallery_templates": len(gallery_subjects)}
