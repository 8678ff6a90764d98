"""``run.py export``: .npz/.npy round trips for every input kind, and ONNX parity with PyTorch."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data import decode_image, generate_synthetic, load_bin
from data.recordio import MXIndexedRecordIO, unpack
from facerec.cli import main
from facerec.export import read_image_set
from tests.test_verify_cli import SIZE, reference_embeddings, save_tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    generate_synthetic(root / "synth", identities=3, images_per_identity=2, size=SIZE, seed=2,
                       verify_pairs=20, workers=1, progress=False)
    model = save_tiny_checkpoint(root / "model.pt", seed=4)
    return root, model


def export(capsys, ckpt, *argv):
    code = main(["export", "--checkpoint", str(ckpt), "--device", "cpu", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def check_embeddings(saved, model, images):
    raw, _ = reference_embeddings(model, images)
    norms = np.linalg.norm(raw, axis=1)
    assert saved["embeddings"].dtype == np.float32 and saved["norms"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(saved["embeddings"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(saved["norms"], norms, rtol=1e-4)
    np.testing.assert_allclose(saved["embeddings"] * saved["norms"][:, None], raw, rtol=1e-4, atol=1e-4)


def test_export_rec_bin_folder_and_list(tmp_path, capsys, setup):
    root, model = setup
    ckpt = root / "model.pt"
    # .rec directory: labels from the record headers, in record order
    export(capsys, ckpt, "--input", root / "synth", "--output", tmp_path / "rec.npz", "--batch-size", 4)
    saved = np.load(tmp_path / "rec.npz")
    rec = MXIndexedRecordIO(str(root / "synth" / "train.idx"), str(root / "synth" / "train.rec"), "r")
    records = [unpack(rec.read_idx(k)) for k in range(1, 7)]
    assert sorted(saved.files) == ["embeddings", "labels", "norms"]
    assert saved["labels"].tolist() == [int(h.label) for h, _ in records] == [0, 0, 1, 1, 2, 2]
    check_embeddings(saved, model, [payload for _, payload in records])
    # .bin: the pair images in order, issame kept
    export(capsys, ckpt, "--input", root / "synth" / "synth.bin", "--output", tmp_path / "bin.npz")
    saved = np.load(tmp_path / "bin.npz")
    images, issame = load_bin(root / "synth" / "synth.bin")
    assert saved["issame"].tolist() == issame.tolist()
    check_embeddings(saved, model, images)
    # folder <identity>/<image>: labels by sorted identity, relative paths; and a list file
    for k, buf in enumerate(images[:6]):
        path = tmp_path / "faces" / ["bob", "amy"][k % 2] / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(decode_image(buf), cv2.COLOR_RGB2BGR))
    export(capsys, ckpt, "--input", tmp_path / "faces", "--output", tmp_path / "folder.npz")
    saved = np.load(tmp_path / "folder.npz")
    expected_paths = [f"amy/{k}.png" for k in (1, 3, 5)] + [f"bob/{k}.png" for k in (0, 2, 4)]
    assert saved["paths"].tolist() == expected_paths
    assert saved["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    pngs = [(tmp_path / "faces" / p).read_bytes() for p in saved["paths"]]
    check_embeddings(saved, model, pngs)
    (tmp_path / "list.txt").write_text("# path label\nfaces/bob/0.png 7\n\nfaces/amy/1.png 3\n")
    export(capsys, ckpt, "--input", tmp_path / "list.txt", "--output", tmp_path / "list.npy")
    matrix = np.load(tmp_path / "list.npy")
    np.testing.assert_allclose(matrix, saved["embeddings"][[3, 0]], atol=1e-6)
    assert read_image_set(tmp_path / "list.txt").labels.tolist() == [7, 3]


def test_export_input_errors(tmp_path, capsys, setup):
    root, _ = setup
    (tmp_path / "list.txt").write_text("a.png 1\nb.png\n")
    for argv, message in [
        (["--input", tmp_path / "list.txt", "--output", tmp_path / "o.npz"], "some lines have a label"),
        (["--input", tmp_path / "missing", "--output", tmp_path / "o.npz"], "input not found"),
        (["--input", root / "synth", "--output", tmp_path / "o.txt"], "must end in .npz or .npy"),
        ([], "nothing to export"),
    ]:
        code = main(["export", "--checkpoint", str(root / "model.pt"), *map(str, argv)])
        assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("norm, trained", [("sn", True), ("bn", True), ("sn", False)])
def test_onnx_matches_pytorch(tmp_path, capsys, norm, trained):
    import onnx
    import onnxruntime

    model = save_tiny_checkpoint(tmp_path / "m.pt", norm=norm, seed=5, trained=trained)
    out = export(capsys, tmp_path / "m.pt", "--onnx", tmp_path / "m.onnx")
    assert "ONNX Runtime vs PyTorch max abs difference" in out
    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["color"] == "RGB" and meta["layout"] == "NCHW" and meta["input_size"] == str(SIZE)
    assert "(x / 255 - 0.5) / 0.5" in meta["normalize"] and "flip" in meta["flip_sum"]
    assert [i.name for i in proto.graph.input] == ["input"]  # weights are initializers, not inputs
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


def test_bench_eval_quick_runs():
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_eval", "--quick", "--threads", "1"],
                            capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "throughput ratio pipeline / bare forward" in result.stdout
    assert "evaluate on 6000 pairs" in result.stdout
