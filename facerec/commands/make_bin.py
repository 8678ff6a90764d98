"""``run.py make-bin``: verification ``.bin`` files from the raw LFW or CFP release."""
from __future__ import annotations

from dataclasses import replace

from data.verification_sets import CFP_ALIGNMENTS, CFP_DETECT, LFW_DETECT, make_bin_cfp, make_bin_lfw
from facerec.commands.align import detect_workers

HELP = "Build verification .bin files (insightface format) from raw LFW (pairs.txt) or CFP (FF and FP)."


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--lfw", metavar="DIR", help="raw LFW: <Name>/<Name>_NNNN.jpg folders, pairs.txt")
    source.add_argument("--cfp", metavar="DIR",
                        help="raw CFP release (Data/, Protocol/): writes cfp_ff.bin, cfp_fp.bin to --output")
    parser.add_argument("--output", required=True, help="--lfw: FILE.bin; --cfp: output folder")
    parser.add_argument("--pairs", metavar="FILE", help="LFW pairs file (default DIR/pairs.txt)")
    parser.add_argument("--landmarks", metavar="CSV",
                        help="LFW only: 'image,x1,y1,...,x5,y5' rows (image as Name/Name_0001.jpg) to align "
                             "faces; default the MTCNN detector's landmarks of the face nearest the centre")
    parser.add_argument("--crop", choices=["centre"],
                        help="LFW only: 'centre' takes the fixed central face crop instead of the detector")
    parser.add_argument("--align", choices=CFP_ALIGNMENTS, default="detect",
                        help="CFP only: detect (default: the detector's 5 points, the release's fiducials "
                             "where it finds no face), fiducials, or centre (the centred square)")
    parser.add_argument("--device", default="cpu", help="device of the face detector: cpu (default), cuda")
    parser.add_argument("--protocols", default="FF,FP", help="CFP protocols to write (default FF,FP)")
    parser.add_argument("--size", type=int, default=112, help="output image side (default 112)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, at most 8)")
    parser.add_argument("--force", action="store_true", help="overwrite existing .bin files")


def _print(name: str, summary: dict) -> None:
    print(f"wrote {summary['path']}: {summary['pairs']} pairs ({summary['same']} same, {summary['diff']} "
          f"different) in {summary['folds']} folds, {summary['image_size']}x{summary['image_size']} JPEG, "
          f"{summary['seconds']} s")
    for fold in summary.get("per_fold", []):
        print(f"  {name} fold {fold['fold']:2d}: {fold['same']} same + {fold['diff']} different")
    aligned = summary.get("aligned", {})
    for photo in aligned.get("no_face", []):
        print(f"  no face found in {photo}: centre crop used")
    for pose, counts in aligned.items():
        if isinstance(counts, dict):
            print(f"  {name} {pose} images aligned by " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        elif pose != "no_face":
            print(f"  {name} images aligned by {pose}: {counts}")


def run(args) -> int:
    if args.lfw:
        if args.protocols != "FF,FP" or args.align != "detect":
            raise ValueError("--protocols and --align apply to --cfp only")
        detect = None if args.crop else replace(LFW_DETECT, device=args.device)
        summary = make_bin_lfw(args.lfw, args.pairs, args.output, size=args.size, landmarks=args.landmarks,
                               workers=detect_workers(args.device, args.workers), force=args.force,
                               detect=detect)
        _print("lfw", summary)
        return 0
    if args.pairs or args.landmarks or args.crop:
        raise ValueError("--pairs, --landmarks and --crop apply to --lfw only (CFP: --align)")
    protocols = tuple(p.strip().upper() for p in args.protocols.split(",") if p.strip())
    summaries = make_bin_cfp(args.cfp, args.output, size=args.size, protocols=protocols, alignment=args.align,
                             workers=detect_workers(args.device, args.workers), force=args.force,
                             detect=replace(CFP_DETECT, device=args.device))
    for name, summary in summaries.items():
        _print(name, summary)
    return 0
