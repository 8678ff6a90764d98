"""IJB template evaluation (eval/ijb.py) against a straightforward float64 loop, the published TAR rule on
hand-built ROC curves, 1:N identification, and the meta-file parsers."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from eval import ijb

# ---------------------------------------------------------------- straightforward reference (loops, float64)


def loop_template_scores(emb, flipped, faceness, templates, medias, t1, t2, flip, norm_score, detector_score):
    feats = {}
    for i in range(len(emb)):
        x = np.array(emb[i], dtype=np.float64) + (np.array(flipped[i], dtype=np.float64) if flip else 0.0)
        if not norm_score:
            norm = math.sqrt(sum(v * v for v in x))
            x = x / norm if norm > 0 else x
        if detector_score:
            x = x * float(faceness[i])
        feats.setdefault(int(templates[i]), {}).setdefault(int(medias[i]), []).append(x)
    template_feature = {}
    for template, by_media in feats.items():
        total = np.zeros(emb.shape[1])
        for images in by_media.values():
            total = total + sum(images) / len(images)
        norm = math.sqrt(sum(v * v for v in total))
        template_feature[template] = total / norm if norm > 0 else total
    return np.array([float(np.dot(template_feature[a], template_feature[b])) for a, b in zip(t1, t2)])


def loop_published_tar(labels, scores, far):
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, index = min(zip(abs(fpr - far), range(len(fpr))))
    return tpr[index]


def loop_bounded_tar(labels, scores, far):
    """Largest TAR over every threshold (accept score >= t) whose FAR does not exceed ``far``."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores)
    best = 0.0
    for t in sorted(set(scores.tolist())):
        if np.sum((scores >= t) & ~labels) <= far * np.sum(~labels) + 1e-9:
            best = max(best, np.sum((scores >= t) & labels) / np.sum(labels))
    return best


def random_structure(rng, templates=30, dim=8, subjects=6):
    """Images of templates made of medias of one or several images; some templates of a single media."""
    rows = []
    media = 1000
    for t in range(templates):
        for _ in range(1 if t % 3 == 0 else int(rng.integers(1, 4))):
            media += 1
            rows += [(t * 7 + 3, media)] * int(rng.choice([1, 1, 2, 5]))
    rows.append((3, 1001))  # media 1001 shared by two templates: grouped per template
    rows.append((10, 1001))
    order = rng.permutation(len(rows))
    templates_, medias = np.array(rows)[order].T
    n = len(templates_)
    emb = rng.normal(size=(n, dim)) * rng.uniform(0.2, 3.0, (n, 1))
    emb[0] = 0  # a zero image (L2 normalisation keeps it zero)
    flipped = emb + 0.3 * rng.normal(size=(n, dim))
    faceness = rng.uniform(0.05, 1.0, n)
    ids = np.unique(templates_)
    subject = {t: t % subjects for t in ids}
    t1, t2 = rng.choice(ids, 400), rng.choice(ids, 400)
    t1[:10], t2[:10] = ids[0], ids[0]  # repeated pairs: tied scores
    labels = np.array([subject[a] == subject[b] for a, b in zip(t1, t2)], dtype=np.int8)
    return emb, flipped, faceness, templates_, medias, t1, t2, labels


