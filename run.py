#!/usr/bin/env python3
"""Command-line entry point: ``python run.py <command> [options]`` (see ``--help``)."""
import sys

from facerec.cli import main

if __name__ == "__main__":
    sys.exit(main())
