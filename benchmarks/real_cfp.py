"""Train on real photos (CFP) and verify on identities never seen in training.

CFP's 10 protocol folds are identity-disjoint. This script packs every image (10 frontal + 4 profile) of
the identities outside fold 10 (``--test-fold``), aligned from the release's fiducials (``--align
fiducials``, the default) or from the MTCNN detector's 5 points (``--align detect``; the fiducials where
it finds no face), into a RecordIO training set; writes fold 10's FF and FP pairs, aligned the same way,
as ``.bin`` files; trains ``configs/cfp.yaml`` with ``run.py train`` for about ``--minutes``; and prints
the verification accuracy on fold 10 (the standard protocol's 10-fold threshold selection inside that
fold's 700 pairs, reordered into 10 balanced sub-folds).

    python -m benchmarks.real_cfp --minutes 5
    python -m benchmarks.real_cfp --minutes 5 --align detect
    python -m benchmarks.real_cfp --steps 300 --config configs/cfp_augment.yaml   # same steps, augmented
    python -m benchmarks.real_cfp --minutes 15 --compare   # 4 arms: fiducials / detector x augment off / on
    python -m benchmarks.real_cfp --prepare-only --cache datasets/cfp   # the data configs/cfp.yaml reads

Prepared data is cached (``--cache``, default: a folder in the system temp dir; ``detect/`` in it for
``--align detect``); the photos themselves are only linked from there, never copied. The detections are
cached too (``--detections``, shared with ``benchmarks/landmarks_cfp.py``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.landmarks_cfp import DEFAULT_CACHE, cfp_detections
from data import load_bin, pack_folder, similarity_transform, write_bin
from data.align import ARCFACE_TEMPLATE
from data.augment import Augment
from data.verification_sets import cfp_alignment_points, make_bin_cfp, read_cfp_protocol
from facerec.study_report import markdown_table

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CFP = ROOT.parent / "shared" / "data" / "cfp"


def identity_of(image: Path) -> str:
    """``.../Data/Images/<identity>/<pose>/NN.jpg`` -> ``<identity>``."""
    return image.parent.parent.name


def fold_identities(cfp_dir: Path, folds) -> set[str]:
    """Identities appearing in the FF and FP pairs of ``folds``."""
    found = set()
    for protocol in ("FF", "FP"):
        pairs, _, _ = read_cfp_protocol(cfp_dir, protocol, folds)
        found.update(identity_of(p) for pair in pairs for p in pair)
    return found


def five_point_landmarks(image: Path) -> np.ndarray:
    """Five points whose ArcFace-template fit is exactly the fiducial alignment of ``image``.

    Frontal faces give the usual 5 points; profiles align 2 points (visible eye and mouth corner) to the
    template's eye and mouth midpoints. In both cases the similarity found is inverted and applied to the
    template, so that ``pack_folder``'s 5-point alignment reproduces it exactly.
    """
    parts = image.parts
    i = len(parts) - 1 - parts[::-1].index("Images")
    fiducials = np.loadtxt(Path(*parts[:i], "Fiducials", *parts[i + 1:]).with_suffix(".txt"),
                           delimiter=",", ndmin=2)
    points, reference = cfp_alignment_points(fiducials, profile=image.parent.name == "profile")
    matrix = similarity_transform(points, reference)
    linear, shift = matrix[:, :2], matrix[:, 2]
    return (ARCFACE_TEMPLATE - shift) @ np.linalg.inv(linear).T


def prepare(cfp_dir: Path, cache: Path, size: int, test_fold: int, detections: dict | None = None) -> dict:
    """Pack the training identities and write the test fold's bins into ``cache`` (skipped if present).

    ``detections`` (``{image: landmarks or None}``): align with the detector's points where it found a face,
    else with the fiducials."""
    test_ids = fold_identities(cfp_dir, [test_fold])
    other_ids = fold_identities(cfp_dir, [f for f in range(1, 11) if f != test_fold])
    shared = test_ids & other_ids
    all_ids = sorted(p.name for p in (cfp_dir / "Data" / "Images").iterdir() if p.is_dir())
    train_ids = [i for i in all_ids if i not in test_ids]
    info = {"test_identities": len(test_ids), "train_identities": len(train_ids), "shared": sorted(shared)}
    if shared:
        print(f"warning: {len(shared)} fold-{test_fold} identities also appear in other folds; they are "
              f"left out of training")
    train_dir = cache / "train"
    check_cached_size(train_dir, size)
    if not (train_dir / "property").exists():
        faces = cache / "faces"
        rows = []
        for ident in train_ids:
            for image in sorted((cfp_dir / "Data" / "Images" / ident).glob("*/*.jpg")):
                link = faces / ident / f"{image.parent.name}_{image.name}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(image.resolve())
                detected = None if detections is None else detections[image]
                points = five_point_landmarks(image) if detected is None else detected
                rows.append(",".join([f"{ident}/{link.name}", *(f"{v:.4f}" for v in points.ravel())]))
        (cache / "landmarks.csv").write_text("\n".join(rows) + "\n")
        summary = pack_folder(faces, train_dir, landmarks=cache / "landmarks.csv", size=size, force=True)
        print(f"packed {summary['images']} images of {summary['classes']} identities into {train_dir}")
    bins = cache / f"fold{test_fold}"
    if not (bins / "cfp_fp.bin").exists():
        alignment = "fiducials" if detections is None else "detect"
        summaries = make_bin_cfp(cfp_dir, bins, size=size, folds=[test_fold], force=True, alignment=alignment,
                                 detections=detections)
        used = [f"{name} {pose} {counts}" for name, summary in summaries.items()
                for pose, counts in summary["aligned"].items()]
        print("test images aligned by: " + "; ".join(used))
        for path in (bins / "cfp_ff.bin", bins / "cfp_fp.bin"):
            balance_folds(path)
    info.update(train=str(train_dir), verify=[str(bins / "cfp_ff.bin"), str(bins / "cfp_fp.bin")])
    return info


def check_cached_size(train_dir: Path, size: int) -> None:
    """ValueError unless the faces already packed in ``train_dir`` (if any) are ``size`` pixels square: a
    cache is reused as it is, so faces packed at another size would be silently resized on load."""
    prop = train_dir / "property"
    if not prop.exists():
        return
    packed = prop.read_text().strip().split(",")[1:]
    if packed != [str(size)] * 2:
        raise ValueError(f"{train_dir}: the cached faces are packed at {'x'.join(packed)} px ({prop}) but "
                         f"this run trains at {size}x{size}; pass another --cache for this input size")


def balance_folds(path: Path, folds: int = 10) -> None:
    """Reorder a one-fold CFP ``.bin`` (350 same pairs, then 350 different) into ``folds`` contiguous
    sub-folds of equal same/different shares, so that the protocol's 10-fold threshold selection runs on
    balanced folds (otherwise 5 folds hold only same pairs and 5 only different ones)."""
    images, issame = load_bin(path)
    same, diff = np.flatnonzero(issame), np.flatnonzero(~issame)
    order = np.concatenate([np.concatenate([a, b]) for a, b in zip(np.array_split(same, folds),
                                                                  np.array_split(diff, folds))])
    write_bin(path, [images[2 * i + k] for i in order for k in (0, 1)], issame[order])


# config keys this script sets for every arm: a user override of one would be silently replaced
OWNED_KEYS = ("data.train", "data.verify", "train.max_steps", "train.epochs", "train.resume",
              "train.output_dir")


def train_command(config_path: Path, overrides: list, info: dict, steps: int, run_dir: Path) -> list:
    """``run.py train`` of ``config_path`` for ``steps`` on the prepared ``info``, starting afresh in
    ``run_dir``: by default warmed up over a tenth of the steps and verified halfway and at the end, which
    ``overrides`` may change (every key but :data:`OWNED_KEYS`). The steps decide the run's length: as an
    epoch is at least one step, ``train.epochs=steps`` never stops it before ``train.max_steps``."""
    defaults = [f"train.verify_every={max(1, steps // 2)}", "schedule.warmup_epochs=0",
                f"schedule.warmup_steps={steps // 10}"]
    owned = [f"data.train={info['train']}", f"data.verify=[{','.join(info['verify'])}]",
             f"train.max_steps={steps}", f"train.epochs={steps}", "train.resume=none",
             f"train.output_dir={run_dir}"]
    return [sys.executable, str(ROOT / "run.py"), "train", "--config", str(config_path), *defaults,
            *overrides, *owned]


def owned_overrides(overrides: list) -> list:
    """The ``overrides`` that set a key this script owns (:data:`OWNED_KEYS`)."""
    return [o for o in overrides if o.split("=", 1)[0].strip() in OWNED_KEYS]


def read_metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def seconds_per_step(config: dict, config_path: Path, overrides: list, info: dict, run_dir: Path,
                     steps: int = 150) -> float:
    """Seconds per step of the real training loop (loader workers and augmentation included): ``run.py
    train`` for ``steps`` steps without verification, timed over its last third (after the warm-up).
    Long runs settle somewhat faster still (2,100 steps of configs/cfp.yaml took 12.4-13.7 min where this
    predicted 14.5), so a budget is used to about 85%."""
    command = train_command(config_path, overrides, dict(info, verify=[]), steps, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    done = subprocess.run([*command, f"train.log_every={steps // 3}"], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"the timing run of {config_path.name} failed (exit {done.returncode}):\n"
                 f"{done.stderr[-3000:]}")
    images_per_sec = read_metrics(run_dir)[-1]["images_per_sec"]
    shutil.rmtree(run_dir)
    return config["train"]["batch_size"] / images_per_sec


def arm_run_dir(cache: Path, config_path: Path) -> Path:
    """The run folder of one config's arm: one per config, so runs of two configs side by side (in one
    cache) never share a folder (the second would stop on the first's lock)."""
    return cache / f"run_{config_path.stem}"


def train_arm(config_path: Path, overrides: list, info: dict, steps: int, run_dir: Path) -> dict:
    """Train ``config_path`` for ``steps`` on the prepared ``info`` in ``run_dir`` (emptied first) with
    ``run.py train``; returns ``{"minutes", "verified": [metrics records with verification]}``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(train_command(config_path, overrides, info, steps, run_dir), cwd=ROOT, check=True)
    minutes = (time.perf_counter() - start) / 60
    return {"minutes": minutes, "verified": [r for r in read_metrics(run_dir) if "verify" in r]}


def arm_report(title: str, verified: list) -> str:
    """Lines of one arm's verification accuracy (%, ± the 10-fold std) at each verified step."""
    lines = [title]
    for record in verified:
        text = ", ".join(f"{name} {v['accuracy'] * 100:.2f}% ± {v['accuracy_std'] * 100:.2f}"
                         for name, v in record["verify"].items())
        lines.append(f"  step {record['step']:5d}: {text}")
    return "\n".join(lines)


def comparison_table(arms: list) -> str:
    """A markdown table of the arms' final accuracies: ``arms`` holds ``(alignment, augmentation, minutes,
    final verification record)``; one column per verification set (% ± 10-fold std)."""
    def cell(v: dict) -> str:
        return f"{v['accuracy'] * 100:.1f} ± {v['accuracy_std'] * 100:.1f}"

    rows = [[alignment, augmentation, *map(cell, record["verify"].values()),
             f"{record['step']} steps, {minutes:.1f} min"]
            for alignment, augmentation, minutes, record in arms]
    return markdown_table(["alignment", "augmentation", *arms[0][3]["verify"], "training"], rows)


def prepare_alignment(args, alignment: str, size: int) -> dict:
    """The training set and test bins of ``alignment`` ("fiducials" or "detect") at ``size``, prepared
    (or found) in the cache (``detect/`` in it for the detector)."""
    cache, detections = args.cache.absolute(), None
    if alignment == "detect":
        cache, detections = cache / "detect", cfp_detections(args.cfp, args.detections, args.workers)
        missed = sum(v is None for v in detections.values())
        print(f"detector: a face in {len(detections) - missed} of {len(detections)} CFP images "
              f"({missed} aligned from the fiducials instead)")
    start = time.perf_counter()
    info = prepare(args.cfp, cache, size, args.test_fold, detections)
    print(f"{alignment} data ready in {time.perf_counter() - start:.0f} s: {info['train_identities']} "
          f"training identities, {info['test_identities']} test identities (fold {args.test_fold})")
    return dict(info, cache=cache)


def steps_per_config(args, configs: dict, info: dict) -> dict:
    """``{config path: steps}`` for its arms: ``--steps`` for every config, or as many steps as the config's
    own pace (its batch size, augmentation and model) fits in ``--minutes``."""
    if args.steps:
        print(f"{args.steps} steps per arm (--steps)")
        return dict.fromkeys(configs, args.steps)
    steps = {}
    for path, config in configs.items():
        step = seconds_per_step(config, path, args.overrides, info, args.cache.absolute() / "pace")
        steps[path] = max(10, int(args.minutes * 60 * 0.9 / step))  # start-up and verification: the rest
        print(f"{path.name}: ~{step:.3f} s/step (the trainer's own, steps 100-150) -> {steps[path]} steps "
              f"per arm for a {args.minutes:g}-minute budget")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_cfp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfp", type=Path, default=DEFAULT_CFP, help=f"CFP release (default {DEFAULT_CFP})")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "facerec_real_cfp")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cfp.yaml")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    parser.add_argument("--steps", type=int, help="train exactly this many steps instead of the budget's "
                        "estimate (arms compared side by side on a shared, busy machine)")
    parser.add_argument("--test-fold", type=int, default=10)
    parser.add_argument("--align", choices=("fiducials", "detect"), default="fiducials",
                        help="align faces from the release's fiducials (default) or the MTCNN detector")
    parser.add_argument("--compare", action="store_true",
                        help="four arms one after another, each config's steps for the budget (or "
                             "--steps): fiducials and detector alignment, each with --config and with "
                             "--augment-config; prints one table")
    parser.add_argument("--augment-config", type=Path, default=ROOT / "configs" / "cfp_augment.yaml",
                        help="--compare: the augmented arms' config (default configs/cfp_augment.yaml)")
    parser.add_argument("--detections", type=Path, default=DEFAULT_CACHE,
                        help=f"--align detect: cached CFP detections (default {DEFAULT_CACHE})")
    parser.add_argument("--workers", type=int, default=2, help="--align detect: detection processes")
    parser.add_argument("--prepare-only", action="store_true", help="pack and write bins, do not train")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.width=16")
    args = parser.parse_args()
    if not (args.cfp / "Protocol").is_dir():
        parser.error(f"CFP release not found at {args.cfp}")
    owned = owned_overrides(args.overrides)
    if owned:
        parser.error(f"{', '.join(owned)}: set by this script for every arm (use --cache, --steps or "
                     f"--minutes instead)")

    from facerec.config import load_config

    alignments = ("fiducials", "detect") if args.compare else (args.align,)
    config_paths = (args.config, args.augment_config) if args.compare else (args.config,)
    configs = {path: load_config(path, args.overrides) for path in config_paths}
    sizes = {config["model"]["input_size"] for config in configs.values()}
    if len(sizes) > 1:
        parser.error(f"--config and --augment-config train at different input sizes ({sorted(sizes)}); "
                     f"the arms share their prepared data, so they must agree")
    size = sizes.pop()
    data = {alignment: prepare_alignment(args, alignment, size) for alignment in alignments}
    if args.prepare_only:
        return
    steps = steps_per_config(args, configs, data[alignments[0]])
    arms = []
    for alignment in alignments:
        for path, config in configs.items():
            info = data[alignment]
            run_dir = arm_run_dir(info["cache"], path)
            print(f"\n{alignment} alignment, {path.name}: run dir {run_dir}", flush=True)
            result = train_arm(path, args.overrides, info, steps[path], run_dir)
            augmentation = "on" if Augment(**config["data"]["augment"]) else "off"
            m = config["model"]
            title = (f"real CFP, fold {args.test_fold} (identities unseen in training), {alignment} "
                     f"alignment, augmentation {augmentation}, {steps[path]} steps of "
                     f"{config['train']['batch_size']} in {result['minutes']:.1f} min, {m['name']} "
                     f"{m['norm']} {m['input_size']}px:")
            print("\n" + arm_report(title, result["verified"]), flush=True)
            arms.append((alignment, augmentation, result["minutes"], result["verified"][-1]))
    if args.compare:
        print(f"\nfold {args.test_fold}, final step, % ± 10-fold std:\n" + comparison_table(arms))


if __name__ == "__main__":
    main()
