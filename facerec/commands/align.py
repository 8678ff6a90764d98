"""``run.py align``: detect, choose and align the faces of a folder of photos (MTCNN, ArcFace template)."""
from __future__ import annotations

from data.align_photos import align_folder
from data.detection import FACE_RULES, DetectSettings

HELP = "Detect and align the faces of a photo folder (identity sub-folders kept); resumable."


def add_detect_arguments(parser, face_rules=FACE_RULES, device: bool = True) -> None:
    """``--face``, ``--min-face`` and (``device``) ``--device``: how the MTCNN detector runs; shared by the
    photo commands (those with a model run the detector on the model's ``--device``)."""
    parser.add_argument("--face", choices=face_rules, default="main",
                        help="which face of a photo: main (default: the largest face near the centre, "
                             "largest box area - 2 x squared distance of its centre from the photo's), "
                             "largest, center (nearest the centre)" +
                             (", all (every face, each its own crop, _<i> in its name)" if "all" in face_rules
                              else ""))
    parser.add_argument("--min-face", type=float, default=20.0, help="smallest face searched, pixels (20)")
    if device:
        parser.add_argument("--device", default="cpu", help="device of the detector: cpu (default), cuda")


def detect_settings(args, size: int | None, device=None) -> DetectSettings:
    """The :class:`DetectSettings` of parsed :func:`add_detect_arguments` options (``device`` overrides)."""
    device = str(device or args.device)
    return DetectSettings(rule=args.face, size=size, device=device, min_face=args.min_face)


def detect_workers(device, workers: int | None) -> int | None:
    """Worker processes for detection: as asked, else one (in-process) on a GPU, else the default."""
    return 1 if workers is None and str(device).startswith("cuda") else workers


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, metavar="FOLDER", help="photos (any sub-folders)")
    parser.add_argument("--output", required=True, metavar="FOLDER", help="aligned faces, same sub-folders")
    parser.add_argument("--size", type=int, default=112, help="output image side (default 112)")
    parser.add_argument("--landmarks-out", metavar="CSV",
                        help="landmarks of every face, as `pack --landmarks` reads "
                             "(default OUTPUT/landmarks.csv)")
    add_detect_arguments(parser)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, at most 8)")


def run(args) -> int:
    summary = align_folder(args.input, args.output, detect_settings(args, args.size),
                           landmarks_out=args.landmarks_out, quality=args.quality,
                           workers=detect_workers(args.device, args.workers))
    for kind in ("no_face", "undecodable"):
        for photo, reason in summary[kind]:
            print(f"skipped {photo}: {reason}")
    print(f"{summary['photos']} photos: {summary['aligned']} aligned ({summary['faces']} faces written), "
          f"{len(summary['no_face'])} without a face, {len(summary['undecodable'])} undecodable, "
          f"{summary['multi_face']} with several faces; {summary['resumed']} done by an earlier run")
    return 0
