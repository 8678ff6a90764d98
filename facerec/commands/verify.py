"""``run.py verify``: verification accuracy of a checkpoint on standard or custom pair sets."""
from __future__ import annotations

from eval.report import format_table, write_json, write_pair_scores_csv, write_roc_png
from eval.verification import roc_points
from facerec import ijb_verify
from facerec.commands.align import detect_workers
from facerec.distributed import resolve_device
from facerec.model_io import build_model, load_model_checkpoint
from facerec.outputs import check_output, writing
from facerec.verify_sets import DEFAULT_DATA_DIR, STANDARD_SETS, load_verification_sets, verify

HELP = "Verification accuracy of a checkpoint (10-fold protocol) on LFW, CFP-FP, AgeDB-30, ... or any .bin."


def add_checkpoint_arguments(parser) -> None:
    """``--checkpoint FILE`` / ``--run DIR`` (one required) and ``--device``; shared by the model commands."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file (a run directory also works)")
    source.add_argument("--run", help="training run directory: its best.pt, else its newest checkpoint")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda if any)")


def add_dataset_arguments(parser, required: bool) -> None:
    """``--dataset``, ``--data-dir``, ``--batch-size``, ``--no-flip``; shared with sn-report."""
    parser.add_argument("--dataset", required=required,
                        help=f"comma list of names ({', '.join(STANDARD_SETS)}) looked up as "
                             "<data-dir>/<name>.bin, .bin paths, or raw LFW/CFP release folders "
                             "(NAME=FOLDER names one; cfp_ff=FOLDER / cfp_fp=FOLDER pick the CFP protocol)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"folder holding <name>.bin files (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-flip", action="store_true", help="do not add the horizontal-flip embedding")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes aligning raw LFW/CFP images (default: CPUs; 1: in-process)")


def add_arguments(parser) -> None:
    add_checkpoint_arguments(parser)
    add_dataset_arguments(parser, required=True)
    parser.add_argument("--report", metavar="FILE.json", help="write all metrics as JSON")
    parser.add_argument("--roc", metavar="FILE.png", help="plot the ROC curves")
    parser.add_argument("--scores", metavar="FILE.csv", help="write per-pair distances and labels")
    ijb_verify.add_arguments(parser)


OUTPUTS = ("report", "roc", "scores")


def run(args) -> int:
    for option in OUTPUTS:
        if getattr(args, option):
            check_output(getattr(args, option), f"--{option}")
    if args.dataset in ijb_verify.DATASETS:
        return ijb_verify.run(args)
    device = resolve_device(args.device)
    checkpoint = load_model_checkpoint(args.checkpoint or args.run)
    input_size = checkpoint["config"]["model"].get("input_size", 112)
    workers = detect_workers(device, args.workers)  # raw release folders: faces detected on the device
    sets = load_verification_sets(args.dataset, args.data_dir, input_size, workers, device)
    model = build_model(checkpoint, checkpoint["path"], device=device)
    results, curves, scores = {}, {}, {}
    for vset in sets:
        metrics, distances = verify(model, vset, input_size, batch_size=args.batch_size,
                                    flip=not args.no_flip, device=device)
        results[vset.name] = metrics
        curves[f"{vset.name} (AUC {metrics['auc']:.4f})"] = roc_points(distances, vset.issame)
        scores[vset.name] = (distances, vset.issame)
    print(f"checkpoint: {checkpoint['path']} (step {checkpoint.get('step', '?')})")
    print(format_table(results))
    datasets = {v.name: {"source": v.source, **results[v.name]} for v in sets}
    report = {"checkpoint": checkpoint["path"], "step": checkpoint.get("step"),
              "epoch": checkpoint.get("epoch"), "model": checkpoint["config"]["model"],
              "flip": not args.no_flip, "datasets": datasets}
    writers = {"report": (write_json, report), "roc": (write_roc_png, curves),
               "scores": (write_pair_scores_csv, scores)}
    for option, (write, content) in writers.items():
        if getattr(args, option):
            with writing(getattr(args, option), f"--{option}"):
                write(getattr(args, option), content)
    return 0
