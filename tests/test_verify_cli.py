"""``run.py verify`` end to end: .bin files (synthetic, by name and path), raw LFW/CFP folders, errors."""
import csv
import json

import cv2
import numpy as np
import pytest
import torch

from backbones import build_backbone
from data import decode_image, generate_synthetic, load_bin, to_tensor
from eval.verification import evaluate
from facerec.cli import main
from facerec.model_io import find_checkpoint
from facerec.verify_sets import load_verification_set

SIZE = 32


def save_tiny_checkpoint(path, norm="sn", seed=0, width=8, embedding_size=16, step=7, trained=True):
    """A checkpoint in the training engine's format for a tiny backbone, randomly perturbed if ``trained``."""
    torch.manual_seed(seed)
    config = {"name": "iresnet18", "norm": norm, "embedding_size": embedding_size, "input_size": SIZE,
              "width": width, "dropout": 0.0, "norm_kwargs": {}}
    model = build_backbone(**{k: v for k, v in config.items() if k != "norm_kwargs"})
    if trained:
        _imitate_training(model)
    torch.save({"backbone": model.state_dict(), "head": {}, "config": {"model": config}, "step": step,
                "epoch": 0}, path)
    return model.eval()


@torch.no_grad()
def _imitate_training(model):
    """Distinct weights, and the running statistics of one batch, as after training."""
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    norms = [m for m in model.modules() if hasattr(m, "running_mean")]
    for m in norms:
        m.momentum = 1.0
    model.train()(torch.randn(8, 3, SIZE, SIZE))
    for m in norms:
        m.momentum = 0.1


