"""IJB-C-sized template evaluation speed: eval/ijb.py against a straightforward per-template loop.

On synthetic arrays of IJB-C's size and structure (469,375 image rows of 23,124 templates: 3,531 gallery
and 19,593 probe templates, each of a few medias that are stills or video frame groups; 15,658,489
gallery x probe pairs), prints side by side in one run:
* vectorised: ``image_features`` -> ``template_features`` -> ``pair_scores`` -> ``tar_at_far`` (both rules,
  AUC), stage by stage and in total (target: at most 60 s on the 2-core machine);
* loop: arcface_torch's straightforward pipeline (one ``np.where`` per template and per media, pair scores
  gathered in batches of 100,000, the published ``min(zip(...))`` per FAR) -- its template loop and pair
  scoring are timed on a subset and extrapolated to the full size when ``--loop-templates`` /
  ``--loop-pairs`` are smaller than the data (the figures say so);
* parsing: ``read_pairs`` (NumPy's C parser, ``np.loadtxt``) on a 15.7M-line ``ijbc_template_pair_label.txt``
  written to a temporary folder, beside a Python ``split`` per line on its first lines (extrapolated).

    python -m benchmarks.bench_ijb [--quick] [--loop-templates 400] [--loop-pairs 2000000] [--split-lines N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

from eval import ijb

IJBC = {"images": 469_375, "gallery": 3_531, "probes": 19_593, "pairs": 15_658_489, "dim": 512}


def ijbc_structure(rng, images: int, gallery: int, probes: int, pairs: int) -> dict:
    """Template/media structure and pairs shaped like IJB-C's (templates of stills and video frame groups)."""
    templates = gallery + probes
    media_sizes = np.where(rng.random(images) < 0.55, 1, rng.geometric(1 / 7, images))
    media_count = int(np.searchsorted(np.cumsum(media_sizes), images)) + 1
    media_sizes = media_sizes[:media_count]
    media_sizes[-1] -= media_sizes.sum() - images  # exactly `images` rows
    cuts = np.sort(rng.choice(np.arange(1, media_count), templates - 1, replace=False))
    media_template = np.repeat(np.arange(templates), np.diff(np.concatenate([[0], cuts, [media_count]])))
    template_of_row = np.repeat(media_template, media_sizes)
    media_of_row = np.repeat(np.arange(media_count) + 100_000, media_sizes)
    subject = np.concatenate([np.arange(gallery), rng.integers(0, gallery, probes)])  # gallery: 1 per subject
    per_probe = np.full(probes, pairs // probes)
    per_probe[: pairs % probes] += 1
    probe_of_pair = np.repeat(np.arange(gallery, templates), per_probe)
    gallery_of_pair = rng.integers(0, gallery, pairs)
    first = np.concatenate([[0], np.cumsum(per_probe)[:-1]])
    gallery_of_pair[first] = subject[gallery:]  # every probe meets its own gallery template once
    ids = np.arange(templates) * 3 + 1  # template ids are not row numbers
    return {"templates": ids[template_of_row], "medias": media_of_row, "subject": subject,
            "template_subject": subject[template_of_row],
            "t1": ids[gallery_of_pair], "t2": ids[probe_of_pair],
            "labels": (subject[gallery_of_pair] == subject[probe_of_pair]).astype(np.int8)}


def embeddings(rng, template_subject: np.ndarray, subjects: int, dim: int):
    """float32 raw embeddings and flips: a subject direction plus image noise, with varied norms."""
    centres = rng.standard_normal((subjects, dim), dtype=np.float32)
    emb = centres[template_subject]
    emb += 6 * rng.standard_normal(emb.shape, dtype=np.float32)
    flipped = emb + 0.3 * rng.standard_normal(emb.shape, dtype=np.float32)
    faceness = rng.uniform(0.1, 1.0, len(emb)).astype(np.float32)
    return emb, flipped, faceness


def vectorised(emb, flipped, faceness, s) -> tuple[dict, dict]:
    times = {}
    start = time.perf_counter()
    feats = ijb.image_features(emb, flipped, faceness)
    times["image features"] = time.perf_counter() - start
    mark = time.perf_counter()
    template_feats, ids = ijb.template_features(feats, s["templates"], s["medias"])
    times["template features"] = time.perf_counter() - mark
    del feats
    mark = time.perf_counter()
    scores = ijb.pair_scores(template_feats, ids, s["t1"], s["t2"])
    times["pair scores"] = time.perf_counter() - mark
    mark = time.perf_counter()
    result = ijb.tar_at_far(s["labels"], scores)
    times["TAR table (sklearn roc_curve, both rules, AUC)"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    return times, result


def loop_template_features(feats, templates, medias, unique_templates):
    """arcface_torch's ``image2template_feature``: one np.where per template, one per media."""
    out = np.zeros((len(unique_templates), feats.shape[1]))
    for i, t in enumerate(unique_templates):
        (rows,) = np.where(templates == t)
        face_medias = medias[rows]
        media_ids, counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for m, count in zip(media_ids, counts):
            (in_media,) = np.where(face_medias == m)
            media_feats.append(feats[rows[in_media]] if count == 1 else
                               np.mean(feats[rows[in_media]], 0, keepdims=True))
        out[i] = np.sum(np.concatenate(media_feats), 0)
    return normalize(out)


def loop_pair_scores(template_feats, unique_templates, t1, t2, batch=100_000):
    """arcface_torch's ``verification``: both templates' features gathered per batch of pairs, dotted."""
    row = np.zeros(unique_templates.max() + 1, dtype=int)
    row[unique_templates] = np.arange(len(unique_templates))
    scores = np.zeros(len(t1))
    for lo in range(0, len(t1), batch):
        scores[lo:lo + batch] = np.sum(template_feats[row[t1[lo:lo + batch]]] *
                                       template_feats[row[t2[lo:lo + batch]]], -1)
    return scores


def loop_tar_table(labels, scores, fars=ijb.FARS):
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [tpr[min(zip(abs(fpr - far), range(len(fpr))))[1]] for far in fars]


def looped(emb, flipped, faceness, s, loop_templates: int, loop_pairs: int) -> dict:
    times = {}
    start = time.perf_counter()
    feats = (emb + flipped) * faceness[:, None]  # the image-feature step is array arithmetic there too
    times["image features"] = time.perf_counter() - start
    unique_templates = np.unique(s["templates"])
    subset = unique_templates[:loop_templates]
    mark = time.perf_counter()
    loop_template_features(feats, s["templates"], s["medias"], subset)
    times["template features"] = (time.perf_counter() - mark) * len(unique_templates) / len(subset)
    del feats
    shape = (len(unique_templates), emb.shape[1])
    template_feats = ijb.l2_rows(np.random.default_rng(1).standard_normal(shape))
    pairs = min(loop_pairs, len(s["t1"]))
    mark = time.perf_counter()
    loop_pair_scores(template_feats, unique_templates, s["t1"][:pairs], s["t2"][:pairs])
    times["pair scores"] = (time.perf_counter() - mark) * len(s["t1"]) / pairs
    scores = ijb.pair_scores(template_feats, unique_templates, s["t1"], s["t2"])
    mark = time.perf_counter()
    loop_tar_table(s["labels"], scores)
    times["TAR table (sklearn roc_curve, published rule)"] = time.perf_counter() - mark
    times["total"] = sum(times.values())
    times["extrapolated"] = (f"template loop timed on {len(subset):,} of {len(unique_templates):,} "
                             f"templates, pair scoring on {pairs:,} of {len(s['t1']):,} pairs")
    return times


def write_pair_file(path: Path, t1, t2, labels) -> None:
    """``t1 t2 label`` lines with single spaces, written from digit arrays (no Python loop over lines)."""
    columns = [np.asarray(c, dtype=np.int64) for c in (t1, t2, labels)]
    pieces = []
    for i, column in enumerate(columns):
        width = len(str(column.max()))
        digits = (column[:, None] // 10 ** np.arange(width - 1, -1, -1)) % 10
        keep = (column[:, None] >= 10 ** np.arange(width - 1, -1, -1)) | (np.arange(width) == width - 1)
        pieces.append((np.where(keep, digits + ord("0"), 0).astype(np.uint8), keep))
        end = ord("\n") if i == len(columns) - 1 else ord(" ")
        pieces.append((np.full((len(column), 1), end, np.uint8), np.ones((len(column), 1), bool)))
    chars = np.hstack([p[0] for p in pieces])
    keep = np.hstack([p[1] for p in pieces])
    path.write_bytes(chars[keep].tobytes())


def parsing(s, split_lines: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ijbc_template_pair_label.txt"
        write_pair_file(path, s["t1"], s["t2"], s["labels"])
        size = path.stat().st_size
        start = time.perf_counter()
        t1, t2, labels = ijb.read_pairs(path)
        seconds = time.perf_counter() - start
        for parsed, written in zip((t1, t2, labels), (s["t1"], s["t2"], s["labels"])):
            assert np.array_equal(parsed, written)
        start = time.perf_counter()
        with open(path) as f:
            rows = [tuple(map(int, line.split())) for line, _ in zip(f, range(split_lines))]
        np.array(rows, dtype=np.int64)
        split = (time.perf_counter() - start) * len(t1) / split_lines
    return {"lines": len(t1), "MB": size / 1e6, "read_pairs": seconds, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of IJB-C's size (a smoke run)")
    parser.add_argument("--loop-templates", type=int, default=400, help="templates the loop is timed on")
    parser.add_argument("--loop-pairs", type=int, default=2_000_000, help="pairs the loop scores, timed")
    parser.add_argument("--split-lines", type=int, default=1_000_000, help="lines the split loop reads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = {k: (max(1, v // 10) if args.quick and k != "dim" else v) for k, v in IJBC.items()}
    rng = np.random.default_rng(args.seed)
    s = ijbc_structure(rng, size["images"], size["gallery"], size["probes"], size["pairs"])
    emb, flipped, faceness = embeddings(rng, s["template_subject"], size["gallery"], size["dim"])
    medias = len(np.unique(s["medias"]))
    print(f"IJB-C-sized synthetic set: {len(emb):,} images x {emb.shape[1]} (float32), "
          f"{len(np.unique(s['templates'])):,} templates, {medias:,} medias "
          f"({np.mean(np.bincount(np.unique(s['medias'], return_inverse=True)[1]) == 1):.0%} stills), "
          f"{len(s['t1']):,} pairs ({int(s['labels'].sum()):,} same-subject)")
    fast, result = vectorised(emb, flipped, faceness, s)
    slow = looped(emb, flipped, faceness, s, args.loop_templates, args.loop_pairs)
    print(f"\n{'stage':<48}{'eval/ijb.py':>14}{'per-template loop':>20}{'speed-up':>10}")
    for stage in fast:
        loop_stage = next((v for k, v in slow.items() if k.split(" (")[0] == stage.split(" (")[0]), None)
        ratio = f"{loop_stage / fast[stage]:.1f}x" if loop_stage else "-"
        print(f"{stage:<48}{fast[stage]:>12.2f} s{loop_stage:>18.2f} s{ratio:>10}")
    print(f"(loop: {slow['extrapolated']}; target for eval/ijb.py: total <= 60 s)")
    print("TAR@FAR (published rule): " + ", ".join(f"{f:g}: {100 * t:.2f}"
                                                   for f, t in zip(result["fars"], result["published"])))
    print("TAR@FAR (FAR <= target):  " + ", ".join(f"{f:g}: {100 * t:.2f}"
                                                   for f, t in zip(result["fars"], result["bounded"])))
    del emb, flipped
    lines = min(args.split_lines, len(s["t1"]))
    parsed = parsing(s, lines)
    print(f"\nparsing {parsed['lines']:,}-line pair file ({parsed['MB']:.0f} MB): read_pairs "
          f"{parsed['read_pairs']:.2f} s; Python split per line {parsed['split']:.1f} s "
          f"(extrapolated from {lines:,} lines)")


if __name__ == "__main__":
    main()
