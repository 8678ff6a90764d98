"""Face verification metrics on pairs of embeddings: the standard 10-fold protocol, TAR@FAR, AUC and EER.

Pure functions over numpy arrays. The protocol is the one used by insightface and most peers: pair
distance = squared L2 distance of L2-normalised embeddings (0..4), thresholds ``0, 0.01, ..., 3.99``,
a pair is called "same" when ``dist < threshold``, 10 contiguous unshuffled folds, and each fold is
scored with the threshold that is best on the other folds (first best on ties).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import auc as _area_under_curve
from sklearn.metrics import roc_curve as _sklearn_roc_curve

THRESHOLDS = np.arange(0, 4, 0.01)
FAR_TARGETS = (1e-3, 1e-4)


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float64); all-zero rows stay zero, as sklearn's ``normalize``."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each pair (rows 2i, 2i+1) after L2 normalisation: shape (P,), range 0..4."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] % 2:
        raise ValueError(f"embeddings must have shape (2P, D) with pairs in rows 2i, 2i+1, got {x.shape}")
    x = l2_normalize(x)
    return np.sum(np.square(x[0::2] - x[1::2]), axis=1)


def fold_slices(count: int, folds: int) -> list[slice]:
    """Contiguous unshuffled folds as sklearn's ``KFold(folds, shuffle=False)``.

    The first ``count % folds`` folds hold one pair more than the others.
    """
    if not 2 <= folds <= count:
        raise ValueError(f"need 2 <= folds <= number of pairs, got folds={folds} for {count} pairs")
    sizes = np.full(folds, count // folds)
    sizes[: count % folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for end, size in zip(ends, sizes)]


def _counts_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of ``values`` strictly below each threshold (exactly ``np.sum(values < t)``)."""
    return np.searchsorted(np.sort(values), thresholds, side="left")


def _far_threshold(diff_distances: np.ndarray, far_target: float) -> float:
    """Largest threshold whose false accept rate on ``diff_distances`` is at most ``far_target``.

    With ``same = dist < t`` at most k = floor(far_target * n_diff) different-identity pairs may fall
    below t, so t is the (k+1)-th smallest different-pair distance (every pair is accepted when k >= n).
    """
    allowed = int(np.floor(far_target * diff_distances.size + 1e-9))
    if allowed >= diff_distances.size:
        return float("inf")
    return float(np.partition(diff_distances, allowed)[allowed])


def roc_points(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC over all pairs with similarity = -distance: (false positive rates, true positive rates)."""
    fpr, tpr, _ = _sklearn_roc_curve(np.asarray(issame, dtype=bool), -np.asarray(distances, dtype=np.float64))
    return fpr, tpr


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Rate where false positive rate equals false negative rate, linearly interpolated along the ROC."""
    gap = (1.0 - tpr) - fpr  # decreasing from +1 to -1 along the curve
    i = int(np.argmax(gap <= 0))
    if i == 0:
        return float(fpr[0])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def evaluate_distances(
    distances: np.ndarray, issame: np.ndarray, folds: int = 10, far_targets=FAR_TARGETS
) -> dict:
    """The verification protocol on precomputed pair distances (see :func:`evaluate` for the keys)."""
    dist = np.asarray(distances, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    if dist.ndim != 1 or dist.shape != same.shape:
        raise ValueError(f"need one distance per pair label: {dist.shape} distances, {same.shape} labels")
    if same.all() or not same.any():
        kind = "same-identity" if same.any() else "different-identity"
        raise ValueError(f"only {kind} pairs ({same.size}): the verification protocol needs both same and "
                         "different pairs (accuracy, ROC and AUC are meaningless otherwise)")
    slices = fold_slices(dist.size, folds)

    # correct[f, t]: pairs of fold f classified correctly at threshold t (same & d < t, or diff & d >= t)
    correct = np.empty((folds, THRESHOLDS.size), dtype=np.int64)
    for f, part in enumerate(slices):
        d, s = dist[part], same[part]
        diff_correct = np.count_nonzero(~s) - _counts_below(d[~s], THRESHOLDS)
        correct[f] = _counts_below(d[s], THRESHOLDS) + diff_correct
    best = np.argmax(correct.sum(axis=0) - correct, axis=1)  # best on the other folds; first best on ties
    sizes = np.array([part.stop - part.start for part in slices])
    fold_accuracies = correct[np.arange(folds), best] / sizes
    fold_thresholds = THRESHOLDS[best]

    tar_folds, far_folds = {}, {}
    for target in far_targets:
        tars, fars = [], []
        for part in slices:
            train = np.ones(dist.size, dtype=bool)
            train[part] = False
            threshold = _far_threshold(dist[train & ~same], target)
            d, s = dist[part], same[part]
            accepted = d < threshold
            tars.append(np.count_nonzero(accepted & s) / s.sum() if s.any() else np.nan)
            fars.append(np.count_nonzero(accepted & ~s) / (~s).sum() if (~s).any() else np.nan)
        tar_folds[target], far_folds[target] = np.array(tars), np.array(fars)

    fpr, tpr = roc_points(dist, same)
    return {
        "pairs": int(dist.size),
        "folds": folds,
        "accuracy": float(np.mean(fold_accuracies)),
        "accuracy_std": float(np.std(fold_accuracies)),
        "threshold": float(np.mean(fold_thresholds)),
        "fold_accuracies": fold_accuracies.tolist(),
        "fold_thresholds": fold_thresholds.tolist(),
        "tar_at_far": {t: _nanmean(v) for t, v in tar_folds.items()},
        "tar_at_far_std": {t: _nanstd(v) for t, v in tar_folds.items()},
        "far_at_far": {t: _nanmean(v) for t, v in far_folds.items()},
        "auc": float(_area_under_curve(fpr, tpr)),
        "eer": equal_error_rate(fpr, tpr),
    }


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _nanstd(values: np.ndarray) -> float:
    return float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")


def evaluate(embeddings: np.ndarray, issame, folds: int = 10, norms: np.ndarray | None = None) -> dict:
    """Verification metrics of pairs (rows 2i, 2i+1 of ``embeddings``; ``issame`` P booleans).

    Pass flip-summed, un-normalised embeddings; they are L2-normalised here. Returns
    ``accuracy`` (mean of the fold accuracies), ``accuracy_std`` (population std), ``threshold`` (mean
    chosen threshold), ``fold_accuracies``, ``fold_thresholds``, ``tar_at_far`` ``{1e-3: .., 1e-4: ..}``
    (mean over folds of the true accept rate at the threshold that keeps the *training* folds' false
    accept rate within the target; ``tar_at_far_std``, and ``far_at_far`` the test folds' actual rate),
    ``auc`` and ``eer`` (over all pairs), ``pairs``, ``folds``, and ``xnorm`` (mean of ``norms``) when
    ``norms`` (per-image embedding norms, insightface's XNorm) is given.
    """
    issame = np.asarray(issame, dtype=bool)
    rows = np.asarray(embeddings).shape[0]
    if rows != 2 * issame.size:
        raise ValueError(f"{rows} embeddings for {issame.size} pairs (need 2 per pair)")
    result = evaluate_distances(pair_distances(embeddings), issame, folds)
    if norms is not None:
        result["xnorm"] = float(np.mean(norms))
    return result
