"""``run.py pack``: an image folder ``<identity>/<image>`` -> insightface ``train.rec/train.idx/property``."""
from __future__ import annotations

from data.pack import pack_folder
from facerec.commands.align import add_detect_arguments, detect_settings, detect_workers

HELP = "Pack an image folder (<identity>/<image>) into train.rec/train.idx/property (insightface layout)."


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, metavar="FOLDER", help="folder of <identity>/<image>")
    parser.add_argument("--output", required=True, metavar="DIR", help="for train.rec, train.idx, property")
    parser.add_argument(
        "--landmarks", metavar="CSV",
        help="'image,x1,y1,...,x5,y5' rows (image relative to --input, header optional): align faces to the "
             "ArcFace template; without it images are taken as aligned (centred square, resized)",
    )
    parser.add_argument("--detect", action="store_true",
                        help="raw photos: find and align each face with the MTCNN detector (photos without a "
                             "face are left out and listed)")
    add_detect_arguments(parser)
    parser.add_argument("--size", type=int, default=112, help="output image side (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, at most 8)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave undecodable images out (and list them) instead of stopping")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def run(args) -> int:
    detect = detect_settings(args, args.size) if args.detect else None
    workers = detect_workers(args.device, args.workers) if args.detect else args.workers
    summary = pack_folder(args.input, args.output, landmarks=args.landmarks, size=args.size,
                          quality=args.quality, workers=workers, force=args.force,
                          skip_bad=args.skip_bad, detect=detect)
    for message in summary["skipped"]:
        print(f"skipped: {message}")
    for photo in summary["no_face"]:
        print(f"skipped (no face found): {photo}")
    skipped = f", {len(summary['skipped'])} undecodable images skipped" if summary["skipped"] else ""
    skipped += f", {len(summary['no_face'])} photos without a face skipped" if summary["no_face"] else ""
    print(f"wrote {summary['output']}: {summary['images']} images of {summary['classes']} identities, "
          f"{args.size}x{args.size}{skipped}")
    return 0
