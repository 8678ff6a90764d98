"""One module per ``run.py`` sub-command; each defines ``HELP``, ``add_arguments(parser)`` and ``run(args)``."""
