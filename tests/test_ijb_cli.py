"""The synthetic IJB-C set (``run.py synth --ijb``) and ``run.py verify --dataset ijbc`` on it, end to end."""
import json

import cv2
import numpy as np
import pytest
import torch

from backbones import build_backbone
from data.align import align_face
from data.synth import identity_rng, image_rng, render_face, sample_traits
from data.synth_ijb import FIRST_IDENTITY, media_plans
from eval import ijb
from facerec.cli import main

SIZE = 32


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    assert main(["synth", "--ijb", "ijbc", "--output", str(root), "--subjects", "4",
                 "--probes-per-subject", "2", "--size", str(SIZE), "--workers", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = {"name": "iresnet18", "norm": "bn", "embedding_size": 16, "input_size": SIZE, "width": 8,
              "dropout": 0.0}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"backbone": build_backbone(**config).state_dict(), "head": {}, "config": {"model": config},
                "step": 3, "epoch": 0}, path)
    return path


def test_synthetic_set_layout(ijb_root):
    meta = ijb.read_ijb(ijb_root, "ijbc")
    plans = media_plans(0, 4, 2)
    assert len(meta.names) == sum(sum(m) for p in plans for m in p)
    assert len(np.unique(meta.templates)) == 12 and len(meta.t1) == 4 * 4 * 2 and meta.labels.sum() == 8
    frames = np.bincount(np.unique(meta.medias, return_inverse=True)[1])
    assert frames.max() >= 3 and (frames == 1).any()  # video-like frame groups and stills
    assert ((meta.faceness > 0) & (meta.faceness <= 1)).all() and meta.faceness.std() > 0
    assert all((ijb_root / "IJBC" / "loose_crop" / name).is_file() for name in meta.names)
    protocol = ijb.read_1n(ijb_root, "ijbc")
    assert protocol["G1"][1].tolist() == [1, 2] and protocol["G2"][1].tolist() == [3, 4]
    assert len(protocol["probe"][0]) == 8


def test_landmarks_align_back_to_the_rendered_face(ijb_root):
    """The first image (subject 0, gallery template, first media) is a still: aligning it with its 5 points
    gives the face the renderer drew (up to JPEG and resampling)."""
    meta = ijb.read_ijb(ijb_root, "ijbc")
    assert media_plans(0, 4, 2)[0][0][0] == 1
    face = render_face(sample_traits(identity_rng(0, FIRST_IDENTITY)), image_rng(0, FIRST_IDENTITY, 0), SIZE)
    loose = cv2.cvtColor(cv2.imread(str(ijb_root / "IJBC" / "loose_crop" / meta.names[0])), cv2.COLOR_BGR2RGB)
    aligned = align_face(loose, meta.landmarks[0], SIZE)
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(aligned[inner].astype(float) - face[inner]).mean() < 12
    other_identity = FIRST_IDENTITY + 1
    other = render_face(sample_traits(identity_rng(0, other_identity)), image_rng(0, other_identity, 0), SIZE)
    assert np.abs(aligned[inner].astype(float) - other[inner]).mean() > 20


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_ijbc_end_to_end(tmp_path, capsys, ijb_root, checkpoint):
    report = tmp_path / "out" / "ijbc.json"
    base = ("verify", "--dataset", "ijbc", "--data-dir", ijb_root, "--checkpoint", checkpoint,
            "--device", "cpu", "--batch-size", 5, "--report", report)
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    assert "| 1e-06 | 1e-05 | 0.0001 | 0.001 |" in out and "tiny-IJBC (FAR<=target)" in out
    cache = tmp_path / "out" / "tiny_ijbc.features.npz"
    assert cache.is_file() and (tmp_path / "out" / "ijbc_roc.png").stat().st_size > 0
    result = json.loads(report.read_text())
    assert result["flip"] and result["norm_score"] and result["detector_score"]
    metrics = result["metrics"]
    assert metrics["positives"] == 8 and metrics["negatives"] == 24 and len(metrics["published"]) == 6

    # the cached raw embeddings reproduce the scores with eval/ijb directly, for other switches too
    code, out, err = run_cli(capsys, *base, "--ijb-no-norm-score", "--ijb-no-detector-score")
    assert code == 0, err
    assert "reused" in out and "embedding 44 images" not in out
    meta = ijb.read_ijb(ijb_root, "ijbc")
    with np.load(cache) as stored:
        raw = stored["embeddings"]
    feats = ijb.image_features(raw[:, 0], raw[:, 1], meta.faceness, norm_score=False, detector_score=False)
    expected = ijb.tar_at_far(meta.labels, ijb.pair_scores(*ijb.template_features(feats, meta.templates,
                                                                                    meta.medias),
                                                           meta.t1, meta.t2))
    assert json.loads(report.read_text())["metrics"]["auc"] == pytest.approx(expected["auc"])

    code, out, err = run_cli(capsys, *base[:-2], "--ijb-mode", "1n")
    assert code == 0, err
    assert "reused" not in out  # default report folder (the checkpoint's): its own cache
    assert "rank-1" in out and "TPIR@FPIR=0.01" in out and "G2" in out
    one_to_n = json.loads((checkpoint.parent / "ijbc_1n.json").read_text())["metrics"]
    assert one_to_n["G1"]["mated"] == 4 and one_to_n["G1"]["nonmated"] == 4


def test_verify_ijbc_meta_errors(tmp_path, capsys, ijb_root, checkpoint):
    code, _, err = run_cli(capsys, "verify", "--dataset", "ijbc", "--data-dir", tmp_path, "--checkpoint",
                           checkpoint)
    assert code == 2 and "IJB meta file not found" in err and "ijbc_face_tid_mid.txt" in err
    meta = tmp_path / "IJBC" / "meta"
    meta.mkdir(parents=True)
    for name in ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt"):
        (meta / name).write_bytes((ijb_root / "IJBC" / "meta" / name).read_bytes())
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 4040 0\n")
    code, _, err = run_cli(capsys, "verify", "--dataset", "ijbc", "--data-dir", tmp_path, "--checkpoint",
                           checkpoint)
    assert code == 2 and "ijbc_template_pair_label.txt:2: template_2 4040 is not a template" in err


def test_embed_images_separate_flip_views(checkpoint):
    from facerec.embedding import embed_images
    from facerec.model_io import load_model

    model, _ = load_model(checkpoint)
    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    views = embed_images(model, list(images), SIZE, batch_size=2, separate_flip=True)
    assert views.shape == (5, 2, 16)
    summed = embed_images(model, images, SIZE, batch_size=3)
    unflipped = embed_images(model, images, SIZE, flip=False)
    np.testing.assert_allclose(views.sum(1), summed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(views[:, 0], unflipped, rtol=1e-5, atol=1e-5)