@pytest.mark.parametrize("switches", [(True, True, True), (False, True, True), (True, False, True),
                                      (True, True, False), (False, False, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_pipeline_matches_loop(switches, seed):
    flip, norm_score, detector_score = switches
    emb, flipped, faceness, templates, medias, t1, t2, labels = random_structure(np.random.default_rng(seed))
    expected = loop_template_scores(emb, flipped, faceness, templates, medias, t1, t2, *switches)
    feats = ijb.image_features(emb, flipped, faceness, flip=flip, norm_score=norm_score,
                               detector_score=detector_score)
    template_feats, ids = ijb.template_features(feats, templates, medias)
    scores = ijb.pair_scores(template_feats, ids, t1, t2)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    result = ijb.tar_at_far(labels, scores, fars=(1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5))
    assert 1 / result["negatives"] > 1e-4  # a FAR below 1/negatives is among the targets
    for far, published, bounded, actual in zip(result["fars"], result["published"], result["bounded"],
                                               result["bounded_far"]):
        assert published == loop_published_tar(labels, expected, far)
        assert bounded == pytest.approx(loop_bounded_tar(labels, expected, far), abs=1e-12)
        assert actual <= far
    assert result["auc"] == pytest.approx(roc_auc_score(labels, expected), abs=1e-9)


def test_pair_scores_dense_and_chunked_paths_agree(monkeypatch):
    rng = np.random.default_rng(3)
    feats = ijb.l2_rows(rng.normal(size=(700, 16)))
    ids = np.arange(700) * 2 + 5
    dense = np.repeat(ids[:40], 60), np.tile(ids[160:100:-1], 40)  # every pair of two groups: one product
    scattered = rng.choice(ids, 50), rng.choice(ids, 50)  # few pairs among many templates: chunk by chunk
    for t1, t2 in (dense, scattered):
        expected = np.einsum("ij,ij->i", feats[(t1 - 5) // 2], feats[(t2 - 5) // 2])
        np.testing.assert_allclose(ijb.pair_scores(feats, ids, t1, t2), expected, rtol=0, atol=1e-12)
    monkeypatch.setattr(ijb, "_MAX_CELLS", 0)  # too large a product: the dense pairs chunk by chunk too
    expected = np.einsum("ij,ij->i", feats[(dense[0] - 5) // 2], feats[(dense[1] - 5) // 2])
    np.testing.assert_allclose(ijb.pair_scores(feats, ids, *dense, chunk=7), expected, rtol=0, atol=1e-12)


def test_pair_scores_refuses_unknown_template_naming_it():
    with pytest.raises(ValueError, match="template_2 of the pairs 99 "):
        ijb.pair_scores(np.eye(2), np.array([1, 2]), np.array([1, 2]), np.array([2, 99]))


# ---------------------------------------------------------------- the published rule on hand-built ROC curves


def test_published_rule_takes_larger_tpr_on_ties():
    # two points share the nearest FPR (a vertical step): the upper one
    fpr = np.array([0.0, 0.0, 0.001, 0.001, 0.002, 1.0])
    assert ijb.published_index(fpr, 0.001) == 3
    # equally far below and above the target: the later (larger FPR, larger TPR) point
    assert ijb.published_index(fpr, 0.0015) == 4
    # a target below every non-zero FPR: the top of the FPR = 0 segment
    assert ijb.published_index(fpr, 1e-6) == 1
    # nearest point wins over a tie-free neighbour, even when its FPR exceeds the target
    assert ijb.published_index(np.array([0.0, 0.4e-4, 1.2e-4, 1.0]), 1e-4) == 2


def test_published_rule_on_scores_with_ties():
    # positives 0.9, 0.8, 0.8, 0.7; negatives 0.8 (tied with two positives) and 0.0 .. 0.4
    labels = np.array([1, 1, 1, 0, 1] + [0] * 9)
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.7] + [0.05 * k for k in range(9)])
    result = ijb.tar_at_far(labels, scores, fars=(0.1, 0.01))
    fpr, tpr, _ = roc_curve(labels, scores)
    assert [(f, t) for f, t in zip(fpr, tpr)][:4] == [(0, 0), (0, 0.25), (0.1, 0.75), (0.1, 1.0)]
    assert result["published"] == [1.0, 0.25]  # FPR 0.1 twice: the upper point; 0.01: nearest FPR 0, upper
    assert result["published_far"] == [0.1, 0.0]
    # never exceeding: FAR 0.1 lets one negative (0.8) above the threshold 0.4, FAR 0.01 none
    assert result["bounded_threshold"] == [0.4, 0.8]
    assert result["bounded"] == [1.0, 0.25]
    assert result["bounded_far"] == [0.1, 0.0]
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores))
    np.testing.assert_array_equal(result["roc"][0], fpr)


@pytest.mark.parametrize("seed", range(4))
def test_roc_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.2
    scores = np.round(rng.normal(size=3000) + labels, 1 + seed % 3)  # many ties, collinear runs
    for ours, theirs in zip(ijb.roc(labels, scores), roc_curve(labels, scores)):
        np.testing.assert_array_equal(ours, theirs)


def test_tar_at_far_needs_both_labels():
    with pytest.raises(ValueError, match="both"):
        ijb.tar_at_far(np.ones(3), np.arange(3.0))


# ---------------------------------------------------------------- 1:N identification


def loop_identification(probe, probe_subjects, gallery, gallery_subjects, rank_k, fpir):
    best = [{} for _ in probe]
    for p, x in enumerate(probe):
        for g, y in zip(gallery_subjects, gallery):
            best[p][g] = max(best[p].get(g, -math.inf), float(np.dot(x, y)))
    mated = [p for p, s in enumerate(probe_subjects) if s in best[p]]
    nonmated = [p for p in range(len(probe)) if p not in mated]
    ranks = [1 + sum(v > best[p][probe_subjects[p]] for v in best[p].values()) for p in mated]
    tops = sorted((max(best[p].values()) for p in nonmated), reverse=True)
    allowed = int(math.floor(fpir * len(tops) + 1e-9))
    threshold = tops[allowed] if allowed < len(tops) else -math.inf
    hits = sum(r == 1 and best[p][probe_subjects[p]] > threshold for p, r in zip(mated, ranks))
    return sum(r <= rank_k for r in ranks) / len(mated), hits / len(mated)


def test_identification_matches_loop():
    rng = np.random.default_rng(5)
    gallery = ijb.l2_rows(rng.normal(size=(12, 6)))
    gallery_subjects = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 5])  # subjects 3 and 5: two templates
    probe_subjects = rng.integers(0, 15, 80)  # 10..14 are not in the gallery
    probe = ijb.l2_rows(gallery[np.minimum(probe_subjects, 9)] + 0.8 * rng.normal(size=(80, 6)))
    result = ijb.identification(probe, probe_subjects, gallery, gallery_subjects, (1, 5), (0.1, 0.3))
    assert result["mated"] + result["nonmated"] == 80 and result["nonmated"] > 0
    for k in (1, 5):
        for fpir, tpir in zip((0.1, 0.3), result["tpir"]):
            rank_rate, expected_tpir = loop_identification(probe, probe_subjects, gallery, gallery_subjects,
                                                           k, fpir)
            assert result["rank"][k] == pytest.approx(rank_rate)
            assert tpir == pytest.approx(expected_tpir)


# ---------------------------------------------------------------- parsers


def write_meta(root, tid_mid, points, pairs, target="ijbc"):
    meta = root / ijb.TARGETS[target] / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / f"{target}_face_tid_mid.txt").write_bytes(tid_mid)
    (meta / f"{target}_name_5pts_score.txt").write_bytes(points)
    (meta / f"{target}_template_pair_label.txt").write_bytes(pairs)
    return meta


