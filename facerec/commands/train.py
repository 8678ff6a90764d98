"""``run.py train``: train or resume a model from a YAML config plus ``section.key=value`` overrides."""
from __future__ import annotations

HELP = "train a face recognition model (one process, or one per device under torchrun)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. optim.lr=0.05 train.output_dir=runs/try1")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")


def run(args) -> int:
    import os
    import shlex
    import signal

    from facerec.config import load_config
    from facerec.train import train

    config = load_config(args.config, args.overrides)
    summary = train(config)
    if not summary["stopped"]:
        return 0
    if os.environ.get("RANK", "0") != "0":  # rank 0 says it for all
        return 128 + signal.SIGTERM
    again = shlex.join(["python", "run.py", "train", "--config", args.config, *args.overrides])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        again = "the same torchrun command"
    print(f"stopped at step {summary['steps']} by {summary['stopped']}: saved {summary['checkpoint']}; "
          f"resume with: {again}", flush=True)
    return 128 + getattr(signal, summary["stopped"], signal.SIGTERM)
