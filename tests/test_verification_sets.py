"""Verification .bin files from raw LFW / CFP layouts (tiny LFW and CFP fixtures, plus the real CFP)."""
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from data import ARCFACE_TEMPLATE, DataError, decode_image, load_bin, make_bin_cfp, make_bin_lfw
from data.align import similarity_transform
from data.verification_sets import (
    LFW_FACE_BOX,
    cfp_alignment_points,
    load_raw_pairs,
    read_cfp_protocol,
    read_lfw_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
CFP = ROOT.parent / "shared" / "data" / "cfp"
needs_cfp = pytest.mark.skipif(not (CFP / "Protocol").is_dir(), reason=f"real CFP release not found at {CFP}")

NAMES = ["Ann_Lee", "Bo_Chen", "Cy_Diaz", "Di_Egan"]


def _lfw_colour(name, number):
    return (30 + 50 * NAMES.index(name), 40 * number, 120)  # BGR


@pytest.fixture
def lfw(tmp_path):
    """Raw-LFW layout: 250x250 images whose face box is one flat colour, 10 folds of 1 same + 1 different."""
    root = tmp_path / "lfw"
    x0, y0, x1, y1 = (round(v * 250) for v in LFW_FACE_BOX)
    for name in NAMES:
        (root / name).mkdir(parents=True)
        for number in (1, 2, 3):
            image = np.zeros((250, 250, 3), np.uint8)
            image[y0:y1, x0:x1] = _lfw_colour(name, number)
            cv2.imwrite(str(root / name / f"{name}_{number:04d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    lines = ["10\t1"]
    for fold in range(10):
        a, b = NAMES[fold % 4], NAMES[(fold + 1) % 4]
        lines += [f"{a}\t{1 + fold % 3}\t{1 + (fold + 1) % 3}", f"{a}\t{1 + fold % 3}\t{b}\t{1 + fold % 2}"]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def _expected_lfw_order(root):
    pairs, _ = read_lfw_pairs(root / "pairs.txt")
    return [(n, i) for a, i, b, j in pairs for n, i in ((a, i), (b, j))]


def test_make_bin_lfw(lfw, tmp_path):
    out = tmp_path / "lfw.bin"
    summary = make_bin_lfw(lfw, None, out, size=32, workers=1)
    assert (summary["pairs"], summary["same"], summary["diff"], summary["folds"]) == (20, 10, 10, 10)
    images, issame = load_bin(out)
    assert issame.tolist() == [True, False] * 10  # folds contiguous, same then different
    assert len(images) == 40
    for buf, (name, number) in zip(images, _expected_lfw_order(lfw)):
        face = decode_image(buf)
        assert face.shape == (32, 32, 3)
        # the crop is exactly the face box: one flat colour, file order kept
        np.testing.assert_allclose(face.reshape(-1, 3).mean(0), _lfw_colour(name, number)[::-1], atol=3)
        assert face.astype(int).std(axis=(0, 1)).max() < 3

    with pytest.raises(FileExistsError, match="lfw.bin"):
        make_bin_lfw(lfw, None, out, workers=1)
    make_bin_lfw(lfw, lfw / "pairs.txt", out, size=16, workers=1, force=True)
    assert decode_image(load_bin(out)[0][0]).shape == (16, 16, 3)


def test_lfw_images_in_a_subfolder_and_landmarks(lfw, tmp_path):
    """The release unpacks to lfw/<Name>/...; pairs.txt may sit beside it. Landmarks align the faces."""
    top = tmp_path / "release"
    top.mkdir()
    lfw.rename(top / "lfw")
    (top / "lfw" / "pairs.txt").rename(top / "pairs.txt")
    marks = ARCFACE_TEMPLATE * 1.2 + [58, 50]  # landmarks of a 134-pixel face crop at the face box
    rows = [f"{name}/{name}_{n:04d}.jpg," + ",".join(f"{v:.2f}" for v in marks.ravel())
            for name in NAMES for n in (1, 2, 3)]
    csv = tmp_path / "marks.csv"
    csv.write_text("\n".join(rows) + "\n")
    images, issame = load_raw_pairs(top, size=32)["lfw"]
    assert len(images) == 40 and issame.sum() == 10
    make_bin_lfw(top, None, tmp_path / "aligned.bin", size=32, landmarks=csv, workers=1)
    aligned = decode_image(load_bin(tmp_path / "aligned.bin")[0][0])
    assert aligned.shape == (32, 32, 3) and aligned[16, 16].max() > 100  # face centre inside the box
    csv.write_text("\n".join(rows[1:]) + "\n")
    with pytest.raises(ValueError, match="Ann_Lee/Ann_Lee_0001.jpg"):
        make_bin_lfw(top, None, tmp_path / "x.bin", landmarks=csv, workers=1)


def test_lfw_errors(lfw, tmp_path):
    pairs = lfw / "pairs.txt"
    text = pairs.read_text()
    pairs.write_text(text.replace("10\t1", "10\t2", 1))
    with pytest.raises(DataError, match="40 lines, found 20"):
        read_lfw_pairs(pairs)
    lines = text.splitlines()
    lines[2] = "Bo_Chen\t1"
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"pairs\.txt:3"):
        read_lfw_pairs(pairs)
    pairs.write_text(text)
    (lfw / "Ann_Lee" / "Ann_Lee_0002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="Ann_Lee_0002.jpg"):
        make_bin_lfw(lfw, None, tmp_path / "x.bin", workers=1)
    assert not (tmp_path / "x.bin").exists()


@pytest.fixture
def tiny_cfp(tmp_path):
    """CFP layout with 2 identities x (2 frontal + 1 profile) synthetic images and fiducials."""
    root = tmp_path / "cfp"
    front, side = [], []
    for ident in ("001", "002"):
        for pose, count in (("frontal", 2), ("profile", 1)):
            for n in range(1, count + 1):
                image_dir = root / "Data" / "Images" / ident / pose
                fid_dir = root / "Data" / "Fiducials" / ident / pose
                image_dir.mkdir(parents=True, exist_ok=True)
                fid_dir.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(image_dir / f"{n:02d}.jpg"), np.full((120, 100, 3), 90 + 40 * n, np.uint8))
                fiducials = np.zeros((30, 2))
                fiducials[:, 0] = 60  # midline
                fiducials[:, 1] = np.linspace(30, 110, 30)
                fiducials[12:18] = [30, 50]  # eye
                fiducials[25] = [35, 90]  # mouth corner
                fiducials[21] = [60, 70]  # nose tip
                np.savetxt(fid_dir / f"{n:02d}.txt", fiducials, delimiter=",", fmt="%.3f")
                (front if pose == "frontal" else side).append(f"../Data/Images/{ident}/{pose}/{n:02d}.jpg")
    protocol = root / "Protocol"
    protocol.mkdir()
    (protocol / "Pair_list_F.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(front, 1)))
    (protocol / "Pair_list_P.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(side, 1)))
    for name, same, diff in (("FF", "1,2\n3,4\n", "1,3\n"), ("FP", "1,1\n", "1,2\n4,1\n")):
        fold = protocol / "Split" / name / "01"
        fold.mkdir(parents=True)
        (fold / "same.txt").write_text(same)
        (fold / "diff.txt").write_text(diff)
    return root


def test_cfp_layout_and_load_raw_pairs(tiny_cfp, tmp_path):
    summaries = make_bin_cfp(tiny_cfp, tmp_path / "bins", size=24, workers=1)
    assert summaries["cfp_ff"]["pairs"] == 3 and summaries["cfp_fp"]["pairs"] == 3
    assert summaries["cfp_fp"]["per_fold"] == [{"fold": 1, "same": 1, "diff": 2}]
    images, issame = load_bin(tmp_path / "bins" / "cfp_fp.bin")
    assert issame.tolist() == [True, False, False] and decode_image(images[0]).shape == (24, 24, 3)
    with pytest.raises(FileExistsError, match="cfp_ff.bin"):
        make_bin_cfp(tiny_cfp, tmp_path / "bins", workers=1)

    raw = load_raw_pairs(tiny_cfp, size=24)
    assert sorted(raw) == ["cfp_ff", "cfp_fp"] and raw["cfp_ff"][1].tolist() == [True, True, False]
    assert raw["cfp_fp"][0] == images  # same bytes as the .bin
    assert list(load_raw_pairs(tiny_cfp, name="cfp_fp", size=24)) == ["cfp_fp"]
    with pytest.raises(ValueError, match="available"):
        load_raw_pairs(tiny_cfp, name="lfw")
    with pytest.raises(ValueError, match="not a raw LFW folder"):
        load_raw_pairs(tmp_path / "bins")
    with pytest.raises(FileNotFoundError):
        load_raw_pairs(tmp_path / "nowhere")


def test_cfp_errors(tiny_cfp, tmp_path):
    (tiny_cfp / "Protocol" / "Split" / "FP" / "01" / "diff.txt").write_text("1,9\n")
    with pytest.raises(DataError, match=r"FP/01/diff\.txt:1"):
        read_cfp_protocol(tiny_cfp, "FP")
    with pytest.raises(ValueError, match="fold"):
        read_cfp_protocol(tiny_cfp, "FF", folds=(2,))
    with pytest.raises(ValueError, match="protocol"):
        read_cfp_protocol(tiny_cfp, "PP")
    (tiny_cfp / "Data" / "Fiducials" / "001" / "frontal" / "02.txt").write_text("1,2\n")
    with pytest.raises(DataError, match=r"001/frontal/02\.txt"):
        make_bin_cfp(tiny_cfp, tmp_path / "b", protocols=("FF",), workers=1)
    assert not (tmp_path / "b" / "cfp_ff.bin").exists()


def test_frontal_points_mirror_across_the_midline():
    fiducials = np.zeros((30, 2))
    fiducials[[18, 19, 20, 21, 26, 27, 28, 29]] = [[100, y] for y in (40, 55, 70, 80, 95, 100, 110, 104)]
    fiducials[12:18] = [80, 50]
    fiducials[25] = [85, 100]
    fiducials[21] = [100, 75]
    points, reference = cfp_alignment_points(fiducials, profile=False)
    np.testing.assert_allclose(points[[0, 1, 3, 4]], [[80, 50], [120, 50], [85, 100], [115, 100]], atol=0.5)
    assert reference is not None and len(points) == 5


@needs_cfp
def test_real_cfp_fold_one(tmp_path):
    """Real CFP, fold 1 of both protocols: 350 same then 350 different pairs, 112x112 aligned faces."""
    summaries = make_bin_cfp(CFP, tmp_path, folds=(1,), alignment="fiducials", workers=2)
    for name in ("cfp_ff", "cfp_fp"):
        images, issame = load_bin(tmp_path / f"{name}.bin")
        assert len(images) == 1400 and issame.tolist() == [True] * 350 + [False] * 350
        assert summaries[name]["per_fold"] == [{"fold": 1, "same": 350, "diff": 350}]
        assert decode_image(images[1]).shape == (112, 112, 3)


@needs_cfp
def test_real_cfp_fiducial_interpretation():
    """The indices used for eye / nose / mouth fit the ArcFace template closely on real frontal faces, and
    the profile eye-to-mouth-corner segment is vertical on average (the profile alignment's premise)."""
    residuals = []
    for path in sorted((CFP / "Data" / "Fiducials").glob("0[0-4]?/frontal/01.txt")):
        points, reference = cfp_alignment_points(np.loadtxt(path, delimiter=","), profile=False)
        matrix = similarity_transform(points, reference)
        mapped = points @ matrix[:, :2].T + matrix[:, 2]
        residuals.append(np.linalg.norm(mapped - reference, axis=1).mean())
    # median 1.68 px; taking the eyebrow for the eye gives 2.6, the nose base for the tip 3.4
    assert len(residuals) >= 40 and np.median(residuals) < 2.1  # pixels of 112
    angles = []
    for path in sorted((CFP / "Data" / "Fiducials").glob("*/profile/01.txt")):
        points, _ = cfp_alignment_points(np.loadtxt(path, delimiter=","), profile=True)
        (ex, ey), (mx, my) = points
        angles.append(math.degrees(math.atan2(abs(mx - ex), my - ey)) * np.sign(mx - ex))
    assert len(angles) == 500 and abs(np.mean(angles)) < 5



def test_real_cfp_comparison_table():
    """benchmarks.real_cfp --compare: one row per arm, the final record's accuracies in % with their std."""
    from benchmarks.real_cfp import comparison_table

    def record(step, ff, fp):
        return {"step": step, "verify": {"cfp_ff": {"accuracy": ff, "accuracy_std": 0.05},
                                         "cfp_fp": {"accuracy": fp, "accuracy_std": 0.061}}}

    table = comparison_table([("fiducials", "off", 14.04, record(2400, 0.871, 0.80)),
                              ("detect", "on", 15.5, record(2400, 0.9057, 0.8443))])
    assert table.splitlines() == [
        "| alignment | augmentation | cfp_ff | cfp_fp | training |",
        "|---|---|---|---|---|",
        "| fiducials | off | 87.1 ± 5.0 | 80.0 ± 6.1 | 2400 steps, 14.0 min |",
        "| detect | on | 90.6 ± 5.0 | 84.4 ± 6.1 | 2400 steps, 15.5 min |"]

def _command(module, argv):
    """Parse ``argv`` with the command's own arguments and run it, as facerec.cli does."""
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_make_bin_command(lfw, tiny_cfp, tmp_path, capsys):
    from facerec.commands import make_bin

    out = tmp_path / "lfw.bin"
    assert _command(make_bin, ["--lfw", str(lfw), "--output", str(out), "--size", "16", "--workers=1"]) == 0
    assert "20 pairs (10 same, 10 different) in 10 folds, 16x16" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        _command(make_bin, ["--lfw", str(lfw), "--output", str(out)])
    argv = ["--cfp", str(tiny_cfp), "--output", str(tmp_path / "bins"), "--size", "16", "--workers", "1"]
    assert _command(make_bin, argv + ["--protocols", "FP"]) == 0
    printed = capsys.readouterr().out
    assert "cfp_fp.bin: 3 pairs (1 same, 2 different) in 1 folds" in printed and "cfp_ff" not in printed
    assert _command(make_bin, argv + ["--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "bins").iterdir()) == ["cfp_ff.bin", "cfp_fp.bin"]
    with pytest.raises(ValueError, match="--lfw only"):
        _command(make_bin, argv + ["--landmarks", "x.csv"])


def test_make_bin_through_run_py_cli(lfw, tmp_path, capsys):
    from facerec.cli import main

    argv = ["make-bin", "--lfw", str(lfw), "--output", str(tmp_path / "l.bin"), "--size=16", "--workers=1"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_real_cfp_arms_of_two_configs_never_share_a_run_folder(tmp_path):
    """Two configs trained side by side from one cache (single arms, not only --compare) get two folders."""
    from benchmarks.real_cfp import arm_run_dir

    assert arm_run_dir(tmp_path, Path("configs/cfp.yaml")) != arm_run_dir(tmp_path, Path("configs/x.yaml"))


def test_real_cfp_cache_of_another_size_is_refused(tmp_path):
    """benchmarks.real_cfp reuses a prepared cache as it is: faces packed at another size are an error that
    names the cache, never silently resized (a 64 px cache asked for 112 px would train on blurred faces)."""
    from benchmarks.real_cfp import check_cached_size

    check_cached_size(tmp_path / "train", 64)  # nothing cached yet
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "property").write_text("450,64,64\n")
    check_cached_size(tmp_path / "train", 64)
    with pytest.raises(ValueError, match=r"train: the cached faces are packed at 64x64 px .* at 112x112"):
        check_cached_size(tmp_path / "train", 112)


def _real_cfp_trainer_config(config_name, overrides, steps, tmp_path):
    """The config that benchmarks.real_cfp's ``run.py train`` command for ``steps`` would train."""
    from benchmarks.real_cfp import train_command
    from facerec.config import load_config

    info = {"train": str(tmp_path / "train"), "verify": [str(tmp_path / "ff.bin")]}
    command = train_command(ROOT / "configs" / config_name, overrides, info, steps, tmp_path / "run")
    start = command.index("--config")
    return load_config(command[start + 1], command[start + 2:])


def test_real_cfp_user_overrides_win_over_the_scripts_defaults(tmp_path):
    """A ``train.verify_every=`` (or warm-up) override on benchmarks.real_cfp's command line reaches the
    trainer; the keys the script owns (data, steps, run folder) stay its own, and overriding one is an
    error."""
    from benchmarks.real_cfp import owned_overrides

    overrides = ["train.verify_every=50", "schedule.warmup_steps=7"]
    config = _real_cfp_trainer_config("cfp_augment.yaml", overrides, 300, tmp_path)
    assert config["train"]["verify_every"] == 50 and config["schedule"]["warmup_steps"] == 7
    assert config["train"]["max_steps"] == 300 and config["data"]["train"] == str(tmp_path / "train")
    default = _real_cfp_trainer_config("cfp.yaml", [], 300, tmp_path)
    assert default["train"]["verify_every"] == 150 and default["schedule"]["warmup_steps"] == 30
    assert owned_overrides(["data.train=x", "model.width=8", "train.max_steps=5"]) == [
        "data.train=x", "train.max_steps=5"]


def test_real_cfp_steps_are_not_cut_short_by_the_configs_epochs(tmp_path):
    """``--steps 3800`` (or a budget's steps) trains 3,800 steps, even where the config's ``train.epochs``
    (30 epochs of 98 steps on CFP) would stop the run at 2,940."""
    from facerec.train import total_steps

    config = _real_cfp_trainer_config("cfp.yaml", [], 3800, tmp_path)
    assert total_steps(config["train"], steps_per_epoch=6300 // 64) == 3800


def test_real_cfp_budget_gives_each_config_its_own_steps(tmp_path, monkeypatch):
    """``--minutes``: each config's arms get as many steps as its own pace fits (a config at half the batch
    gets about twice the steps), not the slowest config's count for every arm; ``--steps`` is for all."""
    import argparse

    import benchmarks.real_cfp as real_cfp

    monkeypatch.setattr(real_cfp, "seconds_per_step",
                        lambda config, *rest: config["train"]["batch_size"] / 100)
    configs = {Path("a.yaml"): {"train": {"batch_size": 64}}, Path("b.yaml"): {"train": {"batch_size": 32}}}
    args = argparse.Namespace(steps=None, minutes=10.0, cache=tmp_path, overrides=[])
    assert real_cfp.steps_per_config(args, configs, {}) == {Path("a.yaml"): 843, Path("b.yaml"): 1687}
    args.steps = 300
    assert real_cfp.steps_per_config(args, configs, {}) == dict.fromkeys(configs, 300)
