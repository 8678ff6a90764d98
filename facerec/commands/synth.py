"""``run.py synth``: a synthetic face-like identity dataset packed like a real one (RecordIO + .bin)."""
from __future__ import annotations

from data import generate_synthetic
from data.synth_ijb import generate_ijb
from facerec.outputs import check_output, writing

HELP = ("Generate a synthetic identity dataset: train.rec/train.idx/property (insightface layout) and a "
        "10-fold verification synth.bin on identities held out of training; with --ijb a synthetic IJB-C / "
        "IJB-B set in insightface's IJB_release layout.")


def add_arguments(parser) -> None:
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the dataset to")
    parser.add_argument("--identities", type=int, default=200, help="training identities (default 200)")
    parser.add_argument("--images-per-identity", type=int, default=30, help="images each (default 30)")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same arguments give the same bytes")
    parser.add_argument("--verify-identities", type=int, default=None,
                        help="held-out identities for synth.bin (default max(20, N/4))")
    parser.add_argument("--verify-pairs", type=int, default=3000,
                        help="verification pairs, a multiple of 20 (10 folds, half same; default 3000)")
    parser.add_argument("--quality", type=int, nargs=2, default=(40, 95), metavar=("LOW", "HIGH"),
                        help="JPEG quality range drawn per image (default 40 95)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all usable CPUs)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing dataset in --output")
    parser.add_argument("--ijb", choices=("ijbc", "ijbb"),
                        help="write a synthetic IJB set instead: <output>/IJBC (IJBB) with loose_crop, meta")
    parser.add_argument("--subjects", type=int, default=40, help="--ijb: subjects (default 40)")
    parser.add_argument("--probes-per-subject", type=int, default=3,
                        help="--ijb: probe templates per subject, besides its gallery template (default 3)")


def run(args) -> int:
    check_output(args.output, "--output", folder=True)
    if args.ijb:
        with writing(args.output, "--output"):
            summary = generate_ijb(args.output, args.ijb, args.subjects, args.probes_per_subject, args.size,
                                   args.seed, workers=args.workers, force=args.force)
        print(f"wrote {summary['output_dir']}: {summary['subjects']} subjects, {summary['templates']} "
              f"templates, {summary['medias']} medias, {summary['images']} images, {summary['pairs']} "
              f"template pairs")
        return 0
    with writing(args.output, "--output"):
        summary = generate_synthetic(args.output, args.identities, args.images_per_identity, args.size,
                                     args.seed, verify_identities=args.verify_identities,
                                     verify_pairs=args.verify_pairs, quality_range=tuple(args.quality),
                                     workers=args.workers, force=args.force)
    print(f"wrote {summary['output_dir']}: {summary['num_classes']} identities, {summary['train_images']} "
          f"training images, {summary['verify_pairs']} verification pairs on {summary['verify_identities']} "
          f"held-out identities ({summary['seconds']:.1f} s)")
    return 0
