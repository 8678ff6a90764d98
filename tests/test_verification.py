"""eval.verification against an independent loop implementation of the published 10-fold protocol."""
import numpy as np
import pytest
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from eval.verification import evaluate, evaluate_distances, fold_slices, pair_distances


def reference_protocol(embeddings, issame, folds=10):
    """Straight loop version of insightface's calculate_roc: KFold, 400 thresholds, argmax."""
    x = normalize(np.asarray(embeddings, dtype=np.float64))
    dist = np.sum(np.square(np.subtract(x[0::2], x[1::2])), 1)
    thresholds = np.arange(0, 4, 0.01)

    def accuracy(threshold, d, same):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, same))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(same)))
        return float(tp + tn) / d.size

    accs, chosen = [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(np.arange(len(issame))):
        acc_train = np.zeros(len(thresholds))
        for i, t in enumerate(thresholds):
            acc_train[i] = accuracy(t, dist[train], issame[train])
        best = np.argmax(acc_train)
        chosen.append(thresholds[best])
        accs.append(accuracy(thresholds[best], dist[test], issame[test]))
    return np.array(accs), np.array(chosen)


def random_pairs(pairs, dim, noise, seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(2 * pairs, dim))
    issame = rng.random(pairs) < 0.5
    emb[1::2][issame] = emb[0::2][issame] + noise * rng.normal(size=(issame.sum(), dim))
    return emb, issame


CASES = {
    "random_600x64": random_pairs(600, 64, 1.0, 0),
    "hard_odd_count": random_pairs(203, 16, 3.0, 1),
    "pure_noise": random_pairs(150, 8, 100.0, 2),
    # tiny integer vectors: many identical distances and many tied thresholds
    "ties": (np.random.default_rng(3).integers(-1, 2, size=(400, 3)).astype(float) + [0, 0, 1e-3],
             np.random.default_rng(4).random(200) < 0.5),
    # perfectly separable: every threshold between the groups ties, argmax takes the first
    "separable": (np.repeat(np.eye(4), [2, 2, 2, 2], axis=0)[[0, 1, 2, 4, 3, 5, 6, 7] * 20],
                  np.array([True, False, False, True] * 20)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("folds", [10, 7])
def test_accuracy_matches_reference_protocol(case, folds):
    emb, issame = CASES[case]
    result = evaluate(emb, issame, folds=folds)
    accs, chosen = reference_protocol(emb, issame, folds)
    np.testing.assert_allclose(result["fold_accuracies"], accs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result["fold_thresholds"], chosen, rtol=0, atol=1e-12)
    assert result["accuracy"] == pytest.approx(accs.mean(), abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(accs.std(), abs=1e-12)  # population std
    assert result["threshold"] == pytest.approx(chosen.mean(), abs=1e-12)


def test_folds_follow_kfold_split():
    for count, folds in [(6000, 10), (203, 10), (11, 10), (7000, 10), (25, 4)]:
        ours = [np.arange(count)[s] for s in fold_slices(count, folds)]
        theirs = [test for _, test in KFold(n_splits=folds, shuffle=False).split(np.arange(count))]
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="folds"):
        fold_slices(5, 10)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="2 per pair"):
        evaluate(np.ones((10, 4)), np.ones(4, bool))
    with pytest.raises(ValueError, match="rows 2i, 2i"):
        pair_distances(np.ones((9, 4)))
    with pytest.raises(ValueError, match="one distance per pair"):
        evaluate_distances(np.ones(5), np.ones(4, bool), folds=2)


def reference_tar(dist, issame, target, folds=10):
    """Per fold: the largest candidate threshold whose training FAR <= target, TAR on the test fold."""
    tars = []
    for train, test in KFold(n_splits=folds, shuffle=False).split(dist):
        diff = dist[train][~issame[train]]
        candidates = np.append(np.unique(dist), np.inf)
        ok = [t for t in candidates if np.mean(diff < t) <= target]
        t = max(ok)
        tars.append(np.mean(dist[test][issame[test]] < t))
    return np.mean(tars)


def test_tar_at_far_matches_loop_and_is_sane():
    rng = np.random.default_rng(5)
    issame = np.tile(np.repeat([True, False], 300), 10)
    dist = np.where(issame, rng.normal(1.0, 0.2, issame.size), rng.normal(1.6, 0.2, issame.size)).clip(0, 4)
    result = evaluate_distances(dist, issame)
    for target in (1e-3, 1e-4, 1e-2):
        got = evaluate_distances(dist, issame, far_targets=(target,))["tar_at_far"][target]
        assert got == pytest.approx(reference_tar(dist, issame, target), abs=1e-12)
    tar = result["tar_at_far"]
    assert 0 < tar[1e-4] <= tar[1e-3] < 1
    assert result["far_at_far"][1e-3] < 0.01  # the test folds' actual FAR stays near the target
    # separable pairs: everything accepted at any FAR
    sep = evaluate_distances(np.where(issame, 0.5, 2.5), issame)
    assert sep["tar_at_far"] == {1e-3: 1.0, 1e-4: 1.0}
    assert sep["auc"] == 1.0 and sep["eer"] == 0.0 and sep["accuracy"] == 1.0


def test_auc_and_eer():
    rng = np.random.default_rng(6)
    issame = rng.random(4000) < 0.5
    dist = rng.normal(2.0, 0.3, issame.size) - 0.3 * issame
    result = evaluate_distances(dist, issame)
    # brute-force EER: threshold where FAR crosses FRR
    grid = np.linspace(0, 4, 40001)
    far = np.array([np.mean(dist[~issame] < t) for t in grid])
    frr = np.array([np.mean(dist[issame] >= t) for t in grid])
    i = np.argmin(np.abs(far - frr))
    assert result["eer"] == pytest.approx((far[i] + frr[i]) / 2, abs=2e-3)
    # AUC = probability that a same pair is closer than a different pair
    pairs_auc = np.mean(dist[issame][:, None] < dist[~issame][None, :])
    assert result["auc"] == pytest.approx(pairs_auc, abs=1e-6)


def test_xnorm_and_normalisation_invariance():
    emb, issame = CASES["random_600x64"]
    scale = np.random.default_rng(7).uniform(0.1, 10, size=(emb.shape[0], 1))
    a, b = evaluate(emb, issame), evaluate(emb * scale, issame, norms=np.array([1.0, 3.0]))
    assert a["fold_accuracies"] == b["fold_accuracies"]
    assert b["xnorm"] == 2.0 and "xnorm" not in a
