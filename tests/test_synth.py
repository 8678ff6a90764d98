"""Synthetic identity generator: determinism, insightface layout, held-out 10-fold pairs, and that the task is
hard for raw pixels and an untrained iresnet18 (the quickstart shows it is learnable)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from backbones import build_backbone
from data import FaceRecordDataset, decode_image, generate_synthetic, load_bin, to_tensor
from data.recordio import MXIndexedRecordIO, unpack
from data.synth import MANIFEST, OUTPUT_FILES, render_identity
from eval.verification import evaluate

IDS, PER_ID, SIZE, SEED = 12, 4, 32, 3
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _generate(path, seed=SEED, workers=1):
    return generate_synthetic(path, IDS, PER_ID, SIZE, seed, verify_identities=20, verify_pairs=200,
                              workers=workers, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    summary = _generate(path)
    return path, summary


def test_same_arguments_same_bytes_whatever_the_workers(synth, tmp_path):
    path, _ = synth
    _generate(tmp_path / "again", workers=2)
    for name in OUTPUT_FILES:
        assert (path / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    _generate(tmp_path / "other", seed=SEED + 1)
    assert (path / "train.rec").read_bytes() != (tmp_path / "other" / "train.rec").read_bytes()
    assert (path / "synth.bin").read_bytes() != (tmp_path / "other" / "synth.bin").read_bytes()


def test_refuses_to_overwrite_without_force(synth, tmp_path):
    _generate(tmp_path)
    with pytest.raises(FileExistsError, match="force"):
        _generate(tmp_path)
    generate_synthetic(tmp_path, 3, 2, SIZE, 0, verify_identities=20, verify_pairs=20, workers=1, force=True,
                       progress=False)
    assert (tmp_path / "property").read_text().strip() == f"3,{SIZE},{SIZE}"


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 20"):
        generate_synthetic(tmp_path, 4, 2, SIZE, 0, verify_pairs=30, progress=False)
    with pytest.raises(ValueError, match="at least 20 verification identities"):
        generate_synthetic(tmp_path, 4, 2, SIZE, 0, verify_identities=10, progress=False)
    assert not any(tmp_path.iterdir())


def test_insightface_layout(synth):
    path, summary = synth
    assert summary["num_classes"] == IDS and summary["train_images"] == IDS * PER_ID
    assert (path / "property").read_text().strip() == f"{IDS},{SIZE},{SIZE}"
    records = MXIndexedRecordIO(str(path / "train.idx"), str(path / "train.rec"), "r")
    header, payload = unpack(records.read_idx(0))
    first, end = 1 + IDS * PER_ID, 1 + IDS * PER_ID + IDS
    assert header.flag == 2 and list(header.label) == [first, end] and payload == b""
    assert sorted(records.keys) == list(range(end))
    labels = []
    for key in range(1, first):
        header, payload = unpack(records.read_idx(key))
        assert header.flag == 0 and header.id == key
        labels.append(header.label)
        assert decode_image(payload).shape == (SIZE, SIZE, 3)
    assert labels == sorted(labels) and labels == [float(i) for i in np.repeat(np.arange(IDS), PER_ID)]
    for ident in range(IDS):
        header, payload = unpack(records.read_idx(first + ident))
        assert header.flag == 2 and payload == b""
        assert list(header.label) == [1 + ident * PER_ID, 1 + (ident + 1) * PER_ID]
    records.close()
    dataset = FaceRecordDataset(path, train=False)
    assert dataset.num_classes == IDS and len(dataset) == IDS * PER_ID
    image, label = dataset[PER_ID]
    assert image.shape == (3, SIZE, SIZE) and label == 1


def test_header_record_comes_first_so_a_lost_index_can_be_rebuilt(synth, tmp_path):
    """Without train.idx the index is rebuilt in file order: the header must be the file's first record."""
    path, _ = synth
    for name in ("train.rec", "property"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    dataset = FaceRecordDataset(tmp_path, train=False)
    assert dataset.num_classes == IDS and len(dataset) == IDS * PER_ID
    assert sorted(dataset.labels.tolist()) == np.repeat(np.arange(IDS), PER_ID).tolist()


def test_verification_pairs_held_out_in_ten_folds(synth):
    path, _ = synth
    images, issame = load_bin(path / "synth.bin")
    manifest = json.loads((path / MANIFEST).read_text())
    pairs = manifest["pairs"]
    assert len(images) == 400 and issame.shape == (200,) and len(pairs) == 200
    fold_ids = []
    for fold in range(10):
        part = slice(20 * fold, 20 * fold + 20)
        assert issame[part].tolist() == [True] * 10 + [False] * 10  # contiguous folds, same pairs first
        fold_ids.append({ident for a, _, b, _ in pairs[part] for ident in (a, b)})
    for f, ids in enumerate(fold_ids):  # no identity is in two folds
        assert all(not ids & other for g, other in enumerate(fold_ids) if g != f)
    for (a, i, b, j), same in zip(pairs, issame):
        assert (a == b) == same and min(a, b) >= IDS  # disjoint from training 0..IDS-1
        assert not same or i != j
    # the manifest tells the truth: the .bin holds exactly those identities' images
    pools = {}
    for k, (a, i, b, j) in enumerate(pairs):
        for slot, (ident, image) in enumerate(((a, i), (b, j))):
            if ident not in pools:
                pools[ident] = render_identity(SEED, ident, PER_ID, SIZE, manifest["quality_range"])
            assert images[2 * k + slot] == pools[ident][image]


def test_identities_differ_and_images_vary(synth):
    path, _ = synth
    dataset = FaceRecordDataset(path, train=False)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy().reshape(IDS, PER_ID, -1)
    assert np.ptp(x, axis=1).mean() > 0.3  # each identity's images really vary (pose, light, background)
    assert len({x[i, 0].tobytes() for i in range(IDS)}) == IDS


def _quickstart_model_settings():
    config = yaml.safe_load(QUICKSTART.read_text()) if QUICKSTART.exists() else {}
    model = {"input_size": 48, "width": 32, "norm": "sn", "embedding_size": 128} | config.get("model", {})
    synth = {"size": 48, "images_per_identity": 30, "seed": 0} | (config.get("data", {}).get("synth") or {})
    return model, synth


@pytest.fixture(scope="module")
def hard_pairs(tmp_path_factory):
    """Held-out pairs at the quickstart's image size (600 pairs on 40 identities x 10 images)."""
    model_cfg, synth_cfg = _quickstart_model_settings()
    path = tmp_path_factory.mktemp("hard")
    generate_synthetic(path, 1, 10, synth_cfg["size"], synth_cfg["seed"], verify_identities=40,
                       verify_pairs=600, workers=2, progress=False)
    images, issame = load_bin(path / "synth.bin")
    return to_tensor(np.stack([decode_image(b, model_cfg["input_size"]) for b in images])), issame


def test_task_is_hard_for_raw_pixels(hard_pairs):
    """Raw-pixel cosine (standard protocol: image + flip summed) stays at or below 75% accuracy."""
    x, issame = hard_pairs
    accuracy = evaluate((x + x.flip(3)).flatten(1).numpy(), issame)["accuracy"]
    assert 0.45 < accuracy <= 0.75, accuracy


@pytest.mark.parametrize("width", ["quickstart", 32])
def test_task_is_hard_for_an_untrained_iresnet18(hard_pairs, width):
    """An untrained iresnet18 (the quickstart's, and at width 32) stays at or below 75% accuracy."""
    x, issame = hard_pairs
    model_cfg, _ = _quickstart_model_settings()
    torch.manual_seed(0)
    net = build_backbone("iresnet18", norm=model_cfg["norm"], embedding_size=model_cfg["embedding_size"],
                         input_size=model_cfg["input_size"],
                         width=model_cfg["width"] if width == "quickstart" else width).eval()
    with torch.no_grad():
        emb = torch.cat([net(x[k:k + 200]) + net(x[k:k + 200].flip(3)) for k in range(0, len(x), 200)])
    accuracy = evaluate(emb.numpy(), issame)["accuracy"]
    assert 0.45 < accuracy <= 0.75, accuracy
