"""``run.py export``: embeddings of an image collection (.npz/.npy) and/or the backbone as ONNX."""
from __future__ import annotations

from data.workers import default_workers
from facerec.commands.align import add_detect_arguments, detect_settings, detect_workers
from facerec.commands.verify import add_checkpoint_arguments
from facerec.distributed import resolve_device
from facerec.export import export_embeddings, export_onnx
from facerec.model_io import load_model
from facerec.outputs import check_output, writing

HELP = "Export L2-normalised embeddings of images (.npz/.npy) and/or the backbone as ONNX."


def add_arguments(parser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--input", help="image folder (<id>/<image> gives labels), .rec file or folder with "
                                        "train.rec, verification .bin, or a list file ('PATH [LABEL]' lines)")
    parser.add_argument("--output", metavar="FILE.npz|FILE.npy",
                        help=".npz: embeddings, norms, labels/paths; .npy: the embedding matrix only")
    parser.add_argument("--detect", action="store_true",
                        help="--input holds photos: detect and align their faces first (MTCNN, on --device; "
                             "photos without a face are left out and listed)")
    add_detect_arguments(parser, device=False)
    parser.add_argument("--workers", type=int, default=None, help="--detect: processes (default: CPUs, at "
                                                                   "most 8; one on a GPU)")
    parser.add_argument("--onnx", metavar="FILE.onnx", help="also save the backbone as ONNX (dynamic batch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-flip", action="store_true", help="do not add the horizontal-flip embedding")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave undecodable images out (and list them) instead of stopping")


def run(args) -> int:
    if not args.onnx and not (args.input and args.output):
        raise ValueError("nothing to export: give --input and --output, and/or --onnx")
    if bool(args.input) != bool(args.output):
        raise ValueError("--input and --output go together")
    for option in ("output", "onnx"):
        if getattr(args, option):
            check_output(getattr(args, option), f"--{option}")
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint or args.run, device=device)
    model_config = checkpoint["config"]["model"]
    input_size = model_config.get("input_size", 112)
    if args.input:
        detect = detect_settings(args, input_size, device) if args.detect else None
        workers = detect_workers(device, args.workers) or default_workers()
        with writing(args.output, "--output"):
            arrays = export_embeddings(model, args.input, args.output, input_size, batch_size=args.batch_size,
                                       flip=not args.no_flip, device=device, skip_bad=args.skip_bad,
                                       detect=detect, detect_workers=workers)
        for message in arrays.pop("skipped"):
            print(f"skipped: {message}")
        for photo in arrays.get("no_face", []):
            print(f"skipped (no face found): {photo}")
        shape = arrays["embeddings"].shape
        print(f"wrote {args.output}: {shape[0]} embeddings of size {shape[1]} ({', '.join(arrays)})")
    if args.onnx:
        with writing(args.onnx, "--onnx"):
            diff = export_onnx(model, args.onnx, input_size, model_config=model_config)
        print(f"wrote {args.onnx}: input (N, 3, {input_size}, {input_size}) RGB (x/255-0.5)/0.5; "
              f"ONNX Runtime vs PyTorch max abs difference {diff:.2e}")
    return 0