POINTS = "".join(f"{i}.jpg {' '.join(str(10 + k + i) for k in range(10))} 0.{i}\n" for i in (1, 2, 3))
POINTS = POINTS.encode()


def test_read_ijb_whitespace_conventions(tmp_path):
    # CRLF, tabs, runs of spaces, trailing blanks, a blank line and no final newline
    write_meta(tmp_path, b"1.jpg 1 69544\r\n2.jpg\t1  69544 \n\n3.jpg 12 7", POINTS,
               b"1 12 0\r\n12\t1\t0\n  1 1 1  \n\n1 12 1")
    meta = ijb.read_ijb(tmp_path, "ijbc")
    assert list(meta.names) == ["1.jpg", "2.jpg", "3.jpg"]
    assert meta.templates.tolist() == [1, 1, 12] and meta.medias.tolist() == [69544, 69544, 7]
    assert meta.t1.tolist() == [1, 12, 1, 1] and meta.t2.tolist() == [12, 1, 1, 12]
    assert meta.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(meta.landmarks[1], np.arange(12, 22).reshape(5, 2))
    np.testing.assert_allclose(meta.faceness, [0.1, 0.2, 0.3], rtol=1e-6)


def test_landmarks_are_matched_by_name(tmp_path):
    shuffled = b"".join(sorted(POINTS.splitlines(keepends=True), reverse=True))
    write_meta(tmp_path, b"1.jpg 1 1\n2.jpg 1 2\n3.jpg 2 3\n", shuffled, b"1 2 0\n")
    meta = ijb.read_ijb(tmp_path, "ijbc")
    np.testing.assert_allclose(meta.faceness, [0.1, 0.2, 0.3], rtol=1e-6)


