"""Issue 14, defects 5 and 6: bad input, bad output paths and bad devices end in one clear message."""
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data import DataError, FaceFolderDataset, FaceRecordDataset, generate_synthetic, load_bin
from data.recordio import MXIndexedRecordIO
from eval.verification import evaluate
from facerec.cli import main
from facerec.config import ConfigError, load_config
from facerec.distributed import resolve_device
from tests.test_verify_cli import SIZE, save_tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    generate_synthetic(root / "synth", identities=3, images_per_identity=4, size=SIZE, seed=2,
                       verify_pairs=20, workers=1, progress=False)
    save_tiny_checkpoint(root / "model.pt", seed=4)
    return root


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_mid_file_record_corruption_names_the_record_not_a_buffer_error(setup, tmp_path):
    data = tmp_path / "set"
    data.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        (data / name).write_bytes((setup / "synth" / name).read_bytes())
    with MXIndexedRecordIO(data / "train.idx", data / "train.rec", "r") as records:
        offset = records.idx[5]
    raw = bytearray((data / "train.rec").read_bytes())
    raw[offset:offset + 4] = b"\0\0\0\0"  # record 5's magic word
    (data / "train.rec").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"record key 5 at offset \d+: bad magic"):
        FaceRecordDataset(data)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_config_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        load_config(None, [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match=r"schedule.milestones must be finite numbers"):
        load_config(None, [f"schedule.milestones=[1, {value}]"])


def test_empty_bin_and_same_only_pairs_get_a_clear_message(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(pickle.dumps(([], [])))
    with pytest.raises(DataError, match=r"empty.bin: holds no pairs"):
        load_bin(empty)
    with pytest.raises(ValueError, match="only same-identity pairs.*needs both"):
        evaluate(np.random.default_rng(0).normal(size=(40, 8)), np.ones(20, bool))
    with pytest.raises(ValueError, match="only different-identity pairs"):
        evaluate(np.random.default_rng(0).normal(size=(40, 8)), np.zeros(20, bool))


def test_devices_that_do_not_exist_are_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("command", ["verify", "export"])
def test_model_commands_refuse_bad_devices_cleanly(setup, capsys, command):
    common = ["--checkpoint", setup / "model.pt"]
    args = (["--dataset", setup / "synth" / "synth.bin"] if command == "verify"
            else ["--input", setup / "synth" / "synth.bin", "--output", setup / "out.npz"])
    code, err = cli(capsys, command, *common, *args, "--device", "tpu")
    assert code == 2 and "unknown device 'tpu'" in err
    if not torch.cuda.is_available():
        code, err = cli(capsys, command, *common, *args, "--device", "cuda")
        assert code == 2 and "no CUDA device" in err


def _output_cases(root, blocked):
    """(argv, option named in the error) of every command writing to ``blocked``."""
    ckpt, bin_ = root / "model.pt", root / "synth" / "synth.bin"
    faces = root / "faces"
    verify = ["verify", "--checkpoint", ckpt, "--dataset", "missing-set"]
    return [
        (["synth", "--output", blocked, "--identities", 2, "--verify-pairs", 20], "--output"),
        (["pack", "--input", faces, "--output", blocked], "--output"),
        (["export", "--checkpoint", ckpt, "--input", bin_, "--output", blocked / "e.npz"], "--output"),
        (["export", "--checkpoint", ckpt, "--onnx", blocked / "m.onnx"], "--onnx"),
        (["make-bin", "--lfw", root / "no-lfw", "--output", blocked / "lfw.bin"], "--output"),
        ([*verify, "--report", blocked / "r.json"], "--report"),
        ([*verify, "--roc", blocked / "r.png"], "--roc"),
        ([*verify, "--scores", blocked / "s.csv"], "--scores"),
    ]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("blocked_by", ["file", "read-only"])
def test_unwritable_output_paths_are_refused_before_any_work(setup, tmp_path, capsys, case, blocked_by):
    """A file where a folder is needed, or a read-only place (/proc refuses new files even to root):
    refused before the evaluation (here the verification set does not even exist) with the option named."""
    if blocked_by == "file":
        blocked = tmp_path / "a-file"
        blocked.write_text("x")
    else:
        blocked = Path("/proc")
    argv, option = _output_cases(setup, blocked / "sub" if blocked_by == "file" else blocked)[case]
    code, err = cli(capsys, *argv)
    assert code == 2 and f"error: {option} " in err and str(blocked) in err, err
    assert "Traceback" not in err


def test_a_full_disk_is_a_clear_error(setup, capsys):
    code, err = cli(capsys, "verify", "--checkpoint", setup / "model.pt", "--dataset",
                    setup / "synth" / "synth.bin", "--report", "/dev/full", "--device", "cpu")
    assert code == 2 and "--report /dev/full" in err and "No space left" in err, err


def _with_a_broken_image(root, tmp_path):
    """A .bin (and an image folder) whose image 3 is not an image."""
    images, issame = load_bin(root / "synth" / "synth.bin")
    images[3] = b"not a jpeg"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(pickle.dumps((images, issame.tolist())))
    return bad


def test_verify_and_export_name_the_file_of_an_undecodable_image(setup, tmp_path, capsys):
    bad = _with_a_broken_image(setup, tmp_path)
    code, err = cli(capsys, "verify", "--checkpoint", setup / "model.pt", "--dataset", bad, "--device", "cpu")
    assert code == 2 and f"{bad}: image 3 (pair 1)" in err, err
    folder = tmp_path / "faces" / "ann"
    folder.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((SIZE, SIZE, 3), 40 * i, np.uint8))
    (folder / "1.png").write_bytes(b"broken")
    out = tmp_path / "e.npz"
    code, err = cli(capsys, "export", "--checkpoint", setup / "model.pt", "--input", tmp_path / "faces",
                    "--output", out, "--device", "cpu")
    assert code == 2 and str(folder / "1.png") in err and "--skip-bad" in err, err
    code, _ = cli(capsys, "export", "--checkpoint", setup / "model.pt", "--input", tmp_path / "faces",
                  "--output", out, "--device", "cpu", "--skip-bad")
    saved = np.load(out)
    assert code == 0 and list(saved["paths"]) == ["ann/0.png", "ann/2.png"] and len(saved["embeddings"]) == 2


def test_broken_images_of_a_folder_dataset_are_found_up_front_or_skipped(tmp_path):
    for name in ("ann", "bob"):
        (tmp_path / name).mkdir()
        for i in range(3):
            ok, jpeg = cv2.imencode(".jpg", np.full((SIZE, SIZE, 3), 60 * i, np.uint8))
            (tmp_path / name / f"{i}.jpg").write_bytes(jpeg.tobytes())
    truncated = tmp_path / "bob" / "1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    (tmp_path / "ann" / "2.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 unreadable images.*ann/2.jpg.*bob/1.jpg.*bad_images=skip"):
        FaceFolderDataset(tmp_path)
    dataset = FaceFolderDataset(tmp_path, skip_bad=True)
    assert len(dataset) == 4 and dataset.skipped == [tmp_path / "ann" / "2.jpg", truncated]
    assert [int(dataset[i][1]) for i in range(4)] == [0, 0, 1, 1]
