"""``run.py sn-report``: the learned IN/LN/BN importance of every Switchable Normalization layer."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from backbones import hard_select, sn_mixture_weights
from eval.report import format_sn_table, format_table, write_json, write_sn_png
from facerec.commands.verify import add_checkpoint_arguments, add_dataset_arguments
from facerec.distributed import resolve_device
from facerec.model_io import load_model
from facerec.verify_sets import load_verification_sets, verify

HELP = "Per-layer IN/LN/BN importance of a Switchable Normalization model (table, plot, ARGMAX accuracy)."


def add_arguments(parser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--output-dir", default="sn_report", help="where sn_weights.json/.png go")
    add_dataset_arguments(parser, required=False)


def _dominant(layers: list[dict], kind: str) -> str:
    counts = Counter(layer["terms"][int(np.argmax(layer[kind]))] for layer in layers)
    return ", ".join(f"{term} {counts[term]}" for term in ("IN", "LN", "BN") if counts[term])


def run(args) -> int:
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint or args.run, device=device)
    layers = sn_mixture_weights(model)
    if not layers:
        norm = checkpoint["config"]["model"].get("norm")
        raise ValueError(f"{checkpoint['path']}: the model has no Switchable Normalization layers "
                         f"(norm {norm!r}); sn-report needs a model trained with norm 'sn' or 'syncsn'")
    out = Path(args.output_dir)
    report = {"checkpoint": checkpoint["path"], "step": checkpoint.get("step"), "layers": layers}
    print(format_sn_table(layers))
    print(f"largest weight per layer -- mean: {_dominant(layers, 'mean')}; var: {_dominant(layers, 'var')}")
    if args.dataset:
        size = checkpoint["config"]["model"].get("input_size", 112)
        sets = load_verification_sets(args.dataset, args.data_dir, size, args.workers, device)
        options = {"batch_size": args.batch_size, "flip": not args.no_flip, "device": device}
        soft = {v.name: verify(model, v, size, **options)[0] for v in sets}
        hard_model = hard_select(model)
        hard = {v.name: verify(hard_model, v, size, **options)[0] for v in sets}
        print(format_table({**{f"{k} (SN)": m for k, m in soft.items()},
                            **{f"{k} (ARGMAX)": m for k, m in hard.items()}}))
        for name in soft:
            change = 100 * (hard[name]["accuracy"] - soft[name]["accuracy"])
            print(f"{name}: ARGMAX changes accuracy by {change:+.2f} points")
        report["verification"] = {"sn": soft, "argmax": hard}
    write_json(out / "sn_weights.json", report)
    title = f"SN importance weights: {Path(checkpoint['path']).name}"
    write_sn_png(out / "sn_weights.png", layers, title=title)
    print(f"wrote {out / 'sn_weights.json'} and {out / 'sn_weights.png'}")
    return 0