def reference_embeddings(model, images, flip=True):
    """Flip-summed embeddings straight from the model, batch of everything, for comparison."""
    x = to_tensor(np.stack([decode_image(b, size=SIZE) for b in images]))
    with torch.no_grad():
        views = [model(x)] + ([model(x.flip(3))] if flip else [])
    return sum(views).numpy(), torch.stack(views).norm(dim=2).mean(0).numpy()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(out, identities=1, images_per_identity=2, size=SIZE, seed=1, verify_pairs=20,
                       workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return path, save_tiny_checkpoint(path)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_bin_report_roc_scores(tmp_path, capsys, synth, checkpoint):
    ckpt, model = checkpoint
    code, out, err = run_cli(capsys, "verify", "--checkpoint", ckpt, "--dataset", synth / "synth.bin",
                             "--device", "cpu", "--batch-size", 7, "--report", tmp_path / "r.json",
                             "--roc", tmp_path / "roc.png", "--scores", tmp_path / "s.csv")
    assert code == 0, err
    assert "synth" in out and "TAR@FAR=1e-3" in out and "±" in out
    report = json.loads((tmp_path / "r.json").read_text())
    metrics = report["datasets"]["synth"]
    images, issame = load_bin(synth / "synth.bin")
    emb, norms = reference_embeddings(model, images)
    expected = evaluate(emb, issame, norms=norms)
    assert metrics["fold_accuracies"] == pytest.approx(expected["fold_accuracies"])
    assert metrics["xnorm"] == pytest.approx(expected["xnorm"], rel=1e-5)
    assert metrics["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    assert set(metrics["tar_at_far"]) == {"0.001", "0.0001"}
    assert report["step"] == 7 and report["flip"] is True and report["model"]["norm"] == "sn"
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == 20 and [int(r["issame"]) for r in rows] == issame.astype(int).tolist()
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose([float(r["distance"]) for r in rows],
                               ((x[0::2] - x[1::2]) ** 2).sum(1), atol=2e-5)


def test_verify_by_name_from_run_dir_without_flip(tmp_path, capsys, synth):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_tiny_checkpoint(run / "checkpoints" / "step_5.pt", seed=1, step=5)
    model = save_tiny_checkpoint(run / "checkpoints" / "best.pt", seed=2, step=3)
    save_tiny_checkpoint(run / "checkpoints" / "step_9.pt", seed=3, step=9)  # newest, but best.pt wins
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "lfw.bin").write_bytes((synth / "synth.bin").read_bytes())
    sets = ("--dataset", "lfw", "--data-dir", tmp_path / "sets")
    code, out, err = run_cli(capsys, "verify", "--run", run, *sets, "--no-flip", "--device", "cpu",
                             "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "best.pt" in out and "lfw" in out
    metrics = json.loads((tmp_path / "r.json").read_text())["datasets"]["lfw"]
    images, issame = load_bin(synth / "synth.bin")
    emb, norms = reference_embeddings(model, images, flip=False)
    assert metrics["fold_accuracies"] == pytest.approx(evaluate(emb, issame)["fold_accuracies"])
    assert metrics["xnorm"] == pytest.approx(norms.mean(), rel=1e-5)
    (run / "checkpoints" / "best.pt").unlink()
    assert find_checkpoint(run) == run / "checkpoints" / "step_9.pt"


def test_missing_dataset_says_where_it_looked(tmp_path, capsys, checkpoint):
    code, _, err = run_cli(capsys, "verify", "--checkpoint", checkpoint[0], "--dataset", "agedb_30",
                           "--data-dir", tmp_path / "nowhere")
    assert code == 2
    assert str(tmp_path / "nowhere" / "agedb_30.bin") in err and str(tmp_path / "nowhere" / "agedb_30") in err
    assert "make-bin" in err and "insightface" in err
    code, _, err = run_cli(capsys, "verify", "--checkpoint", tmp_path / "none.pt", "--dataset", "lfw")
    assert code == 2 and "checkpoint not found" in err and "none.pt" in err


def test_checkpoint_that_does_not_fit_lists_keys(tmp_path, capsys, synth):
    path = tmp_path / "bad.pt"
    save_tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["embedding_size"] = 32  # fc/features shapes differ
    del ckpt["backbone"]["conv1.weight"]
    ckpt["backbone"]["extra.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    code, _, err = run_cli(capsys, "verify", "--checkpoint", path, "--dataset", synth / "synth.bin")
    assert code == 2
    assert "missing (1): conv1.weight" in err and "unexpected (1): extra.weight" in err
    assert "shape mismatch" in err and "fc.weight" in err
    torch.save({"weights": {}}, path)
    code, _, err = run_cli(capsys, "verify", "--checkpoint", path, "--dataset", synth / "synth.bin")
    assert code == 2 and "not a training checkpoint" in err


def _face_like(rng, height, width):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(image, (0, 0), 3)


def make_raw_lfw(root, rng):
    """LFW layout: <Name>/<Name>_NNNN.jpg (250x250) and pairs.txt with 10 folds of 1 same + 1 different."""
    names = ["Ann_A", "Bob_B", "Cid_C"]
    for name in names:
        (root / name).mkdir(parents=True)
        for i in (1, 2):
            cv2.imwrite(str(root / name / f"{name}_{i:04d}.jpg"), _face_like(rng, 250, 250))
    lines = ["10\t1"]
    for fold in range(10):
        a, b = names[fold % 3], names[(fold + 1) % 3]
        lines += [f"{a}\t1\t2", f"{a}\t{1 + fold % 2}\t{b}\t1"]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")


def make_raw_cfp(root, rng):
    """CFP layout: Data/Images|Fiducials/<id>/<frontal|profile>/NN.jpg|txt, Protocol/Pair_list_F|P.txt and
    Protocol/Split/FF|FP/01..10/same.txt|diff.txt ('i,j' numbers in the pair lists)."""
    frontal, profile = [], []
    for ident in ("001", "002", "003"):
        for pose, count, numbered in (("frontal", 2, frontal), ("profile", 1, profile)):
            for k in range(1, count + 1):
                image = root / "Data" / "Images" / ident / pose / f"{k:02d}.jpg"
                image.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(image), _face_like(rng, 189, 151))
                # 30 fiducials: jaw 0-8, brow 9-11, eye 12-17, nose bridge 18-21, nose base 22-24,
                # mouth corner 25, lip midline 26-29 (midline x = 75)
                points = np.zeros((30, 2))
                points[0:12] = np.stack([np.linspace(20, 70, 12), np.linspace(60, 170, 12)], 1)
                points[12:18] = [48, 85] + rng.normal(0, 2, (6, 2))
                points[18:22] = np.stack([np.full(4, 75.0), np.linspace(85, 115, 4)], 1)
                points[22:25] = [[65, 118], [70, 120], [75, 121]]
                points[25] = [55, 140]
                points[26:30] = np.stack([np.full(4, 75.0), np.linspace(135, 148, 4)], 1)
                fid = root / "Data" / "Fiducials" / ident / pose / f"{k:02d}.txt"
                fid.parent.mkdir(parents=True, exist_ok=True)
                fid.write_text("\n".join(f"{x:.3f},{y:.3f}" for x, y in points) + "\n")
                numbered.append(f"../Data/Images/{ident}/{pose}/{k:02d}.jpg")
    protocol = root / "Protocol"
    protocol.mkdir()
    (protocol / "Pair_list_F.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(frontal, 1)))
    (protocol / "Pair_list_P.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(profile, 1)))
    for name, same, diff in (("FF", "1,2", "3,5"), ("FP", "3,2", "1,3")):
        for fold in range(1, 11):
            split = protocol / "Split" / name / f"{fold:02d}"
            split.mkdir(parents=True)
            (split / "same.txt").write_text(same + "\n")
            (split / "diff.txt").write_text(diff + "\n")


def test_verify_raw_lfw_and_cfp_folders(tmp_path, capsys, checkpoint):
    from data.verification_sets import load_raw_pairs

    rng = np.random.default_rng(0)
    make_raw_lfw(tmp_path / "lfw_raw", rng)
    make_raw_cfp(tmp_path / "cfp_raw", rng)
    ckpt, model = checkpoint
    specs = f"{tmp_path / 'lfw_raw'},cfp_fp={tmp_path / 'cfp_raw'}"
    code, out, err = run_cli(capsys, "verify", "--checkpoint", ckpt, "--report", tmp_path / "r.json",
                             "--workers", 1, "--dataset", specs)
    assert code == 0, err
    datasets = json.loads((tmp_path / "r.json").read_text())["datasets"]
    assert sorted(datasets) == ["cfp_fp", "lfw"]
    for name, folder in (("lfw", "lfw_raw"), ("cfp_fp", "cfp_raw")):
        images, issame = load_raw_pairs(tmp_path / folder, name=name, size=SIZE, workers=1)[name]
        assert datasets[name]["pairs"] == 20 and issame.tolist() == [True, False] * 10
        emb, _ = reference_embeddings(model, images)
        assert datasets[name]["accuracy"] == pytest.approx(evaluate(emb, issame)["accuracy"])
    # an unnamed CFP folder gives both protocols
    unnamed = load_verification_set(str(tmp_path / "cfp_raw"), input_size=SIZE, workers=1)
    assert [v.name for v in unnamed] == ["cfp_ff", "cfp_fp"]