@pytest.mark.parametrize("pairs, message", [
    (b"1 2 0\n1 2 0\n\n2 77 1\n", r"template_pair_label.txt:4: template_2 77 is not a template"),
    (b"1 2 0\n5 2 1\n", r"template_pair_label.txt:2: template_1 5 is not a template"),
    (b"1 2 0\n1 2\n", r"template_pair_label.txt:2: expected 3 integers, got 2"),
    (b"1 2 0\n1 2 x\n", r"template_pair_label.txt:2: expected 3 integers, got 3 fields: '1 2 x'"),
    (b"1 2 0\n\n1 2 3\n", r"template_pair_label.txt:3: label must be 0 or 1, got 3"),
])
def test_pair_file_errors_name_file_and_line(tmp_path, pairs, message):
    write_meta(tmp_path, b"1.jpg 1 1\n2.jpg 1 2\n3.jpg 2 3\n", POINTS, pairs)
    with pytest.raises(ValueError, match=message):
        ijb.read_ijb(tmp_path, "ijbc")


def test_meta_errors_name_file_and_line(tmp_path):
    write_meta(tmp_path, b"1.jpg 1 1\n2.jpg 1\n", POINTS, b"1 1 1\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid.txt:2: expected 3 fields"):
        ijb.read_ijb(tmp_path, "ijbc")
    write_meta(tmp_path, b"1.jpg 1 1\n4.jpg 1 2\n", POINTS, b"1 1 1\n")
    with pytest.raises(ValueError, match=r"5pts_score.txt: no landmarks for image '4.jpg'"):
        ijb.read_ijb(tmp_path, "ijbc")
    with pytest.raises(FileNotFoundError, match=r"IJBB/meta/ijbb_face_tid_mid.txt"):
        ijb.read_ijb(tmp_path, "ijbb")


def test_read_int_table(tmp_path):
    rows = np.random.default_rng(0).integers(0, 10**12, (200, 3))
    path = tmp_path / "t.txt"
    path.write_text("".join(f"{a} {b}  {c}\n" for a, b, c in rows) + "\n")
    np.testing.assert_array_equal(ijb.read_int_table(path, 3), rows)
    path.write_text("1 2 3\n\n" * 50 + "4 5\n")
    with pytest.raises(ValueError, match=r"t.txt:101: expected 3 integers, got 2 fields: '4 5'"):
        ijb.read_int_table(path, 3)
    path.write_text("1 2\n4 5\n")
    with pytest.raises(ValueError, match=r"t.txt:1: expected 3 integers, got 2 fields"):
        ijb.read_int_table(path, 3)
    path.write_text("")
    assert ijb.read_int_table(path, 3).shape == (0, 3)


def test_read_1n(tmp_path):
    meta = write_meta(tmp_path, b"1.jpg 1 1\n", b"1.jpg 1 2 3 4 5 6 7 8 9 10 1\n", b"1 1 1\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
    (meta / "ijbc_1N_gallery_G1.csv").write_text(header + "5,50,a.jpg,1\n5,50,b.jpg,2\n3,30,c.jpg,3\n")
    (meta / "ijbc_1N_gallery_G2.csv").write_text(header + "7,70,img/4.jpg,4\n")
    (meta / "ijbc_1N_probe_mixed.csv").write_text(header + "9,50,frames/1.png,5\n\n11,70,img/5.jpg,6\n")
    found = ijb.read_1n(tmp_path, "ijbc")
    assert {k: (v[0].tolist(), v[1].tolist()) for k, v in found.items()} == {
        "G1": ([3, 5], [30, 50]), "G2": ([7], [70]), "probe": ([9, 11], [50, 70])}
    (meta / "ijbc_1N_gallery_G2.csv").write_text(header + "7,70,a,1\n7,71,b,2\n")
    with pytest.raises(ValueError, match=r"gallery_G2.csv:3: template 7 listed with subjects 70 and 71"):
        ijb.read_1n(tmp_path, "ijbc")
