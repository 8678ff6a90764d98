"""``run.py`` sub-command dispatcher: each command lives in ``facerec.commands.<module>``."""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module in facerec.commands (imported lazily so `--help` of one command stays fast)
COMMANDS = {
    "train": "train",
    "verify": "verify",
    "export": "export",
    "sn-report": "sn_report",
    "align": "align",
    "pack": "pack",
    "make-bin": "make_bin",
    "synth": "synth",
    "study": "study",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``run.py`` (``facerec``) parser; ``only`` names the one command to wire (only its module is
    imported)."""
    parser = argparse.ArgumentParser(description="Face recognition training and evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"facerec.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; errors the user can fix are printed without a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(chosen).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, FileExistsError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.command} stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
