"""One module per ``run.py`` sub-command, each with ``HELP``, ``add_arguments(parser)``, ``run(args)``."""
