"""``run.py verify --dataset ijbc|ijbb``: IJB-C / IJB-B template evaluation of a checkpoint (1:1 or 1:N).

Images are aligned with their 5 landmarks and embedded with their horizontal flips once; the raw embeddings
are cached next to the report (``<checkpoint>_<dataset>.features.npz``), so re-scoring with other switches
(``--ijb-no-flip``, ``--ijb-no-norm-score``, ``--ijb-no-detector-score``) or ``--ijb-mode 1n`` is instant.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from data import align_face
from eval import ijb
from eval.report import write_json, write_roc_png

from .distributed import resolve_device
from .embedding import embed_images
from .model_io import build_model, load_model_checkpoint

DATASETS = tuple(ijb.TARGETS)


def add_arguments(parser) -> None:
    """The IJB options of ``run.py verify``."""
    group = parser.add_argument_group("IJB-C / IJB-B (--dataset ijbc|ijbb, --data-dir holding IJBC/, IJBB/)")
    group.add_argument("--ijb-mode", choices=("11", "1n"), default="11",
                       help="11: 1:1 template verification, TAR at FAR (default); 1n: 1:N identification")
    group.add_argument("--ijb-no-flip", action="store_true", help="image feature without its flip's")
    group.add_argument("--ijb-no-norm-score", action="store_true",
                       help="L2-normalise each image feature (published: keep its norm as a weight)")
    group.add_argument("--ijb-no-detector-score", action="store_true",
                       help="do not weigh image features by their faceness score")


class AlignedFaces:
    """The loose crops of ``names`` aligned with their 5 landmarks to ``size``: a sequence of uint8 RGB."""

    def __init__(self, folder: Path, names, landmarks, size: int):
        self.folder, self.names, self.landmarks, self.size = folder, names, landmarks, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> np.ndarray:
        path = self.folder / self.names[i]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"IJB image missing or unreadable: {path}")
        return cv2.cvtColor(align_face(image, self.landmarks[i], self.size), cv2.COLOR_BGR2RGB)


def output_paths(args, checkpoint_file: Path) -> tuple[Path, Path, Path]:
    """(report JSON, ROC PNG, feature cache): ``--report`` (default ``<checkpoint folder>/<dataset>.json``,
    ``<dataset>_1n.json`` for 1:N), ``--roc`` (default ``<report>_roc.png``) and, beside the report,
    ``<checkpoint>_<dataset>.features.npz`` (shared by both modes and every switch)."""
    default = f"{args.dataset}{'_1n' if args.ijb_mode == '1n' else ''}.json"
    report = Path(args.report) if args.report else checkpoint_file.parent / default
    roc = Path(args.roc) if args.roc else report.with_name(f"{report.stem}_roc.png")
    return report, roc, report.with_name(f"{checkpoint_file.stem}_{args.dataset}.features.npz")


def _cache_key(checkpoint_file: Path, meta_dir: Path, target: str, input_size: int) -> str:
    """What the cached embeddings depend on: the checkpoint file, the image list and landmarks, the size."""
    stamp = lambda p: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
    files = [meta_dir / f"{target}_{suffix}" for suffix in ("face_tid_mid.txt", "name_5pts_score.txt")]
    return json.dumps({"checkpoint": stamp(checkpoint_file), "meta": [stamp(p) for p in files],
                       "input_size": input_size})


def embeddings(args, checkpoint, checkpoint_file: Path, meta: ijb.IJBMeta, cache: Path) -> np.ndarray:
    """Raw embeddings (N, 2, D) of every image and its flip: from ``cache`` when it matches, else computed
    (batched, with a progress bar) and cached."""
    input_size = checkpoint["config"]["model"].get("input_size", 112)
    key = _cache_key(checkpoint_file, ijb.meta_dir(args.data_dir, args.dataset), args.dataset, input_size)
    if cache.is_file():
        with np.load(cache) as stored:
            if str(stored["key"]) == key:
                print(f"image embeddings: reused {cache}")
                return stored["embeddings"]
        print(f"image embeddings: {cache} belongs to another checkpoint or image list; recomputing")
    device = resolve_device(args.device)
    model = build_model(checkpoint, checkpoint_file, device=device)
    loose_crop = ijb.meta_dir(args.data_dir, args.dataset).parent / "loose_crop"
    faces = AlignedFaces(loose_crop, meta.names, meta.landmarks, input_size)
    print(f"embedding {len(faces)} images and their flips on {device} ({loose_crop})")
    result = embed_images(model, faces, input_size, batch_size=args.batch_size, flip=True, device=device,
                          workers=args.workers, progress=True, separate_flip=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".part.npz")
    np.savez(partial, key=np.array(key), embeddings=result)
    partial.replace(cache)
    print(f"image embeddings cached in {cache}")
    return result


def format_tar_table(rows: dict[str, list[float]], fars) -> str:
    """A boxed table of TAR (%) per FAR, one row per method, as arcface_torch prints it (PrettyTable)."""
    cells = [["Methods", *[str(f) for f in fars]]] + [[name, *[f"{100 * v:.2f}" for v in values]]
                                                      for name, values in rows.items()]
    widths = [max(len(r[i]) for r in cells) + 2 for i in range(len(cells[0]))]
    rule = "+" + "+".join("-" * w for w in widths) + "+"
    line = lambda r: "|" + "|".join(c.center(w) for c, w in zip(r, widths)) + "|"
    return "\n".join([rule, line(cells[0]), rule, *[line(r) for r in cells[1:]], rule])


def verification(meta: ijb.IJBMeta, features: np.ndarray, ids: np.ndarray, name: str) -> tuple[dict, str]:
    """1:1: TAR at FAR by both rules, AUC; the report entry (ROC included) and the printed table."""
    scores = ijb.pair_scores(features, ids, meta.t1, meta.t2)
    result = ijb.tar_at_far(meta.labels, scores)
    table = format_tar_table({name: result["published"], f"{name} (FAR<=target)": result["bounded"]},
                             result["fars"])
    return result, f"{table}\nAUC {100 * result['auc']:.4f}%  ({result['positives']} same-subject, " \
                   f"{result['negatives']} different-subject template pairs)"


def identification(root, target: str, features: np.ndarray, ids: np.ndarray) -> tuple[dict, str]:
    """1:N: the mixed probes searched in each gallery, and their mean (rank-k over all mated searches)."""
    protocol = ijb.read_1n(root, target)
    probe_templates, probe_subjects = protocol.pop("probe")
    probe_rows = ijb.template_rows(probe_templates, ids, f"probe template of {target}_1N_probe_mixed.csv")
    results = {}
    for gallery, (templates, subjects) in protocol.items():
        rows = ijb.template_rows(templates, ids, f"gallery template of {target}_1N_gallery_{gallery}.csv")
        results[gallery] = ijb.identification(features[probe_rows], probe_subjects, features[rows], subjects)
    mated = sum(r["mated"] for r in results.values()) or np.nan
    results["mean"] = {"rank": {k: sum(r["rank"][k] * r["mated"] for r in results.values()) / mated
                                for k in ijb.RANKS},
                       "fpirs": list(ijb.FPIRS),
                       "tpir": np.mean([r["tpir"] for r in results.values()], axis=0).tolist()}
    header = ["gallery", *[f"rank-{k}" for k in ijb.RANKS], *[f"TPIR@FPIR={f:g}" for f in ijb.FPIRS]]
    rows = [[g, *[f"{100 * r['rank'][k]:.2f}" for k in ijb.RANKS], *[f"{100 * t:.2f}" for t in r["tpir"]]]
            for g, r in results.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *rows])
    return results, text


def run(args) -> int:
    """Evaluate the checkpoint on ``args.dataset`` (ijbc / ijbb) under ``args.data_dir``."""
    checkpoint = load_model_checkpoint(args.checkpoint or args.run)
    checkpoint_file = Path(checkpoint["path"])
    meta = ijb.read_ijb(args.data_dir, args.dataset)
    report, roc_png, cache = output_paths(args, checkpoint_file)
    raw = embeddings(args, checkpoint, checkpoint_file, meta, cache)
    switches = {"flip": not args.ijb_no_flip, "norm_score": not args.ijb_no_norm_score,
                "detector_score": not args.ijb_no_detector_score}
    start = time.perf_counter()
    features, ids = ijb.template_features(ijb.image_features(raw[:, 0], raw[:, 1], meta.faceness, **switches),
                                          meta.templates, meta.medias)
    name = f"{checkpoint_file.stem}-{ijb.TARGETS[args.dataset]}"
    if args.ijb_mode == "1n":
        result, text = identification(args.data_dir, args.dataset, features, ids)
    else:
        result, text = verification(meta, features, ids, name)
    seconds = time.perf_counter() - start
    print(f"checkpoint: {checkpoint['path']} (step {checkpoint.get('step', '?')}); {args.dataset} "
          f"{'1:N' if args.ijb_mode == '1n' else '1:1'}: {len(meta.names)} images, {len(ids)} templates; "
          f"switches {switches}")
    print(text)
    print(f"scored in {seconds:.2f} s")
    curve = result.pop("roc", None)
    write_json(report, {"checkpoint": checkpoint["path"], "step": checkpoint.get("step"),
                        "dataset": args.dataset, "mode": args.ijb_mode, "data_dir": str(args.data_dir),
                        "images": len(meta.names), "templates": len(ids), **switches, "metrics": result})
    print(f"report: {report}")
    if curve is not None:
        write_roc_png(roc_png, {f"{name} (AUC {100 * result['auc']:.2f}%)": curve}, far_range=(1e-6, 1.0))
        print(f"ROC: {roc_png}")
    return 0
